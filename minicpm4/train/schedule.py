"""Warmup-Stable-Decay learning-rate schedule (MiniCPM v1; MINICPM4.md §6.2), a pure function of the step.

    step:   0 ........ W-1 | W ........ W+S-1 | W+S ........ W+S+D-1 | W+S+D ...
    ratio:  1/W ...... 1   | 1 .......... 1   | decay(p) ... min_ratio | min_ratio

`step` is the index of the optimizer update the LR is used for (0-based). Warmup is linear and reaches
the peak on its last step ((s+1)/W, so step 0 already moves the weights); the decay progress is
p = (d+1)/D for decay step d = s-W-S, so the last scheduled step runs exactly at min_ratio.
The decay shape is not published for MiniCPM4 (MINICPM4.md §11.2); MiniCPM v1 used an exponential decay
and about 10% of the tokens for it, hence the defaults here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_SHAPES = ("linear", "cosine", "exp", "1-sqrt")


def decay_factor(p: float, shape: str, min_ratio: float) -> float:
    """LR ratio at decay progress p in [0, 1]: 1 at p=0, min_ratio at p=1."""
    if shape == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    if shape == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "exp":  # geometric: the LR halves every fixed number of steps (MiniCPM v1's f = 0.5^(s/T))
        return min_ratio**p
    if shape == "1-sqrt":  # Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Durations"
        return 1.0 - (1.0 - min_ratio) * math.sqrt(p)
    raise ValueError(f"decay_shape: unknown value {shape!r}; choose from {', '.join(DECAY_SHAPES)}")


def wsd(step: int, warmup_steps: int, stable_steps: int, decay_steps: int, decay_shape: str = "exp",
        min_ratio: float = 0.1) -> float:
    """The LR multiplier (of the peak LR) for optimizer step `step`; see the module docstring."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    step -= warmup_steps
    if step < stable_steps:
        return 1.0
    step -= stable_steps
    if decay_steps <= 0 or step >= decay_steps:
        return min_ratio if decay_steps > 0 else 1.0
    return decay_factor((step + 1) / decay_steps, decay_shape, min_ratio)


@dataclass(frozen=True)
class WSD:
    """A WSD schedule over `total_steps`: `WSD(...)(step)` is the LR ratio. Frozen: it holds no state,
    so resuming needs nothing but the step."""

    total_steps: int
    warmup_steps: int = 0
    decay_steps: int = 0
    decay_shape: str = "exp"
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(f"warmup ({self.warmup_steps}) + decay ({self.decay_steps}) steps exceed "
                             f"total_steps ({self.total_steps})")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape: unknown value {self.decay_shape!r}; choose from {', '.join(DECAY_SHAPES)}")
        if not 0.0 <= self.min_ratio <= 1.0 or (self.decay_shape == "exp" and self.min_ratio <= 0.0):
            raise ValueError(f"min_ratio must be in [0, 1] (and > 0 for the exp shape), got {self.min_ratio}")

    @classmethod
    def from_fractions(cls, total_steps: int, warmup_fraction: float = 0.01, decay_fraction: float = 0.1,
                       **kwargs) -> WSD:
        """Warmup and decay as fractions of the run (MiniCPM v1: ~10% decay suffices, 2.5% does not)."""
        return cls(total_steps, round(warmup_fraction * total_steps), round(decay_fraction * total_steps), **kwargs)

    @property
    def stable_steps(self) -> int:
        return self.total_steps - self.warmup_steps - self.decay_steps

    def __call__(self, step: int) -> float:
        return wsd(step, self.warmup_steps, self.stable_steps, self.decay_steps, self.decay_shape, self.min_ratio)
