"""Paged attention for the engine: varlen queries against a block-paged KV cache.

Cache (per layer): k_cache / v_cache [num_blocks, Hkv, B, D], fp32 or bf16; one block-head is a
contiguous [B, D] tile. Sequence s's key at position j lives in block block_tables[s, j // B] at
offset j % B. A step's queries are packed over sequences: q [N, Hq, D], sequence s owns rows
query_start_loc[s] : query_start_loc[s + 1], and row i (absolute position positions[i]) sees the keys
of its own sequence at positions 0 .. positions[i] (causal; keys 0 .. context_lens[s] - 1 exist, so
positions[i] < context_lens[s]). GQA: query head h reads KV head h // (Hq // Hkv). Scale 1/sqrt(D),
softmax in fp32, output in q's dtype. Decode rows, prefill chunks and speculative verification rows are
all just rows; a slot (block * B + offset) is where write_kv puts a token's key/value.

Draft trees (speculative verification, optional): tree_base int64 [S] (-1: none) and tree_mask int64 [N]. Keys
of sequence s from index tree_base[s] on are draft-tree nodes: row i sees such a key j only if bit
j - tree_base[s] of tree_mask[i] is set (its ancestors and itself; at most 64 nodes), on top of j <= positions[i]
(the tree's rows pass the last tree slot as their position). CPM.cu packs the same uint64 ancestor rows.

Types: block_tables int32 [S, max_blocks] (entries past a sequence's context are never read and may
hold anything); query_start_loc int32 [S + 1]; context_lens int32 [S]; positions int64 [N].
query_start_loc and context_lens may also be Python int lists: the PyTorch paths need them as Python
ints (one slice per sequence), so a GPU caller that already holds them as lists (the scheduler does)
avoids two device syncs; the CPU kernel takes either (a list becomes a small int32 tensor).

  paged_attention_reference  the spec: per sequence, gather keys [Hkv, L, D], mask, fp32 softmax.
  paged_attention            impl="auto": the C++ kernel (paged_kernel.py) for CPU fp32/bf16 tensors
                             when it is built, else the PyTorch path below; "kernel" / "torch" force one.
  paged_attention_torch      decode rows batched per context-length bucket through dense.grouped_attention
                             (the G query heads as rows of one matmul), prefill chunks one sequence at a
                             time (grouped matmul for short chunks, SDPA for long ones, as dense.py).
  write_kv                   the cache write (index_copy_ into a [num_blocks * Hkv * B, D] view; on the CPU
                             the kernel's row memcpy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from minicpm4.attention import paged_kernel
from minicpm4.attention.dense import GROUPED_MATMUL_MAX_QUERIES, grouped_attention

IntsLike = torch.Tensor | Sequence[int]
IMPLS = ("auto", "kernel", "torch")
# Decode rows are batched in buckets whose longest context is at most this factor times the shortest,
# bounding the padding a batched gather pays (contexts 16 .. 4096 in one step would otherwise pad 256x).
DECODE_BUCKET_RATIO = 2


def _ints(x: IntsLike) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else [int(i) for i in x]


def _gather(cache: torch.Tensor, table: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The first num_keys keys of one sequence: cache [NB, Hkv, B, D], table [>= ceil(L / B)] -> [Hkv, L, D]."""
    _, Hkv, B, D = cache.shape
    nb = -(-num_keys // B)
    blocks = cache[table[:nb].long()]  # [nb, Hkv, B, D]
    return blocks.transpose(0, 1).reshape(Hkv, nb * B, D)[:, :num_keys]


def _tree_visible(visible: torch.Tensor, rows_mask: torch.Tensor | None, base: int) -> torch.Tensor:
    """visible [T, L] & the draft-tree rule for keys base .. L - 1 (module docstring)."""
    if rows_mask is None or base < 0:
        return visible
    L = visible.shape[1]
    j = torch.arange(L, device=visible.device)
    bit = (j - base).clamp(min=0, max=63)
    in_tree = ((rows_mask[:, None] >> bit[None, :]) & 1).bool() & (j - base < 64)
    return visible & ((j < base)[None, :] | in_tree)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, query_start_loc: IntsLike, context_lens: IntsLike,
                              positions: torch.Tensor, tree_mask: torch.Tensor | None = None,
                              tree_base: IntsLike | None = None) -> torch.Tensor:
    """The spec (module docstring): q [N, Hq, D] -> out [N, Hq, D] in q's dtype, computed in fp32."""
    N, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    qsl, ctx = _ints(query_start_loc), _ints(context_lens)
    out = torch.zeros_like(q)
    for s, L in enumerate(ctx):
        a, b = qsl[s], qsl[s + 1]
        if a == b:
            continue
        k = _gather(k_cache, block_tables[s], L).float().repeat_interleave(Hq // Hkv, dim=0)  # [Hq, L, D]
        v = _gather(v_cache, block_tables[s], L).float().repeat_interleave(Hq // Hkv, dim=0)
        scores = q[a:b].float().transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(D)  # [Hq, T, L]
        visible = torch.arange(L, device=q.device)[None, :] <= positions[a:b, None]  # [T, L]
        if tree_mask is not None:
            visible = _tree_visible(visible, tree_mask[a:b], _ints(tree_base)[s])
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[a:b] = (probs @ v).transpose(0, 1).to(q.dtype)
    return out


def _gather_tiles(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """cache [NB, Hkv, B, D], table [..., nb] (valid block ids) -> [..., Hkv, nb * B, D] in ONE gather copy:
    (block, head) tiles are indexed in the order the output wants, so the reshape after it is a view."""
    NB, Hkv, B, D = cache.shape
    idx = table[..., None, :].long() * Hkv + torch.arange(Hkv, device=table.device)[:, None]  # [..., Hkv, nb]
    return cache.view(NB * Hkv, B, D)[idx].flatten(-3, -2)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    # CPU bf16 matmul is far slower than fp32 without AMX (blocksparse.py's note): gather straight into fp32.
    return torch.float32 if q.device.type == "cpu" else q.dtype


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, query_start_loc: IntsLike, context_lens: IntsLike,
                          positions: torch.Tensor, tree_mask: torch.Tensor | None = None,
                          tree_base: IntsLike | None = None) -> torch.Tensor:
    """The PyTorch fast path (any device): same contract as paged_attention_reference."""
    N, Hq, D = q.shape
    _, Hkv, B, _ = k_cache.shape
    qsl, ctx = _ints(query_start_loc), _ints(context_lens)
    bases = _ints(tree_base) if tree_mask is not None else [-1] * len(ctx)
    cdt = _compute_dtype(q)
    out = torch.empty_like(q)
    decode = sorted((L, s) for s, L in enumerate(ctx) if qsl[s + 1] - qsl[s] == 1 and bases[s] < 0)
    i = 0
    while i < len(decode):  # buckets of decode rows with similar contexts: one padded gather + grouped matmul each
        j = i + 1
        while j < len(decode) and decode[j][0] <= DECODE_BUCKET_RATIO * max(decode[i][0], B):
            j += 1
        seqs = [s for _, s in decode[i:j]]
        nb = -(-decode[j - 1][0] // B)
        sel = torch.tensor(seqs, device=q.device)
        lens = torch.tensor([ctx[s] for s in seqs], device=q.device)
        table = block_tables[sel, :nb].long()
        table = torch.where(torch.arange(nb, device=q.device) < (lens[:, None] + B - 1) // B, table, 0)  # pads: block 0
        rows = torch.tensor([qsl[s] for s in seqs], device=q.device)
        k, v = _gather_tiles(k_cache, table).to(cdt), _gather_tiles(v_cache, table).to(cdt)  # [b, Hkv, Lpad, D]
        slots = torch.arange(nb * B, device=q.device)
        pos = positions[rows]
        mask = (slots[None, :] <= pos[:, None]) & (slots[None, :] < lens[:, None])  # [b, Lpad]
        o = grouped_attention(q[rows].to(cdt)[:, :, None], k, v, mask[:, None])  # [b, Hq, 1, D]
        out[rows] = o[:, :, 0].to(q.dtype)
        i = j
    for s, L in enumerate(ctx):  # prefill / multi-token chunks: one sequence at a time
        a, b = qsl[s], qsl[s + 1]
        if b - a < 1 or (b - a == 1 and bases[s] < 0):
            continue
        nb = -(-L // B)
        k = _gather_tiles(k_cache, block_tables[s, :nb])[None, :, :L].to(cdt)  # [1, Hkv, L, D]
        v = _gather_tiles(v_cache, block_tables[s, :nb])[None, :, :L].to(cdt)
        qs = q[a:b].to(cdt).transpose(0, 1)[None]  # [1, Hq, T, D]
        mask = torch.arange(L, device=q.device)[None, :] <= positions[a:b, None]  # [T, L]
        mask = _tree_visible(mask, tree_mask[a:b] if tree_mask is not None else None, bases[s])[None]  # [1, T, L]
        if b - a <= GROUPED_MATMUL_MAX_QUERIES:
            o = grouped_attention(qs, k, v, mask)
        else:
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask[:, None], enable_gqa=True)
        out[a:b] = o[0].transpose(0, 1).to(q.dtype)
    return out


def _int64(x: IntsLike) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.int64)
    return t.to(torch.int64).contiguous()


def _int32(x: IntsLike) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.int32)
    return t.to(torch.int32).contiguous()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: IntsLike, context_lens: IntsLike, positions: torch.Tensor, *,
                    impl: str = "auto", threads: int | None = None, tree_mask: torch.Tensor | None = None,
                    tree_base: IntsLike | None = None) -> torch.Tensor:
    """Same contract as paged_attention_reference. impl: "auto" (kernel when paged_kernel.supports, else
    torch), "kernel", "torch". threads: kernel worker threads (default torch.get_num_threads())."""
    if impl not in IMPLS:
        raise ValueError(f"paged_attention impl must be one of {IMPLS}, got {impl!r}")
    use_kernel = impl == "kernel" or (impl == "auto" and paged_kernel.supports(q, k_cache))
    if not use_kernel:
        return paged_attention_torch(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, positions,
                                     tree_mask, tree_base)
    if not paged_kernel.supports(q, k_cache):
        raise RuntimeError("the paged attention CPU kernel does not apply here (not built, not CPU fp32/bf16 "
                           "tensors, head dim not a multiple of 16, or a non-contiguous cache tile)")
    return paged_kernel.forward(q, k_cache, v_cache, block_tables.to(torch.int32).contiguous(),
                                _int32(query_start_loc), _int32(context_lens),
                                positions.to(torch.int64).contiguous(), threads=threads,
                                tree_mask=None if tree_mask is None else tree_mask.to(torch.int64).contiguous(),
                                tree_base=None if tree_mask is None else _int64(tree_base))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write token i's k/v [N, Hkv, D] into slot slot_mapping[i] (int64 [N], block * B + offset, every slot valid)
    of k_cache / v_cache [num_blocks, Hkv, B, D], in place."""
    NB, Hkv, B, D = k_cache.shape
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if (k_cache.device.type == "cpu" and k.device.type == "cpu" and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k.stride(-1) == 1 and v.stride(-1) == 1 and paged_kernel.available()):
        paged_kernel.write_kv(k_cache, v_cache, k, v, slot_mapping.to(torch.int64).contiguous())
        return
    # row (block * Hkv + head) * B + offset of the [NB * Hkv * B, D] view, for every (token, head)
    rows = ((slot_mapping // B * Hkv)[:, None] + torch.arange(Hkv, device=k.device)) * B + (slot_mapping % B)[:, None]
    k_cache.view(NB * Hkv * B, D).index_copy_(0, rows.reshape(-1), k.reshape(-1, D))
    v_cache.view(NB * Hkv * B, D).index_copy_(0, rows.reshape(-1), v.reshape(-1, D))
