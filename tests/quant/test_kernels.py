"""The packed INT4 / ternary C++ kernel equals its PyTorch statement of the same arithmetic (int8 activations,
integer group sums) to fp32 rounding, and the float dequantized weight within the activation rounding."""

from __future__ import annotations

import pytest
import torch

from minicpm4.quant import Int4Linear, TernaryLinear, int4, kernels, ternary

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernels.available(), reason="the quantized kernel needs an AVX512-VNNI CPU and a "
                                 "C++ compiler")]


def _int4(N, K, g, sym, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    return int4.rtn_quantize(w, g, sym)


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_equals_its_reference(M, sym, dtype):
    N, K, g = 70, 512, 128  # N not a multiple of the 4-row tile
    codes, scales, zeros = _int4(N, K, g, sym)
    w = kernels.pack_int4(codes, scales, zeros, g)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    y = kernels.linear(x, w)
    ref = kernels.reference_linear(x.float(), w, codes, zeros)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # fp32 summation order; bf16 output rounding (2^-8)
    assert torch.allclose(y.float(), ref, rtol=tol, atol=tol * ref.abs().max()), (y.float() - ref).abs().max()
    dense = x.float() @ int4.dequantize(codes, scales, zeros, int4.default_g_idx(K, g)).t()
    assert (y.float() - dense).norm() / dense.norm() < 0.02  # int8 activations: ~0.6% measured


def test_int4_kernel_with_act_order_permutation():
    N, K, g = 32, 256, 64
    codes, scales, zeros = _int4(N, K, g, True, seed=3)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1))
    w = kernels.pack_int4(codes, scales, zeros, g, perm=perm)
    x = torch.randn(5, K)
    ref = kernels.reference_linear(x, w, codes, zeros)
    assert torch.allclose(kernels.linear(x, w), ref, rtol=1e-4, atol=1e-4)
    dense = x[:, perm] @ int4.dequantize(codes, scales, zeros, int4.default_g_idx(K, g)).t()
    assert (ref - dense).norm() / dense.norm() < 0.02


@pytest.mark.parametrize("M", [1, 2, 9])
@pytest.mark.parametrize("g", [64, 128])
def test_ternary_kernel_equals_its_reference(M, g):
    N, K = 37, 384  # three 128-input ternary blocks
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(g))
    codes, scales = ternary.ternarize(w, g)
    packed = kernels.pack_ternary(codes, scales, g)
    x = torch.randn(M, K)
    ref = kernels.reference_linear(x, packed, codes)
    assert torch.allclose(kernels.linear(x, packed), ref, rtol=1e-4, atol=1e-4)
    dense = x @ ternary.dequantize_ternary(codes, scales).t()
    assert (ref - dense).norm() / dense.norm() < 0.02


def test_modules_take_the_kernel_and_match_dequantized():
    codes, scales, zeros = _int4(64, 256, 64, True, seed=5)
    lin = Int4Linear.from_codes(codes, scales, zeros, None, 64)
    x = torch.randn(4, 256)
    assert torch.allclose(lin(x), kernels.reference_linear(x, lin.kernel_weight(), codes, zeros), rtol=1e-4, atol=1e-4)
    tc, ts = ternary.ternarize(torch.randn(64, 256), 64)
    tl = TernaryLinear.from_codes(tc, ts, torch.float32)
    assert torch.allclose(tl(x), kernels.reference_linear(x, tl.kernel_weight(), tc), rtol=1e-4, atol=1e-4)


def test_group_sizes_the_kernel_cannot_take_are_refused():
    codes, scales, zeros = _int4(8, 96, 32, True)
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.pack_int4(codes, scales, zeros, 32)
