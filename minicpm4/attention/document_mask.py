"""Document-masked attention for packed training batches, applied from outside the model.

A packed row holds several documents (or conversations) back to back. With plain causal attention a
token would attend to the previous, unrelated documents; this wrapper adds the block-diagonal mask:
query i sees key j iff j <= i and segment_ids[i] == segment_ids[j]. The segment ids ride in
AttentionMetadata.segment_ids [B, T] (DESIGN.md §7); the trainer builds the metadata once per forward
with `document_metadata`, which also derives the mask, so no layer rebuilds it. Positions
are not reset per document: RoPE scores depend only on i - j, so a reset would change nothing but
rounding. Only the dense backend is wrapped; with a KV cache or without segment ids it is the inner
backend unchanged, so generation is unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import TYPE_CHECKING

from minicpm4.attention.dense import DenseAttention, PreRope
from minicpm4.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from minicpm4.model import MiniCPMForCausalLM


class DocumentMaskedAttention:
    needs_pre_rope = False

    def __init__(self, inner: DenseAttention) -> None:
        self.inner = inner

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata, pre_rope: PreRope | None = None) -> torch.Tensor:
        if meta.document_mask is None or meta.kv_cache is not None:
            return self.inner(layer_idx, q, k, v, meta, pre_rope)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=meta.document_mask, enable_gqa=True)


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, T] segment ids -> [B, 1, T, T] block-diagonal causal mask, or None for one document per row
    (the plain causal kernel is faster then)."""
    if bool((segment_ids == segment_ids[:, :1]).all()):
        return None
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


def document_metadata(positions: torch.Tensor, segment_ids: torch.Tensor | None) -> AttentionMetadata:
    """Metadata of one training forward over packed rows (no KV cache)."""
    if segment_ids is None:
        return AttentionMetadata(positions=positions)
    return AttentionMetadata(positions=positions, segment_ids=segment_ids, document_mask=document_mask(segment_ids))


def enable_document_mask(model: MiniCPMForCausalLM) -> bool:
    """Wrap the model's dense backend; False (and unchanged) for any other backend, e.g. InfLLM v2."""
    backend = model.attention_backend
    if isinstance(backend, DocumentMaskedAttention):
        return True
    if isinstance(backend, DenseAttention):
        model.set_attention_backend(DocumentMaskedAttention(backend))
        return True
    return False


def segment_ids_from_bos(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """[B, T] -> [B, T]: a new segment starts at every BOS (documents are stored as [BOS] tokens [EOS])."""
    return (input_ids == bos_token_id).cumsum(dim=1)
