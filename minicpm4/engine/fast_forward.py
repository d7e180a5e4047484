"""FastDecoder: the engine's packed (varlen) decoder forward over a loaded MiniCPMForCausalLM's weights.

The engine packs every scheduled sequence's tokens back to back (input_ids [N], positions [N]) and hands
an `attend(layer_idx, q, k, v) -> o` closure that writes its paged KV cache and attends. The math is
model.py's (MINICPM4.md §2.1), with the muP factors where they act: embedding x scale_emb, each residual
branch x scale_depth / sqrt(L), logits from hidden / (hidden_size / dim_model_base); RMSNorm normalises in
fp32, casts, then scales; RoPE rotates in fp32 and casts back. Two paths, same results:

  kernel  N <= max_kernel_tokens (decode, small chunks; fp32/bf16 on an AVX-512 CPU): two C++ calls per layer
          (fast_kernel.py): RMSNorm + fused q|k|v GEMV + RoPE, then o_proj + residual + RMSNorm + fused
          gate|up GEMV + SwiGLU + down + residual. Weights read in place, work split over a thread pool that
          never waits on a descheduled thread. Also the LM head GEMV for up to max_kernel_tokens rows. Each
          linear (and the head) is a dense weight or a packed INT4 / ternary module of minicpm4.quant, whose
          kernel layout (quant/kernels.py, AVX512-VNNI) the C++ GEMV reads: the same integer arithmetic as the
          module's own forward, so this path and the torch path agree to elementwise rounding.
  torch   everything else (prefill chunks, other devices): fused weights through F.linear (oneDNN / MKL are
          fast once there are enough rows), eager elementwise ops. torch.compile of its two per-layer functions
          was measured and dropped: 0.85-1.08x at N = 1..512 (the matmuls dominate; 4-77 s to compile).

Measured per-op profile and the ideas that did and did not pay: benchmarks/decode_step.py and
benchmarks/results/decode_step.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from minicpm4.model import MiniCPMForCausalLM

# attend(layer_idx, q [N, Hq, D] post-RoPE, k [N, Hkv, D] post-RoPE, v [N, Hkv, D]) -> o [N, Hq, D].
# q, k, v are fresh contiguous tensors in the model's dtype. With pre_rope (InfLLM v2 use_nope) a fifth
# argument (q, k) before RoPE is passed as well.
AttendFn = Callable[..., torch.Tensor]

# Up to this many tokens per step the C++ path runs; above it, F.linear. Crossover measured with
# benchmarks/decode_step.py on the 0.5B shapes (2 cores, AVX512-BF16; its tokens_sweep): in bf16 oneDNN's blocked
# GEMM draws level with the kernel's register tiles at 64 rows (99.8 vs 99.4 ms) and wins at 128 (187 vs 206);
# MKL's fp32 GEMM still loses at 128 rows (684 vs 421 ms).
KERNEL_MAX_TOKENS = {torch.bfloat16: 64, torch.float32: 128}


# A linear of the fused decoder: a dense weight [N, K] (F.linear / the C++ GEMV), or a packed module of
# minicpm4.quant (Int4Linear, TernaryLinear) that computes y = x W^T itself.
Linear = torch.Tensor | torch.nn.Module


@dataclass
class _Layer:
    in_norm: torch.Tensor  # [H]
    qkv: Linear  # [(Hq + 2 Hkv) D, H]: q_proj | k_proj | v_proj rows (a copy: the one fused tensor)
    o: Linear  # [H, Hq D] (the model's o_proj.weight)
    post_norm: torch.Tensor  # [H]
    gate_up: Linear  # [2 I, H]: gate_proj | up_proj rows (a copy)
    down: Linear  # [H, I] (the model's down_proj.weight)


def _linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


def _fused(modules: list[torch.nn.Module]) -> Linear:
    """The rows of several linears sharing an input as one linear: a concatenated dense weight, or one packed
    module (quant.linear.fuse_rows). Packed linears that cannot share one module (different formats or act-order
    channel orders) are rebuilt dense: correct, but without the packed speed (a warning says so)."""
    if all(isinstance(m, torch.nn.Linear) for m in modules):
        return torch.cat([m.weight for m in modules]).detach().contiguous()
    from minicpm4.quant.linear import dense_weight, fuse_rows

    fused = fuse_rows(modules)
    if fused is not None:
        return fused
    import warnings

    warnings.warn("FastDecoder: these linears cannot be fused packed; running them as dense weights")
    dtype = next(m for m in modules if isinstance(m, torch.nn.Linear)).weight.dtype if any(
        isinstance(m, torch.nn.Linear) for m in modules) else torch.float32
    return torch.cat([dense_weight(m, dtype) for m in modules]).contiguous()


def _single(module: torch.nn.Module) -> Linear:
    return module.weight.detach().contiguous() if isinstance(module, torch.nn.Linear) else module


def _kernel_weight(w: Linear):
    """What the C++ path reads for a linear: the dense tensor, a packed module's kernel layout, or None when the
    kernel cannot take it (a non-contiguous tensor, another module type, a group size it does not pack)."""
    if isinstance(w, torch.Tensor):
        return w if w.is_contiguous() else None
    from minicpm4.quant import kernels
    from minicpm4.quant.linear import QuantLinearBase

    if not isinstance(w, QuantLinearBase) or not kernels.supports(w.group_size, w.in_features):
        return None
    return w.kernel_weight()


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos/sin [N, 1, D] fp32: x * cos + rotate_half(x) * sin in fp32, cast back."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def _attn_in(L: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, Hq: int, Hkv: int,
             D: int) -> tuple[torch.Tensor, ...]:
    """h [N, H] -> q [N, Hq, D], k, v [N, Hkv, D] (contiguous; q/k rotated) and pre-RoPE q, k (views)."""
    N = h.shape[0]
    qkv = _linear(_rmsnorm(h, L.in_norm, eps), L.qkv).view(N, Hq + 2 * Hkv, D)
    qk_pre = qkv[:, : Hq + Hkv]
    qk = _rope(qk_pre, cos, sin)
    return qk[:, :Hq].contiguous(), qk[:, Hq:].contiguous(), qkv[:, Hq + Hkv:].contiguous(), qk_pre[:, :Hq], qk_pre[:, Hq:]


def _attn_out_mlp(L: _Layer, h: torch.Tensor, o: torch.Tensor, eps: float, rs: float) -> torch.Tensor:
    """h [N, H], o [N, Hq D] -> h after the attention residual and the MLP residual (muP x rs each)."""
    h = h + _linear(o, L.o) * rs
    gate, up = _linear(_rmsnorm(h, L.post_norm, eps), L.gate_up).chunk(2, dim=-1)
    return h + _linear(F.silu(gate) * up, L.down) * rs


class FastDecoder:
    """Packed (varlen) forward over a loaded MiniCPMForCausalLM's weights, fused at construction.

    context_len: the engine's max model length. It fixes LongRoPE's long/short factor choice exactly as
    model.hidden_states(context_len=...) does, and the cos/sin tables cover positions 0 .. context_len - 1.
    kernel: None = the C++ path when it is built and the model is fp32/bf16 on the CPU; True = require it;
    False = PyTorch only. max_kernel_tokens: steps (and logits calls) of at most this many tokens take the
    kernel path (default KERNEL_MAX_TOKENS[dtype]). threads: kernel threads (default torch.get_num_threads()).
    Not thread-safe: one call at a time (the kernel owns per-decoder scratch buffers).
    """

    def __init__(self, model: MiniCPMForCausalLM, context_len: int, *, kernel: bool | None = None,
                 max_kernel_tokens: int | None = None, threads: int | None = None) -> None:
        cfg = model.config
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        self.config, self.context_len = cfg, context_len
        self.Hq, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps, self.rs = cfg.rms_norm_eps, cfg.residual_scale
        self.embed = model.model.embed_tokens.weight
        # The head: the embedding when tied, lm_head's weight, or a packed head module (a quantized model).
        self.head: Linear = self.embed if model.lm_head is None else _single(model.lm_head)
        self.final_norm = model.model.norm.weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        with torch.no_grad():
            self.layers = [_Layer(
                in_norm=layer.input_layernorm.weight.detach(),
                qkv=_fused([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                o=_single(layer.self_attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=_fused([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=_single(layer.mlp.down_proj),
            ) for layer in model.model.layers]
            positions = torch.arange(context_len, device=self.device)
            cos, sin = model.rotary(positions[None], context_len)  # [1, L, D] fp32, attention scaling applied
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        # InfLLM v2 with use_nope selects blocks with pre-RoPE q/k: attend then gets them as a fifth argument.
        self.pre_rope = cfg.sparse_config is not None and cfg.sparse_config.use_nope
        self.max_kernel_tokens = max_kernel_tokens if max_kernel_tokens is not None else \
            KERNEL_MAX_TOKENS.get(self.dtype, 16)
        # The PyTorch path's per-layer functions (benchmarks/decode_step.py swaps in torch.compile'd ones).
        self._attn_in, self._attn_out_mlp = _attn_in, _attn_out_mlp
        self.kernel = self._make_kernel(kernel, threads or torch.get_num_threads())

    def _make_kernel(self, want: bool | None, threads: int):
        if want is False:
            return None
        from minicpm4.engine import fast_kernel

        why = None
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16):
            why = f"CPU fp32/bf16 weights (got {self.device.type} {self.dtype})"
        elif self.pre_rope:
            why = "post-RoPE attention (use_nope backends get the PyTorch path)"
        elif any(not t.is_contiguous() for t in (self.embed, self.final_norm)):
            why = "a contiguous embedding"
        elif fast_kernel.library() is None:
            why = "a built kernel (AVX-512 CPU, a C++ compiler, MINICPM4_NO_CPU_KERNEL unset)"
        else:
            linears = [w for L in self.layers for w in (L.qkv, L.o, L.gate_up, L.down)] + [self.head]
            kernel_weights = [_kernel_weight(w) for w in linears]
            if any(k is None for k in kernel_weights):
                why = ("contiguous dense weights and packed linears the C++ GEMV takes (Int4Linear / TernaryLinear, "
                       "group size a multiple of 16, an AVX512-VNNI CPU)")
        if why is not None:
            if want:
                raise ValueError(f"FastDecoder(kernel=True) needs {why}")
            return None
        cfg = self.config
        *ks, self._kernel_head = kernel_weights
        layers = [(L.in_norm, *ks[4 * i: 4 * i + 2], L.post_norm, *ks[4 * i + 2: 4 * i + 4])
                  for i, L in enumerate(self.layers)]
        return fast_kernel.KernelModel(
            hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, heads=self.Hq, kv_heads=self.Hkv,
            head_dim=self.D, dtype=self.dtype, max_tokens=max(self.max_kernel_tokens, 1), eps=self.eps,
            residual_scale=self.rs, cos=self.cos, sin=self.sin, threads=threads, layers=layers)

    # ---- forward ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """input_ids [N] long, positions [N] long (tokens of several sequences packed back to back) -> final-normed
        hidden [N, hidden]."""
        N = input_ids.shape[0]
        h = F.embedding(input_ids, self.embed) * self.config.scale_emb  # muP: embedding x scale_emb
        if self.kernel is not None and 0 < N <= self.max_kernel_tokens:
            return self._hidden_kernel(h, positions, attend)
        return self._hidden_torch(h, positions, attend)

    @torch.no_grad()
    def layers_forward(self, h: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """The decoder layers only: h [N, hidden] (already embedded) -> h after the last layer, before the final
        norm (a new tensor; the EAGLE draft's one layer runs through here, speculative/eagle.py)."""
        h = h.to(self.dtype).contiguous().clone()
        if self.kernel is not None and 0 < h.shape[0] <= self.max_kernel_tokens:
            return self._hidden_kernel(h, positions, attend, final_norm=False)
        return self._hidden_torch(h, positions, attend, final_norm=False)

    def _hidden_kernel(self, h: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                       final_norm: bool = True) -> torch.Tensor:
        km = self.kernel
        lib, handle = km.lib, km.handle
        N, dt = h.shape[0], self.dtype
        pos = positions.to(torch.long).contiguous()
        hp, pp = h.data_ptr(), pos.data_ptr()
        for i in range(len(self.layers)):
            q = torch.empty(N, self.Hq, self.D, dtype=dt)
            k = torch.empty(N, self.Hkv, self.D, dtype=dt)
            v = torch.empty(N, self.Hkv, self.D, dtype=dt)
            if lib.ff_attn_in(handle, i, hp, N, pp, q.data_ptr(), k.data_ptr(), v.data_ptr()) < 0:
                raise ValueError(f"positions must lie in [0, context_len={self.context_len})")
            o = attend(i, q, k, v).to(dt).contiguous()
            assert o.shape == q.shape, f"attend returned {tuple(o.shape)}, expected {tuple(q.shape)}"
            lib.ff_attn_out_mlp(handle, i, hp, o.data_ptr(), N)
        if not final_norm:
            return h
        out = torch.empty_like(h)
        lib.ff_rmsnorm(handle, hp, self.final_norm.data_ptr(), out.data_ptr(), N)
        return out

    def _hidden_torch(self, h: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                      final_norm: bool = True) -> torch.Tensor:
        N = h.shape[0]
        if N and (int(positions.min()) < 0 or int(positions.max()) >= self.context_len):
            raise ValueError(f"positions must lie in [0, context_len={self.context_len})")
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [N, 1, D]
        for i, L in enumerate(self.layers):
            q, k, v, q_pre, k_pre = self._attn_in(L, h, cos, sin, self.eps, self.Hq, self.Hkv, self.D)
            o = attend(i, q, k, v, (q_pre, k_pre)) if self.pre_rope else attend(i, q, k, v)
            h = self._attn_out_mlp(L, h, o.reshape(N, self.Hq * self.D).to(self.dtype), self.eps, self.rs)
        return _rmsnorm(h, self.final_norm, self.eps) if final_norm else h

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, hidden] -> fp32 logits [M, V], muP logit divisor applied (model.logits' math: the division and
        the product in the model's dtype, then fp32)."""
        x = (hidden / self.config.logit_divisor).to(self.dtype).contiguous()
        M = x.shape[0]
        if self.kernel is None or not 0 < M <= self.max_kernel_tokens:
            return _linear(x, self.head).float()
        from minicpm4.engine.fast_kernel import weight_args

        head = self._kernel_head
        y = torch.empty(M, head.shape[0] if isinstance(head, torch.Tensor) else head.N, dtype=torch.float32)
        self.kernel.lib.ff_logits(self.kernel.handle, x.data_ptr(), *weight_args(head), y.data_ptr(), M, y.shape[1])
        return y
