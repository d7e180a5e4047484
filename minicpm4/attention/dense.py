"""Dense causal attention over the KV cache: the default backend and the reference for every other one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minicpm4.attention.metadata import AttentionMetadata

# Pre-RoPE (q, k) of one layer, handed to backends that select with them (InfLLM v2 use_nope).
PreRope = tuple[torch.Tensor, torch.Tensor]

# Below this many query tokens, the "group's query heads as rows of one matmul" path is used: PyTorch
# SDPA with enable_gqa is ~20x slower for a single query on CPU in bf16 (measured: 14 ms vs 0.7 ms,
# 16 heads on one KV head, 8K keys). Prefill goes through SDPA, which is fast for long queries.
GROUPED_MATMUL_MAX_QUERIES = 16


def visible_mask(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, T, S] bool: key slot j is visible to the query at position p iff j <= p."""
    slots = torch.arange(num_keys, device=positions.device)
    return slots[None, None, :] <= positions[:, :, None]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B, T, S] -> [B, Hq, T, D].

    The G query heads of one KV head become G*T rows of one matmul against that head's keys,
    so K/V are never repeated. Softmax in fp32.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))  # [B, Hkv, G*T, S]
    scores = scores.view(B, Hkv, G, T, S).masked_fill(~mask[:, None, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(B, Hkv, G * T, S)
    return torch.matmul(probs, v).view(B, Hq, T, D)


class DenseAttention:
    """Causal softmax attention. Writes the new keys/values into the cache when there is one."""

    needs_pre_rope = False

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata, pre_rope: PreRope | None = None) -> torch.Tensor:
        T = q.shape[2]
        if meta.kv_cache is None:  # plain causal forward over exactly these T tokens
            if T <= GROUPED_MATMUL_MAX_QUERIES:
                return grouped_attention(q, k, v, visible_mask(meta.positions - meta.positions[:, :1], T))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        k, v = meta.kv_cache.update(layer_idx, k, v, meta)
        mask = visible_mask(meta.positions, k.shape[2])
        if T <= GROUPED_MATMUL_MAX_QUERIES:
            return grouped_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
