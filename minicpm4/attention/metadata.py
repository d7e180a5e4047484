"""Per-step attention metadata: built once per forward call and handed to every layer (DESIGN §7)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from minicpm4.kv_cache import StaticKVCache


@dataclass
class AttentionMetadata:
    # [B, T] absolute position of every query token; also the slot its key/value takes in the cache.
    positions: torch.Tensor
    # None: a plain causal forward over the T tokens (training, one-shot scoring).
    kv_cache: StaticKVCache | None = None
    # Per-call hand-over from the model to the backend (e.g. pre-RoPE q/k for InfLLM v2 use_nope).
    # State that must outlive the call (InfLLM v2 compressed keys) lives on `kv_cache.backend_state`.
    backend_state: dict[str, Any] = field(default_factory=dict)

    @property
    def is_decode(self) -> bool:
        return self.positions.shape[1] == 1
