"""GPTQ for one linear: quantize W column by column, pushing each column's rounding error onto the columns not yet
quantized through the inverse Hessian (Frantar et al. 2022, "GPTQ", Algorithm 1, with lazy batches and the
Cholesky form of H^-1). H = sum over calibration tokens of x x^T (the layer input), accumulated by `Hessian`.

P-GPTQ (MINICPM4.md §4.5) changes only which tokens enter H: `Hessian(skip_prefix=s)` drops the first s
positions of every sequence. The quantizer itself is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.quant import int4


class Hessian:
    """Running X^T X over calibration tokens (fp32, [K, K]) for one linear input; also keeps mean |x| per channel
    (AWQ smoothing's activation statistic)."""

    def __init__(self, in_features: int, skip_prefix: int = 0, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.skip_prefix = skip_prefix

    def add(self, x: torch.Tensor) -> None:
        """x [B, T, K] (one or more sequences, position 0 first) or [T, K]."""
        if x.dim() == 2:
            x = x[None]
        x = x[:, self.skip_prefix:].reshape(-1, x.shape[-1]).float()
        self.H.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


def output_error(w: torch.Tensor, w_q: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the tokens H was built from: ||X (W_q - W)^T|| / ||X W^T|| = sqrt(tr(D H D^T) /
    tr(W H W^T)), D = W_q - W. Exact (no second pass over the activations)."""
    w, d = w.float(), w_q.float() - w.float()
    num = ((d @ H) * d).sum()
    den = ((w @ H) * w).sum().clamp(min=1e-30)
    return float(torch.sqrt(num / den))


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [N, K], original channel order
    scales: torch.Tensor  # fp32 [N, G]
    zeros: torch.Tensor  # int32 [N, G]
    g_idx: torch.Tensor  # int32 [K]

    def dequantize(self) -> torch.Tensor:
        return int4.dequantize(self.codes, self.scales, self.zeros, self.g_idx)


def _params(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return int4.group_params(w, sym)  # w [N, g] -> per-row scale, zero


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, group_size: int = 128, sym: bool = True,
                  damp_percent: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  block_size: int = 128) -> GPTQResult:
    """weight [N, K], H [K, K] (not modified) -> codes/scales/zeros/g_idx."""
    N, K = weight.shape
    int4.check_group_size(K, group_size)
    if not 0 <= damp_percent < 1:
        raise ValueError(f"damp_percent must be in [0, 1), got {damp_percent}")
    W = weight.float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0  # channels never active in calibration: weight unconstrained, quantize as is
    H[dead, dead] = 1.0
    G = K // group_size
    static = None
    if static_groups:  # every group's scale from the unquantized weights, in channel order
        s, z = _params(W.reshape(N * G, group_size), sym)
        static = (s.reshape(N, G), z.reshape(N, G))
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp_percent * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper Cholesky factor of H^-1

    codes = torch.zeros(N, K, dtype=torch.uint8)
    scales = torch.zeros(N, G)
    zeros = torch.zeros(N, G, dtype=torch.int32)
    scale = zero = None
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, E1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = int(perm[col]) // group_size
                scale, zero = static[0][:, g], static[1][:, g]
            elif col % group_size == 0:  # a new group starts: parameters from its (error-updated) columns
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                scale, zero = _params(ahead, sym)
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero.to(torch.int32)
            w, d = W1[:, i], Hinv1[i, i]
            q = int4.quantize_codes(w[:, None], scale, zero)[:, 0]
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q - zero) * scale) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = codes[:, inv].contiguous()
    if static is not None:
        return GPTQResult(codes, static[0], static[1].to(torch.int32), int4.default_g_idx(K, group_size))
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // group_size).to(torch.int32)  # group of each channel, by its quantization slot
    return GPTQResult(codes, scales, zeros, g_idx)
