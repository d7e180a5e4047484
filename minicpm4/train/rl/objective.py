"""The RL objective of MINICPM4.md §7.3: GRPO group advantages with the DAPO stabilisers and chunk-level
importance sampling.

    J = (1 / Σ_i |o_i|) Σ_i Σ_t  clip_term(r_it, Â_i)  −  β · KL(π_θ ‖ π_ref)

- Â_i = (R_i − mean(R_group)) / (std(R_group) + eps), the same for every token of response i.
- r_it = π_θ(o_it) / π_behaviour(o_it), where π_behaviour is the policy version that generated the chunk
  holding token t (its log-probs were stored when that chunk was made: buffers.py).
- clip_term = min(r·Â, clip(r, 1 − ε_low, 1 + ε_high)·Â) (clip-higher: ε_high > ε_low), and for Â < 0 only
  additionally max(·, c·Â) (dual-clip, c > 1). The report prints the max without the sign condition; for Â > 0 it
  would make the term constant, so the standard sign-conditioned form is used.
- KL per token with the k3 estimator exp(ref − θ) − (ref − θ) − 1 (non-negative, unbiased), β = 0.001.
- Token-level normalisation: the sum runs over every kept token of the batch and is divided by their count, so
  long responses weigh per token, not per response. Responses filtered out (overlong-truncated, garbled) have
  mask 0 and add neither loss nor count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO's clip-higher
    dual_clip: float = 3.0  # c of dual-clip, applied where the advantage is negative
    kl_beta: float = 0.001

    def __post_init__(self) -> None:
        if not 0 < self.eps_low < 1 or self.eps_high <= 0:
            raise ValueError("eps_low must be in (0, 1) and eps_high > 0")
        if self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards [groups, G] -> advantages [groups, G]: standardised within each group (GRPO)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def clipped_surrogate(ratio: torch.Tensor, advantage: torch.Tensor, cfg: ClipConfig) -> torch.Tensor:
    """Per-token objective (to maximise): clip-higher, then dual-clip where the advantage is negative."""
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * advantage
    term = torch.minimum(unclipped, clipped)
    return torch.where(advantage < 0, torch.maximum(term, cfg.dual_clip * advantage), term)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    delta = ref_logp - logp
    return delta.exp() - delta - 1


@dataclass
class LossStats:
    loss: float
    policy_objective: float  # mean clipped term per kept token
    kl: float  # mean k3 KL per kept token
    clip_fraction: float  # kept tokens whose ratio left [1 - eps_low, 1 + eps_high]
    ratio_mean: float
    tokens: int


def policy_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                advantage: torch.Tensor, mask: torch.Tensor, cfg: ClipConfig,
                total_tokens: int | None = None) -> tuple[torch.Tensor, LossStats]:
    """All [B, T] (advantage broadcast per row, mask 1 on kept response tokens). total_tokens: the
    normaliser Σ|o_i| over the whole batch when this is one mini-batch of it (default: mask.sum())."""
    mask = mask.to(logp.dtype)
    count = int(mask.sum().item())
    norm = float(total_tokens if total_tokens is not None else max(count, 1))
    ratio = (logp - behaviour_logp).exp()
    objective = clipped_surrogate(ratio, advantage, cfg)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None and cfg.kl_beta > 0 else torch.zeros_like(logp)
    per_token = -objective + cfg.kl_beta * kl
    loss = (per_token * mask).sum() / norm
    with torch.no_grad():
        denom = max(count, 1)
        outside = ((ratio < 1 - cfg.eps_low) | (ratio > 1 + cfg.eps_high)).to(logp.dtype)
        stats = LossStats(float(loss), float((objective * mask).sum() / denom), float((kl * mask).sum() / denom),
                          float((outside * mask).sum() / denom), float((ratio * mask).sum() / denom), count)
    return loss, stats


# ---- which responses train ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GarbleFilter:
    """A response is garbled (excluded from the loss, §7.3; the report's detector is not published) when
    - one token makes up more than `max_token_share` of a response of at least `min_tokens` tokens, or
    - the same `ngram`-token sequence repeats so that distinct n-grams are fewer than `min_distinct_ngrams`
      of all n-grams (a loop), or
    - its decoded text has more than `max_replacement_share` U+FFFD characters (broken byte sequences).
    """
    min_tokens: int = 32
    max_token_share: float = 0.5
    ngram: int = 4
    min_distinct_ngrams: float = 0.3
    max_replacement_share: float = 0.05

    def is_garbled(self, tokens: list[int], text: str | None = None) -> bool:
        if text and text.count("\ufffd") > self.max_replacement_share * len(text):
            return True
        if len(tokens) < self.min_tokens:
            return False
        if max(tokens.count(t) for t in set(tokens)) > self.max_token_share * len(tokens):
            return True
        grams = [tuple(tokens[i:i + self.ngram]) for i in range(len(tokens) - self.ngram + 1)]
        return len(set(grams)) < self.min_distinct_ngrams * len(grams)
