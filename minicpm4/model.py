"""The MiniCPM4 decoder (MINICPM4.md §2.1), top to bottom.

A Llama-style GQA decoder with three muP factors written where they act:
  embedding   x scale_emb
  residuals   x scale_depth / sqrt(num_hidden_layers)
  logits      from hidden / (hidden_size / dim_model_base)
Module and parameter names are the Hugging Face names, so checkpoints load without a rename map.
Attention itself goes through one seam (`minicpm4.attention`), so InfLLM v2 plugs in from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minicpm4.attention import AttentionBackend, AttentionMetadata, make_backend
from minicpm4.config import MiniCPMConfig
from minicpm4.kv_cache import StaticKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back to the input dtype, then scale (HF order: matters in bf16).
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class LongRoPE(nn.Module):
    """Rotate-half RoPE with LongRoPE per-frequency divisors (MINICPM4.md §2.4).

    angle[t, i] = t * inv_freq[i] / ext[i]; cos/sin are multiplied by attention_scaling.
    Long vs short factors: as the remote code, the choice follows the length the rotary table
    covers, which is max(max_position_embeddings, context length). It is fixed per context so
    that keys already in a KV cache never change meaning mid-generation.
    """

    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        self.config = config
        # (use_long, device) -> (inv_freq [D/2] fp32, attention_scaling). Plain tensors, not buffers:
        # nothing rotary is stored in checkpoints, and meta-device construction needs no buffers.
        self._tables: dict[tuple[bool, torch.device], tuple[torch.Tensor, float]] = {}

    def uses_long_factors(self, context_len: int) -> bool:
        rs = self.config.rope_scaling
        return rs is not None and max(self.config.max_position_embeddings, context_len) > rs.original_max_position_embeddings

    def table(self, use_long: bool, device: torch.device) -> tuple[torch.Tensor, float]:
        key = (use_long, device)
        if key not in self._tables:
            cfg, d = self.config, self.config.head_dim
            base = cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)  # theta^(2i/d)
            rs = cfg.rope_scaling
            if rs is None:
                inv_freq, scaling = 1.0 / base, 1.0
            else:
                ext = torch.tensor(rs.long_factor if use_long else rs.short_factor, dtype=torch.float32)
                inv_freq = 1.0 / (ext * base)
                ratio = cfg.max_position_embeddings / rs.original_max_position_embeddings
                original = rs.original_max_position_embeddings
                scaling = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
            self._tables[key] = (inv_freq.to(device), scaling)
        return self._tables[key]

    def forward(self, positions: torch.Tensor, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, D] in fp32."""
        inv_freq, scaling = self.table(self.uses_long_factors(context_len), positions.device)
        angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]. Rotated in fp32, cast back (MINICPM4.md §2.1)."""
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        pre_rope = (q, k) if backend.needs_pre_rope else None
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = backend(self.layer_idx, q, k, v, meta, pre_rope)  # [B, Hq, T, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale  # muP: scale_depth / sqrt(num_hidden_layers)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, backend) * self.residual_scale
        h = h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale
        return h


class MiniCPMModel(nn.Module):
    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniCPMForCausalLM(nn.Module):
    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MiniCPMModel(config)
        # Tied models have no lm_head tensor (HF omits `lm_head.weight`); logits use the embedding.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = LongRoPE(config)
        self.attention_backend: AttentionBackend = make_backend(config)

    def set_attention_backend(self, backend: AttentionBackend) -> AttentionBackend:
        """The one way to change how this model attends (dense, InfLLM v2, a training wrapper, the
        engine's paged backend); returns the previous backend so a caller can put it back."""
        previous, self.attention_backend = self.attention_backend, backend
        return previous

    def set_runtime_config(self, config: MiniCPMConfig) -> None:
        """Run under `config`, which may differ from the current one only in weight-free fields (sparse
        attention, RoPE scaling): rebuilds the rotary tables and the attention backend from it."""
        fixed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "tie_word_embeddings", "scale_emb", "scale_depth", "dim_model_base",
                 "rms_norm_eps")
        changed = [k for k in fixed if getattr(config, k) != getattr(self.config, k)]
        assert not changed, f"set_runtime_config cannot change {changed}: they shape or scale the weights"
        self.config = config
        self.rotary = LongRoPE(config)
        self.set_attention_backend(make_backend(config))

    @property
    def output_weight(self) -> torch.Tensor:
        """The dense head weight (the embedding when tied); a packed head (minicpm4.quant) has none."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the embedding's. Not the first parameter's: packed weights are integers."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Released-code init: normal(0, initializer_range) for Linear and Embedding, norms = 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      kv_cache: StaticKVCache | None = None, meta: AttentionMetadata | None = None,
                      context_len: int | None = None) -> torch.Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, hidden]. context_len: the length the
        rotary table covers (LongRoPE picks its factors by it); default the cache length, else T."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if meta is None:
            meta = AttentionMetadata.for_cache(positions, kv_cache)
        if context_len is None:
            context_len = kv_cache.max_seq_len if kv_cache is not None else int(positions.max()) + 1
        cos, sin = self.rotary(positions, context_len)
        h = self.model.embed_tokens(input_ids) * self.config.scale_emb  # muP: embedding x scale_emb
        for layer in self.model.layers:
            h = layer(h, cos, sin, meta, self.attention_backend)
        return self.model.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # muP: divide by hidden_size / dim_model_base before the head; logits in fp32. The head goes through its
        # module when there is one (a packed head of a quantized model, tied or not), else the tied embedding.
        x = hidden / self.config.logit_divisor
        head = self.lm_head
        return (F.linear(x, self.model.embed_tokens.weight) if head is None else head(x)).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: StaticKVCache | None = None, logit_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] in fp32, or [B, K, V] at `logit_indices` [B, K] (e.g. each row's last token)."""
        hidden = self.hidden_states(input_ids, positions, kv_cache)
        if logit_indices is not None:
            hidden = hidden.gather(1, logit_indices[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.logits(hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: MiniCPMConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int | None = 0) -> MiniCPMForCausalLM:
    """A randomly initialised model (built on the meta device, materialised once, then initialised)."""
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.init_weights(generator)
    return model.to(dtype)
