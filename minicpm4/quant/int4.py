"""INT4 group-wise weight quantization: the math, the GPTQ checkpoint packing, and the packed linear.

Weights W [N, K] (nn.Linear layout) are split along K into groups of `group_size` input channels; each
(output row, group) has a scale s and an integer zero point z, and an integer code q in [0, 15]:
    W[n, k] ~= s[n, g(k)] * (q[n, k] - z[n, g(k)])
Symmetric (AutoGPTQ's rule): z = 8 and s = 2 max|W_g| / 15. Asymmetric: s = (max - min) / 15,
z = round(-min / s). g(k) = k // group_size unless act-order permuted the channels (g_idx, below).

Checkpoint layout (AutoGPTQ / transformers / optimum "gptq", checkpoint_format "gptq", i.e. v1):
    qweight int32 [K / 8, N]   eight codes along K per word, code k % 8 at bits 4 (k % 8)
    qzeros  int32 [G, N / 8]   eight (zero - 1) values along N per word (v1 stores zero - 1; v2 stores zero)
    scales  fp16  [G, N]
    g_idx   int32 [K]          group of each input channel (k // group_size without act-order)
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS  # codes per int32 word
MAXQ = (1 << BITS) - 1
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)  # [8]


def group_params(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for each row of w [R, g] (fp32): (scale [R], zero [R]), AutoGPTQ's rules."""
    w = w.float()
    wmin = w.min(dim=1).values.clamp(max=0)
    wmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = torch.where(wmin < 0, -wmax, wmin)
    dead = (wmin == 0) & (wmax == 0)  # an all-zero group: any scale works, 1 keeps the codes finite
    wmin, wmax = torch.where(dead, -1.0, wmin), torch.where(dead, 1.0, wmax)
    scale = (wmax - wmin) / MAXQ
    # Asymmetric zero points are kept in [1, 15]: the v1 layout stores zero - 1 in four bits, so a zero of 0 cannot
    # be written (AutoGPTQ's readers add 1 back). Only groups with min > -s/2 (nearly all positive) lose a level.
    zero = torch.full_like(scale, (MAXQ + 1) / 2) if sym else torch.round(-wmin / scale).clamp(1, MAXQ)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes clamp(round(w / s) + z, 0, 15) with per-row scale/zero broadcast along the last dim."""
    return torch.clamp(torch.round(w.float() / scale[..., None]) + zero[..., None], 0, MAXQ)


def rtn_quantize(weight: torch.Tensor, group_size: int, sym: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: weight [N, K] -> codes uint8 [N, K], scales fp32 [N, G], zeros int32 [N, G]."""
    N, K = weight.shape
    check_group_size(K, group_size)
    g = weight.float().reshape(N * (K // group_size), group_size)
    scale, zero = group_params(g, sym)
    q = quantize_codes(g, scale, zero)
    G = K // group_size
    return q.reshape(N, K).to(torch.uint8), scale.reshape(N, G), zero.reshape(N, G).to(torch.int32)


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide in_features {in_features}")


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    return (torch.arange(in_features, dtype=torch.int32) // group_size).to(torch.int32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """codes [N, K], scales/zeros [N, G], g_idx [K] -> W [N, K] fp32 = s * (q - z)."""
    gi = g_idx.long()
    return (codes.float() - zeros.float()[:, gi]) * scales.float()[:, gi]


# ---- the GPTQ checkpoint layout --------------------------------------------------------------------------------
def pack_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """codes uint8 [N, K], scales [N, G], zeros int [N, G], g_idx [K] -> {qweight, qzeros, scales, g_idx}."""
    N, K = codes.shape
    if K % PACK or N % PACK:
        raise ValueError(f"GPTQ packing needs in/out features divisible by {PACK}, got [{N}, {K}]")
    q = codes.to(torch.int32).t().reshape(K // PACK, PACK, N)  # [K/8, 8, N]
    qweight = (q << _SHIFTS[None, :, None]).sum(dim=1, dtype=torch.int32)  # disjoint bits: sum == or
    z = (zeros.to(torch.int32) - 1).t().reshape(zeros.shape[1], N // PACK, PACK)  # v1 stores zero - 1
    if int(z.min()) < 0 or int(z.max()) > MAXQ - 1:
        raise ValueError("GPTQ v1 packing needs zero points in [1, 15]")
    qzeros = (z << _SHIFTS[None, None, :]).sum(dim=2, dtype=torch.int32)
    return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous(),
            "scales": scales.t().to(scale_dtype).contiguous(), "g_idx": g_idx.to(torch.int32).contiguous()}


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_gptq: -> codes uint8 [N, K], scales fp32 [N, G], zeros int32 [N, G], g_idx int32 [K]."""
    K8, N = qweight.shape
    q = (qweight.to(torch.int32)[:, None, :] >> _SHIFTS[None, :, None]) & MAXQ  # [K/8, 8, N]
    codes = q.reshape(K8 * PACK, N).t().to(torch.uint8).contiguous()
    z = (qzeros.to(torch.int32)[:, :, None] >> _SHIFTS[None, None, :]) & MAXQ  # [G, N/8, 8]
    zeros = (z.reshape(qzeros.shape[0], N) + 1).t().to(torch.int32).contiguous()
    return codes, scales.float().t().contiguous(), zeros, g_idx.to(torch.int32)
