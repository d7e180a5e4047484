"""Document-masked attention for packed training batches, applied from outside the model.

A packed row holds several documents (or conversations) back to back. With plain causal attention a
token would attend to the previous, unrelated documents; this wrapper adds the block-diagonal mask:
query i sees key j iff j <= i and segment_ids[i] == segment_ids[j]. The segment ids ride in
AttentionMetadata.backend_state["segment_ids"] [B, T] (DESIGN.md §7), which the trainer fills. Positions
are not reset per document: RoPE scores depend only on i - j, so a reset would change nothing but
rounding. Only the dense backend is wrapped; with a KV cache or without segment ids it is the inner
backend unchanged, so generation is unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minicpm4.attention import AttentionMetadata, DenseAttention
from minicpm4.model import MiniCPMForCausalLM


class DocumentMaskedAttention:
    needs_pre_rope = False

    def __init__(self, inner: DenseAttention) -> None:
        self.inner = inner

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        seg = meta.backend_state.get("segment_ids")
        if seg is None or meta.kv_cache is not None:
            return self.inner(layer_idx, q, k, v, meta)
        if "document_mask" not in meta.backend_state:  # built once per forward, shared by every layer
            T = q.shape[2]
            if bool((seg == seg[:, :1]).all()):
                mask = None  # one document per row: the plain causal kernel is faster
            else:
                causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
                mask = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]  # [B, 1, T, T]
            meta.backend_state["document_mask"] = mask
        mask = meta.backend_state["document_mask"]
        if mask is None:
            return self.inner(layer_idx, q, k, v, meta)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def enable_document_mask(model: MiniCPMForCausalLM) -> bool:
    """Wrap the model's dense backend; False (and unchanged) for any other backend, e.g. InfLLM v2."""
    backend = model.attention_backend
    if isinstance(backend, DocumentMaskedAttention):
        return True
    if isinstance(backend, DenseAttention):
        model.attention_backend = DocumentMaskedAttention(backend)
        return True
    return False


def segment_ids_from_bos(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """[B, T] -> [B, T]: a new segment starts at every BOS (documents are stored as [BOS] tokens [EOS])."""
    return (input_ids == bos_token_id).cumsum(dim=1)
