"""Packed linears that replace nn.Linear in a quantized model (model.py never changes: quantize_ swaps modules).

Int4Linear     buffers in the GPTQ checkpoint layout (int4.py), so state_dict() is the checkpoint.
TernaryLinear  2-bit codes + per-group scales (ternary.py).
FakeTernaryLinear  the QAT module: a float weight, ternarised in the forward with the straight-through estimator.

Forward, by what the input allows (each path tested against `dequantize()` + F.linear):
  kernel   CPU with AVX512-VNNI, group size a multiple of 16 (kernels.supports): integer dot products on the packed codes with int8
           activations (minicpm4/quant/kernels.py), for every row count (faster than int4pack at 1..512 rows).
  int4pack CPU bf16/fp32 (Int4Linear) without the kernel: PyTorch's `_weight_int4pack_mm_for_cpu`, bf16 activations.
  dequant  anything else (other devices, fp16): the float weight rebuilt per call, then F.linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minicpm4.quant import int4, ternary

_INNER_K_TILES = 2
_INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes PyTorch's CPU int4 kernel accepts; others dequantize  # the CPU int4 packing's k-tile (2, 4 or 8; the CPU kernel ignores it beyond the layout)


def _kernels():
    """The C++ quantized-GEMV module when it is built for this machine, else None."""
    try:
        from minicpm4.quant import kernels
    except ImportError:
        return None
    return kernels if kernels.available() else None


class QuantLinearBase(nn.Module):
    """What every packed linear offers: shapes, the float weight it stands for, and one dispatching forward."""

    in_features: int
    out_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError


    def kernel_weight(self):
        """The weight in the C++ kernel's layout (built once, cached), or None without the kernel."""
        k = _kernels()
        if k is None:
            return None
        if not getattr(self, "_kernel_packed", False):  # packed once; None stays None (a shape it cannot take)
            self._kernel_weight, self._kernel_packed = self._pack_for_kernel(k), True
        return self._kernel_weight

    def _pack_for_kernel(self, k):
        raise NotImplementedError

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.dequantize(x2.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        k = _kernels() if x.device.type == "cpu" else None
        packed = (self.kernel_weight() if k is not None and 0 < x2.shape[0] <= k.MAX_ROWS
                  and x.dtype in (torch.float32, torch.bfloat16) and k.supports(self.group_size, self.in_features) else None)
        if packed is not None:
            y = k.linear(x2.contiguous(), packed)
        else:
            y = self._torch_forward(x2)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int4Linear(QuantLinearBase):
    """W4 group-quantized linear (no bias: MiniCPM has none). Buffers: qweight, qzeros, scales, g_idx.

    Scales are fp16 whatever the model's dtype, as GPTQ files store them (other tools expect fp16, and bf16 would
    round them by 3 more bits); the forward computes in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__()
        int4.check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        G = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // int4.PACK, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(G, out_features // int4.PACK, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", int4.default_g_idx(in_features, group_size).to(device))
        self._int4pack = None
        self._kernel_weight = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
                   group_size: int, dtype: torch.dtype | None = None) -> Int4Linear:
        """codes uint8 [N, K], scales [N, G], zeros int [N, G] (int4.rtn_quantize / GPTQ output). dtype: unused
        (scales are fp16, see the class doc); kept so every packed module is built the same way."""
        N, K = codes.shape
        m = cls(K, N, group_size, device="meta")
        g_idx = int4.default_g_idx(K, group_size) if g_idx is None else g_idx
        for name, t in int4.pack_gptq(codes, scales, zeros, g_idx, scale_dtype=torch.float16).items():
            setattr(m, name, t)
        return m

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 [N, K], scales fp32 [N, G], zeros int32 [N, G], g_idx int32 [K])."""
        return int4.unpack_gptq(self.qweight, self.qzeros, self.scales, self.g_idx)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int4.dequantize(*self.unpacked()).to(dtype)

    def _permutation(self) -> torch.Tensor | None:
        """Act-order checkpoints list groups out of channel order: the channel order that sorts g_idx, else None."""
        g = self.g_idx.long()
        if bool((g[1:] >= g[:-1]).all()) and torch.equal(g, torch.arange(len(g), device=g.device) // self.group_size):
            return None
        return torch.argsort(g, stable=True)

    def _pack_for_kernel(self, k):
        codes, scales, zeros, _ = self.unpacked()
        perm = self._permutation()
        if perm is not None:
            codes = codes[:, perm]
        return k.pack_int4(codes, scales, zeros, self.group_size, perm=perm)

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        if (x2.device.type != "cpu" or x2.dtype not in (torch.float32, torch.bfloat16) or not x2.shape[0]
                or self.group_size not in _INT4PACK_GROUPS):
            return super()._torch_forward(x2)
        if self._int4pack is None:
            codes, scales, zeros, _ = self.unpacked()
            perm = self._permutation()
            if perm is not None:
                codes = codes[:, perm]
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), _INNER_K_TILES)
            # PyTorch's int4 kernel dequantizes (q - 8) * scale + offset: offset = s * (8 - z) gives s * (q - z).
            sz = torch.stack([scales.t(), (scales * (8 - zeros.float())).t()], dim=-1).to(torch.bfloat16).contiguous()
            self._int4pack = (packed, sz, perm)
        packed, sz, perm = self._int4pack
        xb = x2 if perm is None else x2[:, perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.to(torch.bfloat16).contiguous(), packed, self.group_size, sz)
        return y.to(x2.dtype)


class TernaryLinear(QuantLinearBase):
    """Ternary linear: qweight uint8 [N, K / 4] (2-bit codes), scales [N, K / group_size]."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        if group_size <= 0 or in_features % group_size or group_size % ternary.PER_BYTE:
            raise ValueError(f"group_size {group_size} must be a positive multiple of {ternary.PER_BYTE} dividing "
                             f"in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // ternary.PER_BYTE, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group_size, dtype=dtype, device=device))
        self._kernel_weight = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> TernaryLinear:
        N, K = codes.shape
        m = cls(K, N, K // scales.shape[1], dtype=dtype, device="meta")
        m.qweight = ternary.pack_ternary(codes)
        m.scales = scales.to(dtype).contiguous()
        return m

    def codes(self) -> torch.Tensor:
        return ternary.unpack_ternary(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ternary.dequantize_ternary(self.codes(), self.scales).to(dtype)

    def _pack_for_kernel(self, k):
        return k.pack_ternary(self.codes(), self.scales.float(), self.group_size)


class FakeTernaryLinear(nn.Module):
    """QAT: holds the float weight (trained), computes with its ternarised value (straight-through gradient)."""

    def __init__(self, weight: nn.Parameter, group_size: int) -> None:
        super().__init__()
        ternary.ternary_scales(weight.detach()[:1], group_size)  # validates group_size against in_features
        self.weight = weight
        self.group_size = group_size
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, ternary.fake_ternary(self.weight, self.group_size))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float weight [out, in] a linear computes with: nn.Linear's, the ternarised QAT weight, or a packed one's
    dequantized value (GGUF export, FastDecoder's torch path and tests read weights through this one function)."""
    if isinstance(module, QuantLinearBase):
        w = module.dequantize(dtype or torch.float32)
    elif isinstance(module, FakeTernaryLinear):
        w = ternary.fake_ternary(module.weight.detach(), module.group_size)
    else:
        w = module.weight.detach()
    return w if dtype is None else w.to(dtype)


def fuse_rows(modules: list[nn.Module]) -> nn.Module | None:
    """One packed linear computing the given linears' outputs side by side (FastDecoder's q|k|v and gate|up), or
    None when they cannot share one (different types, group sizes or act-order channel orders)."""
    first = modules[0]
    if isinstance(first, Int4Linear) and all(isinstance(m, Int4Linear) for m in modules):
        if any(m.group_size != first.group_size or not torch.equal(m.g_idx, first.g_idx) for m in modules):
            return None
        fused = Int4Linear(first.in_features, sum(m.out_features for m in modules), first.group_size,
                           dtype=first.scales.dtype, device="meta")
        fused.qweight = torch.cat([m.qweight for m in modules], dim=1)
        fused.qzeros = torch.cat([m.qzeros for m in modules], dim=1)
        fused.scales = torch.cat([m.scales for m in modules], dim=1)
        fused.g_idx = first.g_idx.clone()
        return fused
    if isinstance(first, TernaryLinear) and all(isinstance(m, TernaryLinear) for m in modules):
        if any(m.group_size != first.group_size or m.scales.dtype != first.scales.dtype for m in modules):
            return None
        fused = TernaryLinear(first.in_features, sum(m.out_features for m in modules), first.group_size,
                              dtype=first.scales.dtype, device="meta")
        fused.qweight = torch.cat([m.qweight for m in modules])
        fused.scales = torch.cat([m.scales for m in modules])
        return fused
    return None
