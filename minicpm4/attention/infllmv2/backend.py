"""InfLLM v2 behind the attention seam: prefill, chunked prefill, decode, draft verification, training.

The model calls `backend(layer_idx, q, k, v, meta, pre_rope)` with post-RoPE q [B, Hq, T, D] and the new k/v
[B, Hkv, T, D]. With a KV cache this backend writes it, keeps the layer's compressed keys up to date
(compressed_cache.py; they live on `kv_cache.backend_state["infllmv2"]`), and attends each row.
Without a cache (training, one-shot scoring) the T tokens are the whole context and the one-shot
`infllmv2_attention` runs, differentiable through stage 2.

Dense or sparse is decided per QUERY: a query at position i is sparse iff its kv length i + 1 >=
dense_len (dense_len -1 or 0: always sparse). The remote code decides per call from the call's
largest position, so a long one-shot prefill also runs its early queries sparse while a chunked or
token-by-token run of the same text runs them dense. Deciding per query makes a query's output a
function of its own prefix only: chunked prefill == one-shot, decode at p == prefill at p, and
crossing dense_len during generation needs no special case: the first sparse query of a layer
bootstraps the compressed keys from the whole cache (as the remote code does on the crossing decode
step), later queries extend them (MINICPM4.md §3.7). The two rules differ only for queries in
[budget tokens, dense_len) of a prompt longer than dense_len; with the README defaults (96 blocks =
6144 tokens, dense_len 8192) those are positions 6144 .. 8190.

Rows are handled one at a time because 4a's selection and stage 2 take one sequence; rows may sit
at different positions (right-padded batches, see kv_cache.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpm4.attention.dense import GROUPED_MATMUL_MAX_QUERIES, DenseAttention, PreRope, grouped_attention
from minicpm4.attention.infllmv2.compressed_cache import CompressedKeyCache, LayerCompressedKeys
from minicpm4.attention.infllmv2.selection import select_blocks
from minicpm4.attention.infllmv2.settings import InfLLMv2Settings, settings_from_config
from minicpm4.attention.infllmv2.sparse_attention import infllmv2_attention, sparse_attention
from minicpm4.attention.metadata import AttentionMetadata
from minicpm4.config import MiniCPMConfig
from minicpm4.kv_cache import StaticKVCache

STATE_KEY = "infllmv2"  # key of this backend's state in StaticKVCache.backend_state


def num_dense_queries(dense_len: int, num_queries: int) -> int:
    """Queries at positions 0 .. T-1 with kv length i + 1 < dense_len: a prefix of length dense_len - 1."""
    return min(max(dense_len - 1, 0), num_queries)


def dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One row, causal over slots: q [Hq, T, D] at positions [T], k/v [Hkv, S, D] -> [Hq, T, D]."""
    mask = torch.arange(k.shape[1], device=k.device)[None, :] <= positions[:, None]  # [T, S]
    if q.shape[1] <= GROUPED_MATMUL_MAX_QUERIES:  # decode: grouped matmul (dense.py says why)
        return grouped_attention(q[None], k[None], v[None], mask[None])[0]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None, None], enable_gqa=True)[0]


class InfLLMv2Attention:
    """The `infllmv2` attention backend (registered in minicpm4.attention.BACKENDS)."""

    def __init__(self, settings: InfLLMv2Settings) -> None:
        self.settings = settings
        # use_nope: blocks are selected with pre-RoPE q/k (MINICPM4.md §3.2); the model hands them over.
        self.needs_pre_rope = settings.use_nope
        self.dense = DenseAttention()

    def sparse_queries(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: which queries run sparse (kv length position + 1 >= dense_len)."""
        return positions + 1 >= self.settings.dense_len

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata, pre_rope: PreRope | None = None) -> torch.Tensor:
        if self.needs_pre_rope and pre_rope is None:
            raise RuntimeError("InfLLM v2 use_nope needs the pre-RoPE q/k (the `pre_rope` argument)")
        pre_rope = pre_rope if self.needs_pre_rope else None
        if meta.kv_cache is None:
            return self.forward_no_cache(q, k, v, meta, pre_rope)
        return self.forward_cached(layer_idx, q, k, v, meta, pre_rope)

    # ---- training / one-shot: the T tokens are the whole context --------------------------------
    def forward_no_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                         pre_rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, Hq, T, D = q.shape
        d = num_dense_queries(self.settings.dense_len, T)
        if d == T:
            return self.dense(0, q, k, v, meta)
        # Keys are these T tokens at relative positions 0 .. T-1 (as the dense backend assumes).
        positions = torch.arange(d, T, device=q.device)
        outs = []
        for b in range(B):
            q_sel = None if pre_rope is None else pre_rope[0][b, :, d:]
            k_sel = None if pre_rope is None else pre_rope[1][b]
            outs.append(infllmv2_attention(q[b, :, d:], k[b], v[b], positions, self.settings,
                                           q_select=q_sel, k_select=k_sel))
        sparse = torch.stack(outs)  # [B, Hq, T - d, D]
        if d == 0:
            return sparse
        dense = F.scaled_dot_product_attention(q[:, :, :d], k[:, :, :d], v[:, :, :d], is_causal=True, enable_gqa=True)
        return torch.cat([dense, sparse], dim=2)

    # ---- inference over a StaticKVCache ----------------------------------------------------------
    def state(self, cache: StaticKVCache) -> CompressedKeyCache:
        s = self.settings
        coarse = s.lse == "coarse"
        st = cache.backend_state.get(STATE_KEY)
        if st is None:
            st = CompressedKeyCache(
                batch_size=cache.batch_size, num_kv_heads=cache.k[0].shape[1], max_seq_len=cache.max_seq_len,
                head_dim=cache.k[0].shape[3], kernel_size=s.kernel_size, kernel_stride=s.kernel_stride,
                coarse_kernel_size=s.coarse_kernel_size if coarse else None,
                coarse_kernel_stride=s.coarse_kernel_stride if coarse else None, use_nope=s.use_nope)
            cache.backend_state[STATE_KEY] = st
        assert (st.kernel_size, st.kernel_stride, st.use_nope, st.coarse_kernel_size is not None) == (
            s.kernel_size, s.kernel_stride, s.use_nope, coarse), "a KV cache is used with two InfLLM v2 settings"
        return st

    def forward_cached(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       meta: AttentionMetadata, pre_rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        cache, positions = meta.kv_cache, meta.positions  # positions [B, T]
        layer = self.state(cache).layer(layer_idx, k.device, cache.k[layer_idx].dtype)
        # This call overwrites slots >= each row's first position: forget what was derived from them
        # (rejected drafts, a reused row) before anything reads the state. See compressed_cache.py.
        for row, first in enumerate(positions.min(dim=1).values.tolist()):
            layer.truncate(row, first)
        if pre_rope is not None:
            layer.write_pre_rope(pre_rope[1], positions)
        sparse = self.sparse_queries(positions)  # [B, T]
        if not bool(sparse.any()):
            return self.dense(layer_idx, q, k, v, meta)
        keys, values = cache.update(layer_idx, k, v, meta)  # [B, Hkv, S, D], S = largest end
        source = cache.k[layer_idx] if pre_rope is None else layer.pre_rope_k  # keys that are compressed
        q_sel = q if pre_rope is None else pre_rope[0]
        out = torch.empty_like(q)
        ends = (positions.max(dim=1).values + 1).tolist()
        for row, end in enumerate(ends):
            pos, is_sparse = positions[row], sparse[row]
            k_row, v_row = keys[row, :, :end], values[row, :, :end]
            # (q[row][:, idx], not q[row, :, idx]: mixed int/tensor indexing would move the T axis first)
            dense_idx = (~is_sparse).nonzero().squeeze(1)
            if dense_idx.numel():
                out[row][:, dense_idx] = dense_rows(q[row][:, dense_idx], k_row, v_row, pos[dense_idx])
            sparse_idx = is_sparse.nonzero().squeeze(1)
            if sparse_idx.numel():
                out[row][:, sparse_idx] = self.attend_sparse(layer, row, q[row][:, sparse_idx], q_sel[row][:, sparse_idx],
                                                             source[row, :, :end], k_row, v_row, pos[sparse_idx])
        return out

    def attend_sparse(self, layer: LayerCompressedKeys, row: int, q: torch.Tensor, q_sel: torch.Tensor,
                      source: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One row: q/q_sel [Hq, T, D], source/k/v [Hkv, L, D] (slots 0 .. L-1), positions [T] -> [Hq, T, D]."""
        c1 = layer.c1.up_to(row, source)  # [Hkv, n1, D]: bootstrap on the first sparse call, then the new windows
        c2 = None if layer.c2 is None else layer.c2.up_to(row, source)
        block_idx = select_blocks(q_sel, c1, c2, positions, k.shape[1], self.settings)  # [Hkv, T, K]
        return sparse_attention(q, k, v, positions, block_idx, self.settings)


def make_infllmv2_backend(config: MiniCPMConfig) -> InfLLMv2Attention:
    """BACKENDS["infllmv2"]: settings from the config's sparse_config. Two optional extra keys of
    sparse_config pick among the public implementations (settings.py, MINICPM4.md §3.4): "variant"
    (a BUDGET_VARIANTS name; default "hf", the MiniCPM4 remote code) and "lse" ("exact", the remote
    code's normaliser over C1, default; or "coarse", CPM.cu's over C2)."""
    sparse = config.sparse_config
    variant = sparse.extra.get("variant", "hf")
    lse = sparse.extra.get("lse", "exact")
    return InfLLMv2Attention(settings_from_config(sparse, variant=variant, lse=lse))

