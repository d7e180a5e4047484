"""Per-step attention metadata: built once per forward call and handed to every layer (DESIGN §7).

Everything a backend needs about the step is a typed field here, computed once by whoever builds the
step (the model for the reference path, the engine's runner for the paged path), so no layer has to
synchronise with the device to learn a length. Per-layer hand-overs (InfLLM v2's pre-RoPE q/k) are
call arguments of the backend, not fields: they change every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for annotations: the cache modules import nothing from here
    from minicpm4.attention.paged import PagedBatch
    from minicpm4.kv_cache import StaticKVCache


@dataclass
class AttentionMetadata:
    # [B, T] absolute position of every query token. With a StaticKVCache it is also the key's slot;
    # with a paged cache the slot is `paged.slot_mapping` (a slot is not a position once pages exist).
    positions: torch.Tensor
    # None: a plain causal forward over the T tokens (training, one-shot scoring).
    kv_cache: StaticKVCache | None = None
    # StaticKVCache only, host ints computed once per call: keys visible after this call's write
    # (max position + 1), and the common start position when every row writes the same slot range.
    num_keys: int | None = None
    uniform_start: int | None = None
    # Packed training rows: [B, T] document index of every token, and the derived block-diagonal causal
    # mask [B, 1, T, T] (None = one document per row); see attention/document_mask.py.
    segment_ids: torch.Tensor | None = None
    document_mask: torch.Tensor | None = None
    # The engine's paged step (ragged sequences packed into one row); see attention/paged.py.
    paged: PagedBatch | None = None

    @classmethod
    def for_cache(cls, positions: torch.Tensor, kv_cache: StaticKVCache | None) -> AttentionMetadata:
        """Metadata of a reference-path call; with a cache, its lengths are read off `positions` once."""
        if kv_cache is None:
            return cls(positions=positions)
        B, T = positions.shape
        start = positions[:, :1]
        uniform = bool((positions == start + torch.arange(T, device=positions.device)).all()) and \
            bool((start == start[0]).all())
        return cls(positions=positions, kv_cache=kv_cache, num_keys=int(positions.max()) + 1,
                   uniform_start=int(start[0, 0]) if uniform else None)

    @property
    def is_decode(self) -> bool:
        return self.positions.shape[1] == 1
