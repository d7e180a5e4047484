"""Fold MiniCPM4's muP factors into the weights of a plain Llama (MINICPM4.md §2.1, §2.7).

embedding x scale_emb; o_proj and down_proj x scale_depth/sqrt(L); lm_head / (hidden/dim_model_base),
untied. The result has MiniCPM4's logits up to rounding (the same folding as CPM.cu's minicpm2llama.py).
It is our parity oracle (transformers' LlamaForCausalLM) and an export path to Llama-only tooling.
"""

from __future__ import annotations

from typing import Any

import torch

from minicpm4.model import MiniCPMForCausalLM


def llama_config_dict(model: MiniCPMForCausalLM) -> dict[str, Any]:
    """Keyword arguments for transformers.LlamaConfig (transformers >= 5: `rope_parameters`)."""
    cfg = model.config
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": "longrope", "rope_theta": cfg.rope_theta, "long_factor": list(rs.long_factor),
                "short_factor": list(rs.short_factor),
                "original_max_position_embeddings": rs.original_max_position_embeddings}
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )


def folded_llama_state_dict(model: MiniCPMForCausalLM) -> dict[str, torch.Tensor]:
    """HF Llama tensors (fp32) whose plain-Llama forward equals our muP forward."""
    cfg = model.config
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] * cfg.scale_emb
    sd["lm_head.weight"] = model.output_weight.detach().float() / cfg.logit_divisor
    for i in range(cfg.num_hidden_layers):
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            sd[name] = sd[name] * cfg.residual_scale
    return sd


def to_transformers_llama(model: MiniCPMForCausalLM, dtype: torch.dtype = torch.float32):
    """A transformers LlamaForCausalLM with identical logits (needs `transformers`)."""
    import transformers

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_dict(model))).eval()
    missing, unexpected = llama.load_state_dict(folded_llama_state_dict(model), strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise RuntimeError(f"Llama layout mismatch: missing {missing}, unexpected {unexpected}")
    return llama.to(dtype)
