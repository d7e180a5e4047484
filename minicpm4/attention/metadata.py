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
    # Per-backend state that lives as long as the cache (e.g. InfLLM v2 compressed-key caches).
    backend_state: dict[str, Any] = field(default_factory=dict)

    @property
    def is_decode(self) -> bool:
        return self.positions.shape[1] == 1
