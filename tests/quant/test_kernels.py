"""The packed INT4 / ternary C++ GEMV (quant/kernels.py) equals its PyTorch statement of the same arithmetic
(`reference_linear`: int8 activations per group, exact integer group sums) to fp32 rounding, and the float
dequantized weight within the activation rounding; every tile shape, row count and thread gives the same bits.

Tolerances (measured on the dev box): kernel vs reference_linear, fp32 output: max |diff| <= 1e-5 max |ref|
(seen: 4e-7; fp32 summation order); bf16 output: one bf16 rounding (half an ulp, <= 2^-8 relative, of a value within fp32 rounding of the reference:
|diff| <= 2^-7 |ref| + 1e-5 max |ref|).
Against x W^T with the dequantized W: relative Frobenius error < 2% (seen 0.4-0.9% on Gaussian x: int8 rounding).
"""

from __future__ import annotations

import pytest
import torch

from minicpm4.quant import Int4Linear, TernaryLinear, int4, kernels, ternary

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernels.available(), reason="the packed kernel needs an AVX512-VNNI CPU and a "
                                 "C++ compiler")]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int4(N, K, g, sym=True, seed=0):
    return int4.rtn_quantize(torch.randn(N, K, generator=_gen(seed)), g, sym)


def _ternary(N, K, g, seed=0):
    return ternary.ternarize(torch.randn(N, K, generator=_gen(seed)), g)


def _assert_matches_reference(y, x, w):
    ref = kernels.reference_linear(x.float(), w)  # fp32 result of the float64 statement
    assert y.dtype == x.dtype and y.shape == ref.shape
    scale = ref.abs().max()
    if y.dtype == torch.float32:
        assert (y - ref).abs().max() <= 1e-5 * scale, (y - ref).abs().max() / scale
    else:
        assert ((y.float() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-5 * scale).all()


def _rel(y, dense):
    return ((y.float() - dense).norm() / dense.norm()).item()


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int4_kernel_equals_its_reference(M, sym, dtype):
    N, K, g = 70, 512, 128  # N not a multiple of the 16-row tile
    codes, scales, zeros = _int4(N, K, g, sym)
    w = kernels.pack_int4(codes, scales, zeros, g)
    x = torch.randn(M, K, generator=_gen(M)).to(dtype)
    y = kernels.linear(x, w)
    _assert_matches_reference(y, x, w)
    dense = x.float() @ int4.dequantize(codes, scales, zeros, int4.default_g_idx(K, g)).t()
    assert _rel(y, dense) < 0.02


@pytest.mark.parametrize("g", [16, 48, 64, 256])  # 48: an odd number of 16-input chunks per group
@pytest.mark.parametrize("M", [1, 5])
def test_int4_group_sizes(g, M):
    N, K = 33, 768
    codes, scales, zeros = _int4(N, K, g, sym=False, seed=g)
    w = kernels.pack_int4(codes, scales, zeros, g)
    x = torch.randn(M, K, generator=_gen(1))
    _assert_matches_reference(kernels.linear(x, w), x, w)


@pytest.mark.parametrize("M", [1, 4])
def test_int4_kernel_with_act_order_permutation(M):
    N, K, g = 32, 256, 64
    codes, scales, zeros = _int4(N, K, g, seed=3)
    perm = torch.randperm(K, generator=_gen(1))
    w = kernels.pack_int4(codes, scales, zeros, g, perm=perm)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(M, K, generator=_gen(2)).to(dtype)
        y = kernels.linear(x, w)
        _assert_matches_reference(y, x, w)
        dense = x.float()[:, perm] @ int4.dequantize(codes, scales, zeros, int4.default_g_idx(K, g)).t()
        assert _rel(y, dense) < 0.02


@pytest.mark.parametrize("M", [1, 2, 9, 64])
@pytest.mark.parametrize("g", [48, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ternary_kernel_equals_its_reference(M, g, dtype):
    N, K = 37, 384
    codes, scales = _ternary(N, K, g, seed=g)
    w = kernels.pack_ternary(codes, scales, g)
    x = torch.randn(M, K, generator=_gen(M)).to(dtype)
    y = kernels.linear(x, w)
    _assert_matches_reference(y, x, w)
    assert _rel(y, x.float() @ ternary.dequantize_ternary(codes, scales).t()) < 0.02


def test_packing_round_trips():
    codes, scales, zeros = _int4(21, 96, 32, sym=False)
    c, s, z = kernels.unpack(kernels.pack_int4(codes, scales, zeros, 32))
    assert torch.equal(c, codes) and torch.equal(s, scales.half().float()) and torch.equal(z.int(), zeros)
    tc, ts = _ternary(19, 64, 16)
    c, s, z = kernels.unpack(kernels.pack_ternary(tc, ts, 16))
    assert torch.equal(c.to(torch.int8) - 1, tc) and torch.equal(s, ts.half().float()) and bool((z == 1).all())
    # scales outside float16's range are kept as bfloat16
    big = kernels.pack_ternary(tc, ts * 1e6, 16)
    assert big.scale_dtype == torch.bfloat16 and torch.equal(kernels.unpack(big)[1], (ts * 1e6).bfloat16().float())
    x = torch.randn(3, 64, generator=_gen(0))
    _assert_matches_reference(kernels.linear(x, big), x, big)


def test_same_bits_for_every_row_count_and_thread_count():
    """Each output is computed by the same operations whatever the tile (token rows per tile, accumulator sets)
    or the thread: a row of a batch equals that row alone, and two threads equal one."""
    for w in (kernels.pack_int4(*_int4(100, 256, 64), 64), kernels.pack_ternary(*_ternary(100, 256, 64), 64)):
        x = torch.randn(70, 256, generator=_gen(4))  # 70 rows: a 64-row block, then 6
        y = kernels.linear(x, w, threads=1)
        for m in (0, 5, 69):
            assert torch.equal(kernels.linear(x[m:m + 1], w, threads=1)[0], y[m])
        assert torch.equal(kernels.linear(x[:9], w, threads=1), y[:9])
        for _ in range(5):
            assert torch.equal(kernels.linear(x, w, threads=2), y)


def test_modules_take_the_kernel_and_match_dequantized():
    codes, scales, zeros = _int4(64, 256, 64, seed=5)
    lin = Int4Linear.from_codes(codes, scales, zeros, None, 64)
    x = torch.randn(4, 256)
    assert lin.kernel_weight() is not None
    assert torch.equal(lin(x), kernels.linear(x, lin.kernel_weight()))
    assert _rel(lin(x), x @ lin.dequantize().t()) < 0.02
    tc, ts = _ternary(64, 256, 64)
    tl = TernaryLinear.from_codes(tc, ts, torch.float32)
    assert torch.equal(tl(x), kernels.linear(x, tl.kernel_weight()))
    assert _rel(tl(x), x @ tl.dequantize().t()) < 0.02


def test_shapes_the_kernel_cannot_take_are_refused():
    codes, scales, zeros = _int4(8, 96, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.pack_int4(codes, scales, zeros, 8)
    codes, scales, zeros = _int4(8, 96, 32)
    with pytest.raises(ValueError, match=r"scales must be \[N, K / group_size\]"):
        kernels.pack_int4(codes, scales, zeros, 16)
    w = kernels.pack_int4(codes, scales, zeros, 32)
    with pytest.raises(ValueError, match="x must be"):
        kernels.linear(torch.randn(2, 64), w)
    assert not kernels.supports(24, 96) and kernels.supports(48, 96)
