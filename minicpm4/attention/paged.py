"""Paged attention behind the seam: the engine's KV pool and the per-step description of a packed batch.

The engine packs the tokens of every scheduled sequence into one row (ragged, "varlen"): the model
sees input_ids [1, N] and this backend sees q [1, Hq, N, D]. `PagedBatch` says which rows belong to
which sequence, where each new key goes (`slot_mapping`: slot = page * block_size + offset; a slot is
not a position), and where each sequence's earlier keys live (`block_tables`). It is built once per
step by the engine's runner (engine/runner.py), never by a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.attention.dense import PreRope
from minicpm4.attention.metadata import AttentionMetadata


class PagedKVCache:
    """K/V pools per layer, [num_blocks, Hkv, block_size, D]: one page of one KV head is a contiguous
    block_size x D tile, what the kernel reads in place."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class PagedBatch:
    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [N] int64: where each new token's K/V is written
    positions: torch.Tensor  # [N] int64: each query's position (it sees keys 0 .. position of its sequence)
    block_tables: torch.Tensor  # [S, max_pages] int32, padded with 0 (never read past a context)
    query_start_loc: torch.Tensor  # [S + 1] int32: sequence s owns rows query_start_loc[s] : [s + 1]
    context_lens: torch.Tensor  # [S] int32: keys of each sequence after this step's write
    query_lens_host: list[int]  # the same lengths as Python ints (no device sync to read them)
    context_lens_host: list[int]
    block_tables_host: list[list[int]] | None = None  # the page ids as Python ints (InfLLM v2 bookkeeping)


class PagedAttention:
    """The engine's dense backend: write this step's K/V into the pool, attend through block tables."""

    needs_pre_rope = False

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata, pre_rope: PreRope | None = None) -> torch.Tensor:
        batch = meta.paged
        assert batch is not None and q.shape[0] == 1, "PagedAttention runs the engine's packed [1, N] batches"
        out = self.attend(layer_idx, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), batch)
        return out.transpose(0, 1)[None]  # [1, Hq, N, D]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: PagedBatch) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] (post-RoPE) -> [N, Hq, D]: the packed form FastDecoder calls."""
        from minicpm4.attention.paged_attention import paged_attention, write_kv

        k_pool, v_pool = batch.cache.k[layer_idx], batch.cache.v[layer_idx]
        write_kv(k_pool, v_pool, k, v, batch.slot_mapping)
        return paged_attention(q.contiguous(), k_pool, v_pool, batch.block_tables, batch.query_start_loc,
                               batch.context_lens, batch.positions)
