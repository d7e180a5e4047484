"""C++ GEMV / skinny GEMM for packed INT4 and ternary weights on AVX512-VNNI CPUs (decode and prefill alike).

Why integer dot products: decode reads every weight once per token, so a packed linear is as fast as its bytes
only if unpacking costs less than the load. Codes are unpacked to unsigned bytes with two or three vector ops
and multiplied with int8 activations by `vpdpbusd` (u8 x s8 -> s32, 32 products per instruction on 256 bits);
widening codes to bf16 for `vdpbf16ps` costs several ops per 32 weights and made the GEMV compute-bound here.
So the activations are quantized on the fly, per token row and per weight group: s_x = max|x_g| / 127,
xq = round(x / s_x) (W4A8 / W1.58A8 dynamic, as llama.cpp's Q4_0 x Q8_0 and TQ2_0 x Q8_K dot products).

    INT4     y[m, n] = sum_g s[n, g] s_x[m, g] (sum_k q[n, k] xq[m, k] - z[n, g] sum_k xq[m, k])
    ternary  y[m, n] = sum_g s[n, g] s_x[m, g] (sum_k (c[n, k] + 1) xq[m, k] - sum_k xq[m, k])

Layouts (built by pack_int4 / pack_ternary from the module's codes), per output row, in chunks of 64 inputs:
    INT4     32 bytes: byte j = q[k0 + j] | q[k0 + 32 + j] << 4
    ternary  32 bytes per 128 inputs: byte j = (c + 1) of k0 + j, k0 + 32 + j, k0 + 64 + j, k0 + 96 + j at bits 0/2/4/6
so one 256-bit load, a shift and two masks give 64 codes in input order for either format (a first ternary layout
of 16 bytes per 64 inputs needed a 128-bit insert per chunk and ran 2.6x slower than INT4 at 16 rows). Group sizes
must be multiples of 64 (ternary rows: multiples of 128 inputs). `reference_linear` is the same arithmetic in PyTorch (the kernel's test oracle); against the float
dequantized weight the activation rounding adds a relative error of ~0.3% (measured in tests/quant/test_kernels.py).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from minicpm4.attention import cpp_build

# Rows up to which `linear` is the path. Measured on 8192 x 1024, group 128, bf16 activations (2 threads): 14 / 36 / 71 ms
# at 64 / 256 / 512 rows vs PyTorch's int4pack 18 / 64 / 117 ms (and bf16 F.linear 22 / 36 / 62): faster at every
# size, and one path for every M keeps decode and prefill numerics the same (engine == reference by construction).
MAX_ROWS = 1 << 30
CHUNK = 64
TERNARY_BLOCK = 128  # inputs per 32-byte ternary block (four 2-bit planes of 32)

_SOURCE = r"""
#if !defined(__AVX512VNNI__) || !defined(__AVX512VL__)
#error "the quantized GEMV needs AVX512-VNNI (the PyTorch paths run elsewhere)"
#endif
#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>

typedef uint16_t bf16;
static inline float bf2f(bf16 x) { uint32_t u = uint32_t(x) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16 f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return bf16(u >> 16); }

// xq [M, K] int8, sx [M, G] fp32, sumx [M, G] int32 from x [M, K] (fp32 or bf16), gathered by perm when given.
extern "C" void qk_quantize_act(const void* x, int64_t xbf16, const int64_t* perm, int64_t M, int64_t K, int64_t gs,
                                int8_t* xq, float* sx, int32_t* sumx) {
    const int64_t G = K / gs;
    float* buf = new float[K];
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < K; ++k) {
            const int64_t src = perm ? perm[k] : k;
            buf[k] = xbf16 ? bf2f(((const bf16*)x)[m * K + src]) : ((const float*)x)[m * K + src];
        }
        for (int64_t g = 0; g < G; ++g) {
            float amax = 0.f;
            for (int64_t k = g * gs; k < (g + 1) * gs; ++k) amax = std::max(amax, std::fabs(buf[k]));
            const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int32_t sum = 0;
            for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
                const int32_t q = (int32_t)std::nearbyint(buf[k] * inv);
                xq[m * K + k] = (int8_t)q;
                sum += q;
            }
            sx[m * G + g] = s;
            sumx[m * G + g] = sum;
        }
    }
    delete[] buf;
}

static inline float hsumf(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Codes of row r's chunk at input k0 as two vectors of 32 unsigned bytes (inputs k0..k0+31, k0+32..k0+63).
template <int FMT>
static inline void unpack(const uint8_t* wr, int64_t k0, __m256i& lo, __m256i& hi) {
    if (FMT == 0) {
        const __m256i m4 = _mm256_set1_epi8(0x0f);
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wr + k0 / 2));
        lo = _mm256_and_si256(v, m4);
        hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    } else {  // ternary: a 32-byte block holds 128 inputs; k0 % 128 selects its bit pair 0/2 or 4/6
        const __m256i m2 = _mm256_set1_epi8(0x03);
        const __m256i v = _mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)(wr + (k0 / 128) * 32)), (int)(k0 % 128) / 16);
        lo = _mm256_and_si256(v, m2);
        hi = _mm256_and_si256(_mm256_srli_epi16(v, 2), m2);
    }
}

// R weight rows x T token rows: integer group sums in R*T accumulators, scaled into fp32 vectors once per group
// (cvt + fma), reduced once per row; the zero-point term sum_g s_x (s z) sum xq is a short scalar dot per (row, token).
// Independent accumulators keep vpdpbusd's latency hidden (one row alone was latency-bound: ~9 GB/s).
template <int FMT, int R, int T>
static inline void tile(const uint8_t* w, int64_t rowb, const float* ws, const float* zs, const int8_t* xq,
                        const float* sx, const int32_t* sumx, int64_t K, int64_t G, int64_t cpg, int64_t n, int64_t m,
                        float* out /* [T][R] */) {
    __m256 af[T][R];
    for (int t = 0; t < T; ++t) for (int r = 0; r < R; ++r) af[t][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256i ai[T][R];
        for (int t = 0; t < T; ++t) for (int r = 0; r < R; ++r) ai[t][r] = _mm256_setzero_si256();
        for (int64_t c = 0; c < cpg; ++c) {
            const int64_t k0 = (g * cpg + c) * 64;
            __m256i lo[R], hi[R];
            for (int r = 0; r < R; ++r) unpack<FMT>(w + (n + r) * rowb, k0, lo[r], hi[r]);
            for (int t = 0; t < T; ++t) {
                const int8_t* xr = xq + (m + t) * K + k0;
                const __m256i x0 = _mm256_loadu_si256((const __m256i*)xr), x1 = _mm256_loadu_si256((const __m256i*)(xr + 32));
                for (int r = 0; r < R; ++r) {
                    ai[t][r] = _mm256_dpbusd_epi32(ai[t][r], lo[r], x0);
                    ai[t][r] = _mm256_dpbusd_epi32(ai[t][r], hi[r], x1);
                }
            }
        }
        for (int t = 0; t < T; ++t) {
            const float sxg = sx[(m + t) * G + g];
            for (int r = 0; r < R; ++r)
                af[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[t][r]), _mm256_set1_ps(ws[(n + r) * G + g] * sxg), af[t][r]);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) {
            float off = 0.f;
            const float* o = FMT == 0 ? zs + (n + r) * G : ws + (n + r) * G;  // s z, or s (ternary's c + 1)
            for (int64_t g = 0; g < G; ++g) off += o[g] * sx[(m + t) * G + g] * (float)sumx[(m + t) * G + g];
            out[t * R + r] = hsumf(af[t][r]) - off;
        }
}

template <int FMT>
static void rows(const uint8_t* w, const float* ws, const float* zs, const int8_t* xq, const float* sx, const int32_t* sumx,
                 int64_t M, int64_t N, int64_t K, int64_t gs, void* y, int64_t ybf16, int64_t n0, int64_t n1) {
    const int64_t G = K / gs, cpg = gs / 64, rowb = FMT == 0 ? K / 2 : K / 4;
    auto store = [&](int64_t m, int64_t n, float v) {
        if (ybf16) ((bf16*)y)[m * N + n] = f2bf(v); else ((float*)y)[m * N + n] = v;
    };
    float out[8];
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) {
            tile<FMT, 4, 2>(w, rowb, ws, zs, xq, sx, sumx, K, G, cpg, n, m, out);
            for (int t = 0; t < 2; ++t) for (int r = 0; r < 4; ++r) store(m + t, n + r, out[t * 4 + r]);
        }
        for (; m < M; ++m) {
            tile<FMT, 4, 1>(w, rowb, ws, zs, xq, sx, sumx, K, G, cpg, n, m, out);
            for (int r = 0; r < 4; ++r) store(m, n + r, out[r]);
        }
    }
    for (; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) {
            tile<FMT, 1, 1>(w, rowb, ws, zs, xq, sx, sumx, K, G, cpg, n, m, out);
            store(m, n, out[0]);
        }
}

extern "C" void qk_gemv(int64_t fmt, const uint8_t* w, const float* ws, const float* zs, const int8_t* xq, const float* sx,
                        const int32_t* sumx, int64_t M, int64_t N, int64_t K, int64_t gs, void* y, int64_t ybf16,
                        int64_t threads) {
    const int64_t rows_per = 16, chunks = (N + rows_per - 1) / rows_per;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t n0 = c * rows_per, n1 = std::min(N, n0 + rows_per);
        if (fmt == 0) rows<0>(w, ws, zs, xq, sx, sumx, M, N, K, gs, y, ybf16, n0, n1);
        else rows<1>(w, ws, zs, xq, sx, sumx, M, N, K, gs, y, ybf16, n0, n1);
    }
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_P, _I = ctypes.c_void_p, ctypes.c_int64


def library() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            lib = cpp_build.build_library("quant_gemv", _SOURCE, cpp_build.FLAGS + ["-fopenmp"])
            if lib is not None:
                lib.qk_quantize_act.argtypes = [_P, _I, _P, _I, _I, _I, _P, _P, _P]
                lib.qk_quantize_act.restype = None
                lib.qk_gemv.argtypes = [_I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _P, _I, _I]
                lib.qk_gemv.restype = None
            _lib = lib
    return _lib


def available() -> bool:
    return library() is not None


@dataclass
class PackedWeight:
    fmt: int  # 0 INT4, 1 ternary
    data: torch.Tensor  # uint8 [N, K/2] or [N, K/4], the chunk layout of the module docstring
    scales: torch.Tensor  # fp32 [N, G]
    zero_scales: torch.Tensor  # fp32 [N, G]: s * z (INT4), unused for ternary
    N: int
    K: int
    group_size: int
    perm: torch.Tensor | None  # int64 [K]: the layer computes x[:, perm] W^T (act-order checkpoints)


def _check(K: int, group_size: int) -> None:
    if group_size % CHUNK or K % group_size:
        raise ValueError(f"the packed kernel needs group_size a multiple of {CHUNK} dividing K={K}, got {group_size}")


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              perm: torch.Tensor | None = None) -> PackedWeight:
    N, K = codes.shape
    _check(K, group_size)
    c = codes.to(torch.uint8).reshape(N, K // CHUNK, 2, 32)
    data = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, K // 2).contiguous()
    s = scales.float().contiguous()
    return PackedWeight(0, data, s, (s * zeros.float()).contiguous(), N, K, group_size,
                        None if perm is None else perm.to(torch.int64).contiguous())


def pack_ternary(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> PackedWeight:
    N, K = codes.shape
    _check(K, group_size)
    if K % TERNARY_BLOCK:
        raise ValueError(f"the packed ternary kernel needs in_features a multiple of {TERNARY_BLOCK}, got {K}")
    c = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(N, K // TERNARY_BLOCK, 4, 32)
    data = (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(N, K // 4).contiguous()
    s = scales.float().contiguous()
    return PackedWeight(1, data, s, torch.zeros(0), N, K, group_size, None)


def linear(x: torch.Tensor, w: PackedWeight, threads: int | None = None) -> torch.Tensor:
    """x [M, K] fp32/bf16 contiguous -> y [M, N] in x.dtype."""
    lib = library()
    assert lib is not None, "the quantized GEMV is not built"
    M, K = x.shape
    assert K == w.K and x.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16), (x.shape, x.dtype)
    G = K // w.group_size
    xq = torch.empty(M, K, dtype=torch.int8)
    sx = torch.empty(M, G, dtype=torch.float32)
    sumx = torch.empty(M, G, dtype=torch.int32)
    bf = int(x.dtype == torch.bfloat16)
    lib.qk_quantize_act(x.data_ptr(), bf, w.perm.data_ptr() if w.perm is not None else None, M, K, w.group_size,
                        xq.data_ptr(), sx.data_ptr(), sumx.data_ptr())
    y = torch.empty(M, w.N, dtype=x.dtype)
    lib.qk_gemv(w.fmt, w.data.data_ptr(), w.scales.data_ptr(), w.zero_scales.data_ptr(), xq.data_ptr(), sx.data_ptr(),
                sumx.data_ptr(), M, w.N, K, w.group_size, y.data_ptr(), bf, threads or torch.get_num_threads())
    return y


def quantize_activations(x: torch.Tensor, group_size: int, perm: torch.Tensor | None = None):
    """The kernel's activation rounding in PyTorch: (xq [M, K] float holding int8 values, s_x [M, G])."""
    x = x.float() if perm is None else x.float()[:, perm]
    M, K = x.shape
    xg = x.reshape(M, K // group_size, group_size)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv[..., None])
    return xq.reshape(M, K), amax / 127.0


def reference_linear(x: torch.Tensor, w: PackedWeight, codes: torch.Tensor, zeros: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch from the (already permuted) codes: int8 activations, exact integer group
    sums, fp32 scaling. codes: INT4 [N, K] in 0..15 (zeros [N, G]) or ternary [N, K] in {-1, 0, 1}."""
    xq, sx = quantize_activations(x, w.group_size, w.perm)
    M, K = xq.shape
    G = K // w.group_size
    q = codes.double() + (1 if w.fmt == 1 else 0)
    dots = torch.einsum("mgk,ngk->mng", xq.double().view(M, G, -1), q.view(w.N, G, -1))
    sums = xq.double().view(M, G, -1).sum(-1)  # [M, G]
    offset = zeros.double() if w.fmt == 0 else torch.ones(w.N, G, dtype=torch.float64)
    y = ((dots - offset[None] * sums[:, None, :]) * w.scales.double()[None] * sx.double()[:, None, :]).sum(-1)
    return y.to(x.dtype)
