"""Attention backends behind one seam.

The model calls `backend(layer_idx, q, k, v, meta, pre_rope)` with post-RoPE q [B, Hq, T, D] and the
new k/v [B, Hkv, T, D]; the backend owns cache writes and the attention itself. A backend that selects
with pre-RoPE q/k (InfLLM v2 `use_nope`) sets `needs_pre_rope` and receives them as `pre_rope`.
A model's backend is changed only through `MiniCPMForCausalLM.set_attention_backend`.
New backends register a factory in BACKENDS; `make_backend(config)` picks one from the config.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from minicpm4.attention.dense import DenseAttention, PreRope
from minicpm4.attention.metadata import AttentionMetadata
from minicpm4.config import MiniCPMConfig


class AttentionBackend(Protocol):
    needs_pre_rope: bool

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata, pre_rope: PreRope | None = None) -> torch.Tensor: ...


def _infllmv2(config: MiniCPMConfig) -> AttentionBackend:
    from minicpm4.attention.infllmv2.backend import make_infllmv2_backend  # imported on use: keeps dense light

    return make_infllmv2_backend(config)


BACKENDS: dict[str, Callable[[MiniCPMConfig], AttentionBackend]] = {
    "dense": lambda config: DenseAttention(),
    "infllmv2": _infllmv2,
}


def make_backend(config: MiniCPMConfig) -> AttentionBackend:
    """InfLLM v2 when the config carries `sparse_config` (never a silent dense fallback), else dense."""
    return BACKENDS["infllmv2" if config.sparse_config is not None else "dense"](config)


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "DenseAttention", "PreRope", "make_backend"]
