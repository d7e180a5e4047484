"""Ternary (BitCPM4, MINICPM4.md §5) weight math: per-group absmean scales, codes in {-1, 0, +1}, 2-bit packing.

    s_g = max(mean(|W_g|), eps);  W_q = clamp(round(W_g / s_g), -1, 1) * s_g
Groups run along the input dimension (`group_size` consecutive input channels of one output row), as INT4's.
The straight-through estimator for QAT: W_ste = W + stopgrad(W_q - W) (forward W_q, gradient of W).

Storage (ours; no public packed BitCPM4 format exists — the release is fake-quantized bf16):
    qweight uint8 [N, K / 4]   code + 1 in {0, 1, 2}, weight k at bits 2 (k % 4) of byte k // 4
    scales  [N, K / group_size] in the model's dtype
"""

from __future__ import annotations

import torch

EPS = 1e-5  # absmean floor: an all-zero group keeps a finite scale
PER_BYTE = 4
_SHIFTS = torch.arange(0, 8, 2, dtype=torch.uint8)  # [4]


def ternary_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """weight [N, K] -> absmean scales fp32 [N, K / group_size]."""
    N, K = weight.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide in_features {K}")
    return weight.float().reshape(N, K // group_size, group_size).abs().mean(-1).clamp(min=EPS)


def ternarize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (codes int8 [N, K] in {-1, 0, 1}, scales fp32 [N, G])."""
    N, K = weight.shape
    scales = ternary_scales(weight, group_size)
    w = weight.float().reshape(N, K // group_size, group_size)
    codes = torch.clamp(torch.round(w / scales[..., None]), -1, 1)
    return codes.reshape(N, K).to(torch.int8), scales


def dequantize_ternary(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [N, K], scales [N, G] -> W [N, K] fp32."""
    N, K = codes.shape
    G = scales.shape[1]
    return (codes.float().reshape(N, G, K // G) * scales.float()[..., None]).reshape(N, K)


def fake_ternary(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_q = ternary(W) in W's dtype, with the straight-through gradient (forward W_q, backward identity)."""
    codes, scales = ternarize(weight.detach(), group_size)
    wq = dequantize_ternary(codes, scales).to(weight.dtype)
    return weight + (wq - weight).detach()


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """codes int8 [N, K] in {-1, 0, 1} -> uint8 [N, K / 4]."""
    N, K = codes.shape
    if K % PER_BYTE:
        raise ValueError(f"ternary packing needs in_features divisible by {PER_BYTE}, got {K}")
    c = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(N, K // PER_BYTE, PER_BYTE)
    return (c << _SHIFTS).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum == or


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 4] -> codes int8 [N, K] in {-1, 0, 1}."""
    N, B = packed.shape
    c = (packed[..., None] >> _SHIFTS) & 3
    if bool((c == 3).any()):
        raise ValueError("packed ternary weights hold the unused code 3: not a ternary qweight")
    return (c.to(torch.int8) - 1).reshape(N, B * PER_BYTE)


def find_ternary_groups(weight: torch.Tensor, candidates: tuple[int, ...] = (32, 64, 128, 256, 512, 1024),
                        rtol: float = 1e-2) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """Detect a fake-quantized ternary weight (the BitCPM4 release: bf16 values equal to {-1, 0, +1} x scale per
    group). Returns (group_size, codes, scales) for the smallest group size under which every group holds at most
    one magnitude (zeros aside), with scales recovered from that magnitude; None when no candidate fits.
    rtol: how far one group's nonzero magnitudes may differ (bf16 rounding of the products)."""
    N, K = weight.shape
    w = weight.float()
    for g in sorted({*candidates, K}, reverse=True):
        if K % g:
            continue
        wg = w.reshape(N, K // g, g)
        mag = wg.abs()
        big = mag.amax(-1)
        nz = mag > 0
        small = torch.where(nz, mag, torch.full_like(mag, float("inf"))).amin(-1)
        small = torch.where(torch.isinf(small), big, small)
        if bool(((big - small) <= rtol * big).all()):
            scales = torch.where(big > 0, big, torch.full_like(big, EPS))
            codes = torch.where(nz, torch.sign(wg), torch.zeros_like(wg)).reshape(N, K).to(torch.int8)
            return g, codes, scales
    return None
