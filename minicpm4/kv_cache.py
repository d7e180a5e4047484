"""A static (preallocated) KV cache: slot index == token position, per batch row (gpt-fast style).

Rows of a batch may be at different positions (prompts of different lengths, right-padded). A query
at position p only sees slots <= p, so slots written by padding are overwritten before any query can
see them: no padding mask is ever needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from minicpm4.attention.metadata import AttentionMetadata


class StaticKVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)  # [B, Hkv, S, D]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        # What an attention backend derives from these K/V and must keep across calls (InfLLM v2's
        # compressed keys, keyed by backend name): it lives and dies with the cache it summarises.
        self.backend_state: dict[str, Any] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int) -> StaticKVCache:
        cfg = model.config
        # The model's activation dtype (its embedding's), not its first parameter's: packed weights are integers.
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim,
                   dtype=model.dtype, device=model.device)

    def update(self, layer_idx: int, k_new: torch.Tensor, v_new: torch.Tensor,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at `meta.positions` [B, T]; return the cache up to the last used slot.
        The lengths come from the metadata (computed once per call, not once per layer)."""
        positions = meta.positions
        B, T = positions.shape
        if B != self.batch_size:
            raise ValueError(f"batch of {B} rows does not fit a KV cache built for {self.batch_size}")
        end = meta.num_keys
        assert end is not None, "AttentionMetadata for a StaticKVCache must be built with for_cache()"
        if end > self.max_seq_len:
            raise ValueError(f"position {end - 1} exceeds the KV cache length {self.max_seq_len}")
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        if meta.uniform_start is not None:  # common case: every row at the same offset
            s = meta.uniform_start
            k_cache[:, :, s:s + T] = k_new
            v_cache[:, :, s:s + T] = v_new
        else:
            rows = torch.arange(B, device=positions.device)[:, None]  # [B, 1]
            k_cache[rows, :, positions] = k_new.transpose(1, 2)  # indexed view is [B, T, Hkv, D]
            v_cache[rows, :, positions] = v_new.transpose(1, 2)
        return k_cache[:, :, :end], v_cache[:, :, :end]
