"""What `minicpm4 info` reports: shapes, parameter count and memory per dtype, from the config alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.config import MiniCPMConfig
from minicpm4.model import MiniCPMForCausalLM

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass
class ModelSummary:
    config: MiniCPMConfig
    num_parameters: int
    embedding_parameters: int
    weight_bytes: dict[str, float]  # dtype -> bytes of weights (int8/int4: matrices quantized, rest bf16)
    kv_bytes_per_token: dict[str, float]  # dtype -> bytes of K+V cache per token, all layers

    def lines(self) -> list[str]:
        c = self.config
        gib = 1024**3
        rope = "none" if c.rope_scaling is None else (
            f"longrope, {len(c.rope_scaling.long_factor)} factors, original {c.rope_scaling.original_max_position_embeddings}")
        out = [
            f"architecture      {c.model_type} ({', '.join(c.architectures)})",
            f"parameters        {self.num_parameters:,} ({self.num_parameters / 1e9:.3f} B; embedding {self.embedding_parameters:,})",
            f"layers            {c.num_hidden_layers}, hidden {c.hidden_size}, MLP {c.intermediate_size}",
            f"attention         {c.num_attention_heads} q heads / {c.num_key_value_heads} kv heads (G = {c.num_key_value_groups}), head_dim {c.head_dim}",
            f"vocab             {c.vocab_size}, tied embeddings: {c.tie_word_embeddings}",
            f"context           {c.max_position_embeddings}, rope theta {c.rope_theta:g}, {rope}",
            f"muP               scale_emb {c.scale_emb}, residual x{c.residual_scale:.5f}, logits / {c.logit_divisor:g}",
            f"sparse attention  {'InfLLM v2 ' + str(c.sparse_config.to_dict()) if c.sparse_config else 'off (dense)'}",
            f"quantization      {describe_quantization(c)}",
            "memory (weights, KV cache per 1K tokens):",
        ]
        for dtype, nbytes in self.weight_bytes.items():
            kv = self.kv_bytes_per_token.get(dtype, self.kv_bytes_per_token["bfloat16"]) * 1024
            out.append(f"  {dtype:<9} {nbytes / gib:8.3f} GiB   KV {kv / 1024**2:8.2f} MiB / 1K tokens")
        return out


def describe_quantization(config: MiniCPMConfig) -> str:
    """One line for `info`: what config.json's quantization_config says (the folder's stored weights)."""
    q = config.extra.get("quantization_config")
    if not isinstance(q, dict):
        return "none (float weights)"
    meta = q.get("meta") or {}
    how = meta.get("method", q.get("quant_method"))
    parts = [f"{q.get('quant_method')} {q.get('bits')}-bit, group {q.get('group_size')}", f"method {how}"]
    if q.get("sym") is not None:
        parts.append("symmetric" if q["sym"] else "asymmetric")
    if meta.get("prefix_tokens"):
        parts.append(f"prefix tokens {meta['prefix_tokens']}")
    if q.get("desc_act"):
        parts.append("act-order")
    parts.append("LM head packed" if q.get("lm_head") else "LM head float")
    return ", ".join(parts)


def summarize(config: MiniCPMConfig) -> ModelSummary:
    with torch.device("meta"):  # shapes only, nothing allocated
        model = MiniCPMForCausalLM(config)
    n = model.num_parameters()
    embed = model.model.embed_tokens.weight.numel() + (0 if model.lm_head is None else model.lm_head.weight.numel())
    # Quantized formats quantize the Linear matrices; embeddings and norms stay in bf16.
    linear = sum(p.numel() for name, p in model.named_parameters() if name.endswith("proj.weight"))
    weight_bytes = {
        "float32": n * 4.0,
        "bfloat16": n * 2.0,
        "int8": linear * 1.0 + (n - linear) * 2.0,
        "int4": linear * 0.5 + (n - linear) * 2.0,
    }
    per_token_elems = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    kv = {"float32": per_token_elems * 4.0, "bfloat16": per_token_elems * 2.0}
    return ModelSummary(config, n, embed, weight_bytes, kv)
