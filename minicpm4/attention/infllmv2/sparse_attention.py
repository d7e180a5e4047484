"""InfLLM v2 stage 2 (MINICPM4.md §3.3 step 9) and the one-shot layer pipeline.

stage2_mask is the rule, sparse_attention_reference is the spec (an explicitly masked dense softmax,
differentiable by plain autograd), sparse_attention is what callers use: it dispatches to the fastest
path that is tested against the spec (blocksparse.py; its own backward, so training works on CPU too).

Attended keys of query t at absolute position pos_t, block q_b = pos_t // B, KV group h:
    blocks in block_idx[h, t]  UNION  the separate window (blocks q_b - local_blocks + 1 .. q_b when
    local_mode = separate_window; nothing when forced_in_topk, whose local blocks are in block_idx)
    AND key position <= pos_t (causal; only bites inside the own block).
All G query heads of a group share the set. A row with no attended key outputs 0 (cannot happen for
select_blocks output: the own block is always in the window or forced in the top-k).
"""

from __future__ import annotations

import math

import torch

from minicpm4.attention.infllmv2 import cpu_kernel
from minicpm4.attention.infllmv2.blocksparse import BlockSparseAttention, blocksparse_forward, kernel_forward
from minicpm4.attention.infllmv2.compress import compress_keys
from minicpm4.attention.infllmv2.selection import num_blocks, select_blocks
from minicpm4.attention.infllmv2.settings import InfLLMv2Settings


def stage2_mask(positions: torch.Tensor, block_idx: torch.Tensor, num_keys: int, settings: InfLLMv2Settings) -> torch.Tensor:
    """[Hkv, T, L] bool: which keys each query of each KV group attends (module docstring)."""
    B = settings.block_size
    Hkv, T, _ = block_idx.shape
    nb = num_blocks(num_keys, B)
    dev = block_idx.device
    block_idx = block_idx.long()  # (int32 ids, as the CUDA kernels use, are accepted)
    chosen = torch.zeros(Hkv, T, nb + 1, dtype=torch.bool, device=dev)  # column nb swallows -1 / out-of-range
    valid = (block_idx >= 0) & (block_idx < nb)
    chosen.scatter_(2, torch.where(valid, block_idx, nb), True)
    key = torch.arange(num_keys, device=dev)
    kb, qb = key // B, (positions.to(dev) // B)[:, None]  # [L], [T, 1]
    window = (kb[None, :] > qb - settings.window_blocks) & (kb[None, :] <= qb)  # [T, L]; empty if 0 blocks
    causal = key[None, :] <= positions.to(dev)[:, None]
    return (chosen[:, :, kb] | window[None]) & causal[None]


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                               block_idx: torch.Tensor, settings: InfLLMv2Settings) -> torch.Tensor:
    """The spec: q [Hq, T, D], k/v [Hkv, L, D], positions [T], block_idx [Hkv, T, K] -> [Hq, T, D] (q.dtype).

    Dense fp32 scores over all L keys, masked by stage2_mask, softmax, weighted values. O(T x L) memory.
    """
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    G = Hq // Hkv
    mask = stage2_mask(positions, block_idx, L, settings).repeat_interleave(G, dim=0)  # [Hq, T, L]
    kf, vf = k.float().repeat_interleave(G, dim=0), v.float().repeat_interleave(G, dim=0)
    scores = torch.einsum("htd,hld->htl", q.float(), kf) / math.sqrt(D)
    empty = ~mask.any(-1, keepdim=True)  # rows with no key: uniform softmax over 0s, then zeroed (no NaN grads)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    probs = scores.softmax(-1).masked_fill(empty, 0.0)
    return torch.einsum("htl,hld->htd", probs, vf).to(q.dtype)


IMPLS = ("auto", "torch", "kernel")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     block_idx: torch.Tensor, settings: InfLLMv2Settings, impl: str = "auto") -> torch.Tensor:
    """Stage 2, same contract as sparse_attention_reference; differentiable w.r.t. q, k, v.

    Keys/values are slots 0 .. L-1 and must cover every query (L > positions.max()). block_idx rows
    may hold -1 (empty) anywhere; a repeated id counts once.
    impl: "torch" (blocksparse.py), "kernel" (the CPU kernel, cpu_kernel.py), "auto" = the kernel when
    it is built and the tensors are on the CPU (measured faster, benchmarks/infllmv2_layer.py), else torch.
    Backward is always blocksparse.py's recomputation.
    """
    if impl not in IMPLS:
        raise ValueError(f"sparse_attention impl must be one of {IMPLS}, got {impl!r}")
    if positions.numel() and int(positions.max()) >= k.shape[1]:
        raise ValueError(f"a query at position {int(positions.max())} needs keys up to it; got L = {k.shape[1]}")
    positions, block_idx = positions.to(q.device), block_idx.to(q.device, torch.long)
    use_kernel = impl == "kernel" or (impl == "auto" and cpu_kernel.supports(q, k, settings.block_size))
    if use_kernel and not cpu_kernel.supports(q, k, settings.block_size):
        raise RuntimeError("the InfLLM v2 CPU kernel is not available here (no C++ compiler, or not CPU tensors)")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return BlockSparseAttention.apply(q, k, v, positions, block_idx, settings, use_kernel)
    with torch.no_grad():
        fwd = kernel_forward if use_kernel else blocksparse_forward
        return fwd(q, k, v, positions, block_idx, settings)[0]


def infllmv2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       settings: InfLLMv2Settings, q_select: torch.Tensor | None = None,
                       k_select: torch.Tensor | None = None) -> torch.Tensor:
    """One-shot InfLLM v2 for one sequence: compress, select (no grad), attend (differentiable).

    q [Hq, T, D] at absolute positions [T]; k/v [Hkv, L, D] = every key up to positions.max() (cache +
    current tokens). q_select/k_select: what selection sees (pre-RoPE q/k for use_nope; default q/k).
    """
    q_sel = q if q_select is None else q_select
    k_sel = k if k_select is None else k_select
    with torch.no_grad():
        c1 = compress_keys(k_sel.detach(), settings.kernel_size, settings.kernel_stride)
        c2 = None
        if settings.lse == "coarse":
            c2 = compress_keys(k_sel.detach(), settings.coarse_kernel_size, settings.coarse_kernel_stride)
        block_idx = select_blocks(q_sel.detach(), c1, c2, positions, k.shape[1], settings)
    return sparse_attention(q, k, v, positions, block_idx, settings)
