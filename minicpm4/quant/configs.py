"""Quantization configs, one dataclass per method (torchao style: `quantize_(model, Config(...))`).

Defaults follow MINICPM4.md §4.5 (W4A16 GPTQ: symmetric, group 128, no act-order, lm_head not quantized) and §5
(BitCPM4: per-group absmean ternary, group 32-64 measured best in the team's sweep; we default to 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """Round-to-nearest INT4, per group of `group_size` input channels."""
    group_size: int = 128
    sym: bool = True
    lm_head: bool = False  # also pack the LM head (tied models: a packed copy of the embedding used for logits)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al. 2022) layer by layer on calibration activations; `prefix_tokens` > 0 is P-GPTQ.

    prefix_tokens: the first s positions of every calibration sequence are left out of the Hessians (P-GPTQ,
        MINICPM4.md §4.5: s = 4; their ~10x activations would otherwise dominate H = X^T X).
    smooth: AWQ-style smoothing first (S-GPTQ / S-P-GPTQ): per input channel scales s = mean|x|^alpha folded
        into the preceding norm / projection, alpha searched over `smooth_grid` to minimise the block output error.
    damp_percent: lambda = damp_percent * mean(diag H) added to H's diagonal before the Cholesky.
    act_order: quantize columns by decreasing diag(H) (g_idx then lists each channel's group).
    static_groups: with act_order, fix every group's scale from the unquantized weights before the sweep, so
        groups stay contiguous channel ranges (no g_idx permutation at inference).
    block_size: columns per lazy-batch update (GPTQ's B).
    """
    group_size: int = 128
    sym: bool = True
    prefix_tokens: int = 0
    smooth: bool = False
    smooth_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    damp_percent: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    lm_head: bool = False

    @property
    def method(self) -> str:
        return ("s-" if self.smooth else "") + ("p-gptq" if self.prefix_tokens else "gptq")


def PGPTQConfig(prefix_tokens: int = 4, **kwargs) -> GPTQConfig:  # noqa: N802 (a preset, named like the configs)
    """P-GPTQ with the report's s = 4."""
    return GPTQConfig(prefix_tokens=prefix_tokens, **kwargs)


@dataclass(frozen=True)
class TernaryQATConfig:
    """BitCPM4 ternary weights. step="prepare": swap linears for fake-quantized ones (train them: QAT);
    step="convert": pack ternary codes + scales (from a prepared model, or post-training from float weights)."""
    step: Literal["prepare", "convert"] = "prepare"
    group_size: int = 64
    lm_head: bool = False
    # convert: when every float linear already holds ternary x scale per group (the fake-quantized BitCPM4
    # release), pack exactly those values at the group size found (verified per group), not a re-ternarisation
    detect: bool = True


QuantConfig = Int4WeightOnlyConfig | GPTQConfig | TernaryQATConfig


@dataclass
class LayerReport:
    name: str
    error: float  # relative output error ||Y_q - Y|| / ||Y|| on the calibration activations (nan without them)


@dataclass
class QuantReport:
    method: str
    layers: list[LayerReport] = field(default_factory=list)
