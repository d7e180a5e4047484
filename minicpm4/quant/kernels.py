"""Packed INT4 / ternary GEMV and skinny GEMM on AVX512-VNNI CPUs: the kernels behind Int4Linear / TernaryLinear
and FastDecoder's packed layers (one thread pool: the C++ below is compiled into engine/fast_kernel.py's library).

Decode reads every weight once per token, so a packed linear is as fast as its bytes only if unpacking costs less
than the load. Codes are unpacked to unsigned bytes with one vector op and multiplied with int8 activations by
`vpdpbusd` (u8 x s8 -> s32, 64 products per 512-bit instruction). So activations are quantized on the fly, per
token row and per weight group (symmetric, s_x = max|x_g| / 127, xq = round(x * (127 / max|x_g|)); W4A8 / W1.58A8
dynamic, as llama.cpp's Q4_0 x Q8_0 and TQ2_0 x Q8_K dot products):

    INT4     y[m, n] = sum_g s[n, g] s_x[m, g] (sum_k q[n, k] xq[m, k] - z[n, g] sum_k xq[m, k])      q in 0..15
    ternary  y[m, n] = sum_g s[n, g] s_x[m, g] (sum_k (c[n, k] + 1) xq[m, k] - sum_k xq[m, k])       c in -1..1

Per (row, group) the integer sums are exact; then fp32: acc += float(sum) * (s * s_x), acc -= (s z) * (s_x sum xq).
Activation blocks = the weight's groups, so one scaling per (row, group); measured error vs x W^T with the
dequantized W: 0.4-0.9% of the output norm on Gaussian activations (tests/quant/test_kernels.py).

Layout (pack_int4 / pack_ternary), row-interleaved: rows in tiles of 16, inputs in chunks of IPC = 8 (INT4) or 16
(ternary); a tile's chunk is one 64-byte vector whose int32 lane i holds row i's IPC codes (INT4: byte p = q[k0 + p]
| q[k0 + 4 + p] << 4; ternary: byte p holds c + 1 of k0 + 4j + p at bits 2j). One vpdpbusd multiplies 16 rows' 4
codes by the same 4 activation bytes (a broadcast memory operand), so a lane accumulates its row's dot product: no
horizontal sums, and the per-group scaling costs 4 ops per 16 rows instead of 3 per row. The first layout (one row
per vector, groups along lanes) spent as much time scaling as multiplying once several token rows shared the codes:
16 rows of 1024 -> 8192 took 1.86 ms vs 1.04 ms now (1 thread), slower than the bf16 kernel. Sub-vectors are masked
in place (never shifted: & 0x0f / & 0xf0, & 3 << 2j) into separate accumulators, shifted back once per group.
Per (tile, group) metadata in one stream beside the codes: 16 fp16 scales (exact for GPTQ's fp16 and for bf16 ternary
scales; bf16 where fp16's range does not hold them) and, INT4, 16 uint8 zero points: 4.19 bits per weight at INT4
group 128 (Q4_0: 4.5), 2.25 at ternary group 64. Separate fp32 scale and s*z arrays (three streams, 4.5 bits) cost
15% on the 40 MB INT4 head (1.33 -> 1.12 ms without the third stream). Group sizes: multiples of 16 dividing K; N is
padded to the tile (zero codes and scales).

Measured (benchmarks/quant_kernels.py, 2-core EPYC, 2 threads, bf16 activations, weights cycled past the L3; the
box is shared, see the JSON): one token, 1024 -> 8192: bf16 kernel 0.77 ms (21.8 GB/s), INT4 0.146 ms (30 GB/s,
the box's 2-thread stream read), PyTorch int4pack 0.26, ternary 0.088; the INT4 head 1.33 ms. 16 tokens: bf16 1.40,
INT4 0.60, int4pack 1.88, ternary 0.82 ms. Whole 0.5B decode through the engine: bf16 51.6 ms/token, INT4 (INT4
head) 15.6, ternary (ternary head) 11.1. `reference_linear` is the same arithmetic in PyTorch (the test oracle).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

# Rows up to which `linear` is the path (linear.py's forward). benchmarks/quant_kernels.py's M sweep, 1024 -> 8192,
# group 128, bf16 activations, 2 threads: ours 0.12 / 1.15 / 3.75 / 9.1 / 18.0 ms at M = 1 / 16 / 64 / 256 / 512, vs
# PyTorch's int4pack 0.26 / 2.0 / 7.4 / 28.8 / 58.4 and bf16 F.linear 1.3 / 2.2 / 4.6 / 11.9 / 26.0: faster at every
# size (and one path keeps prefill and decode numerics equal), so no limit.
MAX_ROWS = 1 << 30
CHUNK = 16  # group sizes must be multiples of this (the activation quantizer's vector)
_ROWS = 16  # rows per tile: one int32 lane each
_NS = {"int4": 2, "ternary": 4}  # sub-vectors per 64-byte chunk (codes per byte)
_FMT = {"int4": 1, "ternary": 2}  # the C++'s QW::fmt (0 is a dense weight)
CHUNK_KB = 64  # weight KB per pool work item, as FastDecoder's KernelModel (16 .. 256 KB measured alike on the head)

CPP_GEMV = r"""
// ---- packed INT4 / ternary GEMV (minicpm4/quant/kernels.py states the layout and the arithmetic) ---------------
// A packed weight (kernels.py's _QW mirrors it): data [Np/16][K/IPC][64] (a chunk: 16 rows x IPC inputs, int32 lane i =
// row i); meta [Np/16][G][MB]: the 16 rows' scales (fp16, or bf16 when sbf16) then, INT4, their zero points (uint8);
// MB = 48 (INT4) or 32 (ternary); perm [K] int32 or null. IPC = 8 (INT4), 16 (ternary).
struct QW { const uint8_t* data; const uint8_t* meta; const int32_t* perm; int64_t fmt, N, K, Np, G, gs, sbf16; };
struct QAct { const int8_t* xq; const float* sx; const float* cx; };  // xq [M][K], sx = s_x, cx = s_x sum xq [M][G]
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QK_VNNI 1
// Software prefetch 1 KB ahead in the code stream for tiles of <= 2 token rows (DRAM-bound): +9% on the 40 MB INT4
// head at 2 threads (24 -> 26.5 GB/s, the box's 2-thread stream read then 29); 512 .. 2048 B measured alike.
static constexpr int64_t QPF = 1024;

// One token row x [K] (fp32 / bf16; gathered through perm) -> xq [K], sx and cx [G]. buf: K floats of scratch.
// Rounding as PyTorch's round(x * (127 / amax)): an fp32 product, then half to even (cvtps with the default MXCSR).
template <typename T>
static void qquant_row(const QW& w, const T* x, int8_t* xq, float* sx, float* cx, float* buf) {
    const int64_t K = w.K, gs = w.gs, G = K / gs;
    const float* xf = (const float*)x;
    if (w.perm) {  // act-order: gather (scalar; such checkpoints are rare)
        for (int64_t k = 0; k < K; ++k) {
            const T v = x[w.perm[k]];
            if constexpr (sizeof(T) == 2) buf[k] = bf2f(v); else buf[k] = v;
        }
        xf = buf;
    } else if constexpr (sizeof(T) == 2) {  // bf16 -> fp32 (exact), 16 at a time (K is a multiple of 16)
        for (int64_t k = 0; k < K; k += 16) {
            const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + k)));
            _mm512_storeu_ps(buf + k, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        }
        xf = buf;
    }
    for (int64_t g = 0; g < G; ++g) {
        const float* xg = xf + g * gs;
        __m512 mx = _mm512_setzero_ps();
        for (int64_t i = 0; i < gs; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xg + i)));
        const float amax = _mm512_reduce_max_ps(mx), inv = amax > 0.f ? 127.f / amax : 0.f;
        const __m512 vi = _mm512_set1_ps(inv);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t i = 0; i < gs; i += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + i), vi));
            sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128((__m128i*)(xq + g * gs + i), _mm512_cvtepi32_epi8(q));
        }
        sx[g] = amax / 127.f;
        cx[g] = sx[g] * (float)_mm512_reduce_add_epi32(sum);
    }
}

// 16 rows (n: a multiple of 16) x T token rows (m: first) -> acc[(m + t) * lda + r] for the first nv rows.
// SH false: codes are masked in place, never shifted: sub-vector j holds q * 16^j (INT4: & 0x0f, & 0xf0) or
// (c + 1) * 4^j (ternary: & 3 << 2j), each into its own accumulator, shifted back (exactly: a multiple of 2^(bits j))
// once per group: one op per sub-vector, NS accumulators per token row. SH true (ternary, several token rows): shift
// then mask (two ops, shared by the T rows) into one accumulator per token row, so T = 8 fits in registers.
// A > 1 accumulator sets alternate over chunks: with one token row, NS chains of 5-cycle vpdpbusd were
// latency-bound. Integer sums are exact, so per (row, token) the result is the same bits whatever T, A, SH or thread.
template <int FMT, int T, int A, bool SH>
static inline void qtile(const QW& w, const QAct& a, int64_t n, int64_t m, float* acc, int64_t lda, int64_t nv) {
    constexpr int NS = FMT == 1 ? 2 : 4, IPC = 4 * NS, B = 8 / NS;  // sub-vectors, inputs per chunk, bits per code
    constexpr int NA = SH ? 1 : NS;  // accumulators per (token row, set)
    const int64_t K = w.K, G = w.G, cpg = w.gs / IPC;
    constexpr int64_t MB = FMT == 1 ? 48 : 32;
    const uint8_t* wt = w.data + (n / 16) * (K / IPC) * 64;
    const uint8_t* mt = w.meta + (n / 16) * G * MB;
    __m512i mask[NS];
    UNR for (int j = 0; j < NS; ++j) mask[j] = _mm512_set1_epi8((char)(((1 << B) - 1) << (B * j)));
    __m512 af[T];
    UNR for (int t = 0; t < T; ++t) af[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m512i ai[T][NA][A];
        UNR for (int t = 0; t < T; ++t) UNR for (int j = 0; j < NA; ++j) UNR for (int s = 0; s < A; ++s) ai[t][j][s] = _mm512_setzero_si512();
        const int64_t c1 = (g + 1) * cpg;
        for (int64_t c = g * cpg; c < c1; c += A) {
            UNR for (int s = 0; s < A; ++s) {
                if (T <= 2) _mm_prefetch((const char*)(wt + (c + s) * 64 + QPF), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(wt + (c + s) * 64);
                UNR for (int j = 0; j < NS; ++j) {
                    const __m512i u = SH ? _mm512_and_si512(j ? _mm512_srli_epi16(v, B * j) : v, mask[0])
                                         : _mm512_and_si512(v, mask[j]);
                    UNR for (int t = 0; t < T; ++t) {
                        int32_t xb;  // inputs 4j .. 4j + 3 of the chunk, broadcast to every row's lane
                        memcpy(&xb, a.xq + (m + t) * K + (c + s) * IPC + 4 * j, 4);
                        __m512i& d = ai[t][SH ? 0 : j][s];
                        d = _mm512_dpbusd_epi32(d, u, _mm512_set1_epi32(xb));
                    }
                }
            }
        }
        const __m256i s16 = _mm256_loadu_si256((const __m256i*)(mt + g * MB));
        const __m512 sw = w.sbf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(s16), 16)) : _mm512_cvtph_ps(s16);
        const __m512 zw = FMT == 1  // s z (INT4), s (ternary: codes c + 1, zero point 1)
            ? _mm512_mul_ps(sw, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(mt + g * MB + 32)))))
            : sw;
        UNR for (int t = 0; t < T; ++t) {
            __m512i d = _mm512_setzero_si512();
            UNR for (int j = 0; j < NA; ++j) {
                __m512i e = ai[t][j][0];
                UNR for (int s = 1; s < A; ++s) e = _mm512_add_epi32(e, ai[t][j][s]);
                d = _mm512_add_epi32(d, j ? _mm512_srai_epi32(e, B * j) : e);
            }
            const float sxg = a.sx[(m + t) * G + g], cxg = a.cx[(m + t) * G + g];
            af[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, _mm512_set1_ps(sxg)), af[t]);
            af[t] = _mm512_fnmadd_ps(zw, _mm512_set1_ps(cxg), af[t]);  // the zero point: s z s_x sum xq
        }
    }
    const __mmask16 k = nv >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nv) - 1);
    UNR for (int t = 0; t < T; ++t) _mm512_mask_storeu_ps(acc + (m + t) * lda, k, af[t]);
}

// Rows [n0, n1) (n0 a multiple of 16) against M token rows -> acc [M][n1 - n0]: T token rows at a time, each 16-row
// tile's codes re-read from L1 per T tokens (T <= 8: INT4 24 accumulators, ternary with SH 16).
template <int FMT>
static void qrows_t(const QW& w, const QAct& a, int64_t M, int64_t n0, int64_t n1, float* acc) {
    constexpr int TM = 8;
    constexpr bool SH = FMT == 2;
    const int64_t lda = n1 - n0, cpg = w.gs / (FMT == 1 ? 8 : 16);
    for (int64_t n = n0; n < n1; n += 16) {
        float* an = acc + (n - n0);
        const int64_t nv = std::min<int64_t>(16, n1 - n);
        int64_t m = 0;
        auto run = [&](auto tc) __attribute__((always_inline)) {
            constexpr int T = decltype(tc)::value;
            qtile<FMT, T, 1, SH>(w, a, n, m, an, lda, nv);
            m += T;
        };
        if (M == 1) {
            if (cpg % 2 == 0) qtile<FMT, 1, 2, false>(w, a, n, 0, an, lda, nv);
            else qtile<FMT, 1, 1, false>(w, a, n, 0, an, lda, nv);
            continue;
        }
        while (M - m >= TM) run(std::integral_constant<int, TM>{});
        switch (M - m) {
            case 7: if constexpr (TM > 7) run(std::integral_constant<int, 7>{}); break;
            case 6: if constexpr (TM > 6) run(std::integral_constant<int, 6>{}); break;
            case 5: if constexpr (TM > 5) run(std::integral_constant<int, 5>{}); break;
            case 4: if constexpr (TM > 4) run(std::integral_constant<int, 4>{}); break;
            case 3: run(std::integral_constant<int, 3>{}); break;
            case 2: run(std::integral_constant<int, 2>{}); break;
            case 1: run(std::integral_constant<int, 1>{}); break;
        }
    }
}
static void qrows(const QW& w, const QAct& a, int64_t M, int64_t n0, int64_t n1, float* acc) {
    if (w.fmt == 1) qrows_t<1>(w, a, M, n0, n1, acc);
    else qrows_t<2>(w, a, M, n0, n1, acc);
}
#else
static void qrows(const QW&, const QAct&, int64_t, int64_t, int64_t, float*) { abort(); }  // never called: ff_has_vnni() == 0
template <typename T> static void qquant_row(const QW&, const T*, int8_t*, float*, float*, float*) { abort(); }
#endif
// M token rows x [M, K] -> xq [M][K], sx, cx [M][G]
static void qquant(const QW& q, const void* x, int64_t xbf16, int64_t M, int8_t* xq, float* sx, float* cx, float* buf) {
    for (int64_t t = 0; t < M; ++t) {
        if (xbf16) qquant_row(q, (const bf16*)x + t * q.K, xq + t * q.K, sx + t * q.G, cx + t * q.G, buf);
        else qquant_row(q, (const float*)x + t * q.K, xq + t * q.K, sx + t * q.G, cx + t * q.G, buf);
    }
}
"""


# After the pool (fast_kernel.py's `linear`): the packed linear on its own, and the ISA probe.
CPP_ENTRY = r"""
// A packed linear on its own (Int4Linear / TernaryLinear forward): y [M, N] (bf16 when out_mode 1, else fp32) =
// x [M, K] W^T, any M, in blocks of 64 token rows. threads: 0 = the caller only, else the pool. The activations are
// quantized into staging that only grows (a replaced buffer is never freed: a descheduled worker may still read it).
extern "C" void ff_qlinear(const QW* w, const void* x, int64_t xbf16, int64_t M, void* y, int64_t out_mode,
                           int64_t threads, int64_t chunk_kb) {
    static std::mutex mu;
    static int8_t* xq = nullptr;
    static float *sx = nullptr, *cx = nullptr, *buf = nullptr;
    static int64_t cap_k = 0, cap_g = 0;
    constexpr int64_t MB = 64;
    std::lock_guard<std::mutex> lock(mu);
    const QW& q = *w;
    if (q.K > cap_k) { cap_k = q.K; xq = (int8_t*)scratch(MB * cap_k); buf = (float*)scratch(cap_k * 4); }
    if (q.G > cap_g) { cap_g = q.G; sx = (float*)scratch(MB * cap_g * 4); cx = (float*)scratch(MB * cap_g * 4); }
    const int64_t xe = xbf16 ? 2 : 4, ye = out_mode == 1 ? 2 : 4;
    for (int64_t s = 0; s < M; s += MB) {
        const int64_t n = std::min(MB, M - s);
        qquant(q, (const char*)x + s * q.K * xe, xbf16, n, xq, sx, cx, buf);
        linear(Lin{nullptr, nullptr, (char*)y + s * q.N * ye, n, q.N, q.K, q.N, rows_for(chunk_kb, qrow_bytes(q), 16), 0,
                   out_mode, &q, QAct{xq, sx, cx}}, threads);
    }
}

extern "C" int64_t ff_has_vnni() {
#ifdef QK_VNNI
    return 1;
#else
    return 0;
#endif
}
"""


class _QW(ctypes.Structure):
    """The C++ QW descriptor (field order and types as in CPP_GEMV)."""
    _fields_ = [(n, ctypes.c_void_p) for n in ("data", "meta", "perm")] + \
               [(n, ctypes.c_int64) for n in ("fmt", "N", "K", "Np", "G", "gs", "sbf16")]


def _lib():
    from minicpm4.engine import fast_kernel  # lazily: engine modules import quant modules

    lib = fast_kernel.library()
    return lib if lib is not None and lib.ff_has_vnni() else None


def available() -> bool:
    """True when the packed kernel is built for this CPU (AVX512-VNNI + BW, a C++ compiler). Never raises."""
    try:
        return _lib() is not None
    except Exception:  # noqa: BLE001 - a broken toolchain means "not available", never an import-time failure
        return False


def supports(group_size: int, in_features: int) -> bool:
    """Whether pack_int4 / pack_ternary take this shape."""
    return group_size > 0 and group_size % CHUNK == 0 and in_features % group_size == 0


def _check(fmt: str, N: int, K: int, group_size: int, scales: torch.Tensor) -> None:
    if not supports(group_size, K):
        raise ValueError(f"the packed {fmt} kernel needs a group_size that is a multiple of {CHUNK} and divides "
                         f"K={K}, got {group_size}")
    if tuple(scales.shape) != (N, K // group_size):
        raise ValueError(f"scales must be [N, K / group_size] = [{N}, {K // group_size}], got {tuple(scales.shape)}")


@dataclass(eq=False)
class PackedWeight:
    """A linear's weight in the kernel's layout (module docstring); the tensors stay alive with this object."""

    format: str  # "int4" | "ternary"
    N: int
    K: int
    group_size: int
    data: torch.Tensor  # uint8 [Np / 16, K / IPC, 64]: codes, 16 rows interleaved by int32 lane
    meta: torch.Tensor  # uint8 [Np / 16, G, 48 | 32]: 16 scales (scale_dtype), INT4 then 16 zero points (uint8)
    scale_dtype: torch.dtype  # float16, or bfloat16 for scales outside float16's normal range
    perm: torch.Tensor | None  # int64 [K]: the layer computes x[:, perm] W^T (act-order checkpoints)
    _perm32: torch.Tensor | None = field(default=None, repr=False)
    _desc: _QW | None = field(default=None, repr=False)
    _desc_key: tuple = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.perm is not None and self._perm32 is None:
            self._perm32 = self.perm.to(torch.int32).contiguous()

    @property
    def Np(self) -> int:
        return self.data.shape[0] * _ROWS

    def nbytes(self) -> int:
        """Bytes a GEMV reads: codes, scales and zero points."""
        return self.data.nbytes + self.meta.nbytes

    def desc(self) -> _QW:
        """The C++ descriptor; rebuilt if the tensors moved (a copied module holds new tensors)."""
        key = (self.data.data_ptr(), self.meta.data_ptr())
        if self._desc is None or key != self._desc_key:
            perm = None if self._perm32 is None else self._perm32.data_ptr()
            self._desc = _QW(self.data.data_ptr(), self.meta.data_ptr(), perm, _FMT[self.format], self.N, self.K,
                             self.Np, self.K // self.group_size, self.group_size,
                             int(self.scale_dtype == torch.bfloat16))
            self._desc_key = key
        return self._desc

    def __del__(self) -> None:
        # A pool worker descheduled inside a stolen chunk may still read these tensors: wait for it first.
        try:
            from minicpm4.engine import fast_kernel

            if fast_kernel._lib is not None:
                fast_kernel._lib.ff_pool_quiesce()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [Np / 16, 16, ...] with zero rows padded."""
    N = t.shape[0]
    Np = -(-N // _ROWS) * _ROWS
    out = torch.zeros(Np, *t.shape[1:], dtype=t.dtype)
    out[:N] = t
    return out.view(Np // _ROWS, _ROWS, *t.shape[1:])


def _scale_dtype(scales: torch.Tensor) -> torch.dtype:
    """float16 (exact for GPTQ's fp16 scales and for bf16 ones in its normal range; else 2^-11 relative), or bfloat16
    where a scale lies outside float16's normal range."""
    a = scales.float().abs()
    inside = bool(((a == 0) | ((a >= 2 ** -14) & (a <= 65504))).all())
    return torch.float16 if inside else torch.bfloat16


def _pack(fmt: str, codes_u8: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
          group_size: int, perm: torch.Tensor | None) -> PackedWeight:
    """codes_u8 [N, K] unsigned codes (INT4 q, ternary c + 1) -> the row-interleaved layout."""
    N, K = codes_u8.shape
    ns = _NS[fmt]
    bits = 8 // ns
    c = _tiles(codes_u8).view(-1, _ROWS, K // (4 * ns), ns, 4)  # [tile, row, chunk, sub-vector j, byte p]
    packed = torch.zeros(c.shape[:3] + (4,), dtype=torch.uint8)
    for j in range(ns):
        packed |= c[:, :, :, j] << (bits * j)
    data = packed.permute(0, 2, 1, 3).reshape(c.shape[0], K // (4 * ns), 64).contiguous()  # lane i = row i
    sdt = _scale_dtype(scales)
    parts = [_tiles(scales.float().to(sdt)).transpose(1, 2).contiguous().view(torch.uint8)]  # [tile, G, 32]
    if zeros is not None:
        parts.append(_tiles(zeros.to(torch.uint8)).transpose(1, 2))  # [tile, G, 16]
    meta = torch.cat(parts, dim=-1).contiguous()
    return PackedWeight(fmt, N, K, group_size, data, meta, sdt,
                        None if perm is None else perm.to(torch.int64).contiguous())


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              perm: torch.Tensor | None = None) -> PackedWeight:
    """codes uint8 [N, K] in 0..15 (sorted-group channel order), scales [N, G], zeros int [N, G] in 0..15: W[n, k] =
    s[n, k // group_size] (q[n, k] - z[n, k // group_size]). perm [K]: the layer computes x[:, perm] W^T.
    Scales are kept as float16 (see _scale_dtype)."""
    N, K = codes.shape
    _check("int4", N, K, group_size, scales)
    if perm is not None and tuple(perm.shape) != (K,):
        raise ValueError(f"perm must have K={K} entries, got {tuple(perm.shape)}")
    if tuple(zeros.shape) != tuple(scales.shape) or int(zeros.min()) < 0 or int(zeros.max()) > 15:
        raise ValueError("zeros must be integers in [0, 15] shaped like scales")
    return _pack("int4", codes.to(torch.uint8), scales, zeros, group_size, perm)


def pack_ternary(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> PackedWeight:
    """codes int8 [N, K] in {-1, 0, 1}, scales [N, G]: W = s[n, k // group_size] c[n, k]. Scales as float16."""
    N, K = codes.shape
    _check("ternary", N, K, group_size, scales)
    return _pack("ternary", (codes.to(torch.int16) + 1).to(torch.uint8), scales, None, group_size, None)


def unpack(w: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of the packing: (unsigned codes [N, K] (INT4 q, ternary c + 1), scales fp32 [N, G] (as the kernel
    reads them), zero points [N, G] (ternary: ones)), in the kernel's (sorted-group) channel order."""
    ns = _NS[w.format]
    bits = 8 // ns
    packed = w.data.view(w.data.shape[0], -1, _ROWS, 4).permute(0, 2, 1, 3)  # [tile, row, chunk, p]
    c = torch.stack([(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(ns)], dim=3)  # [tile, row, chunk, j, p]
    codes = c.reshape(w.Np, w.K)[: w.N]
    G = w.K // w.group_size

    def rows(t):  # [tile, G, 16] -> [N, G]
        return t.transpose(1, 2).reshape(w.Np, G)[: w.N]

    s = rows(w.meta[..., :32].contiguous().view(w.scale_dtype).float())
    z = torch.ones_like(s) if w.format == "ternary" else rows(w.meta[..., 32:48].float())
    return codes, s, z


def linear(x: torch.Tensor, w: PackedWeight, threads: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] (fp32 / bf16, contiguous) through the packed weight, in x's dtype. threads: 1 = the
    calling thread only; default 2 when torch.get_num_threads() >= 2 (the fast_kernel pool)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the packed kernel is not built for this machine (kernels.available() is False)")
    if x.dim() != 2 or x.shape[1] != w.K or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU fp32/bf16 [M, {w.K}] tensor, got {x.dtype} {tuple(x.shape)} on {x.device}")
    x = x.contiguous()
    M = x.shape[0]
    y = torch.empty(M, w.N, dtype=x.dtype)
    if M == 0:
        return y
    threads = min(2, torch.get_num_threads()) if threads is None else threads
    if threads > 1:
        from minicpm4.engine import fast_kernel

        fast_kernel.start_pool(threads)
    bf = int(x.dtype == torch.bfloat16)
    lib.ff_qlinear(ctypes.byref(w.desc()), x.data_ptr(), bf, M, y.data_ptr(), bf, int(threads > 1), CHUNK_KB)
    return y


def quantize_activations(x: torch.Tensor, group_size: int, perm: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation rounding in PyTorch: (xq [M, K] fp32 holding int8 values, s_x [M, G])."""
    x = x.float() if perm is None else x.float()[:, perm]
    M, K = x.shape
    xg = x.reshape(M, K // group_size, group_size)
    amax = xg.abs().amax(-1)
    # one IEEE division, as the C++ (PyTorch's `127.0 / amax` is reciprocal() * 127: another rounding, ties move)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv[..., None])
    return xq.reshape(M, K), amax / 127.0


def reference_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch, from the packed weight: int8 activations, exact integer group sums, then
    the scales (in float64: the kernel's fp32 differs from it by summation order only). Returns x.dtype."""
    codes, s, z = unpack(w)
    xq, sx = quantize_activations(x, w.group_size, w.perm)
    M, K = xq.shape
    G = K // w.group_size
    xg = xq.double().view(M, G, -1)
    dots = torch.einsum("mgk,ngk->mng", xg, codes.double().view(w.N, G, -1))  # exact integers
    y = ((dots - z.double()[None] * xg.sum(-1)[:, None, :]) * s.double()[None] * sx.double()[:, None, :]).sum(-1)
    return y.to(x.dtype)
