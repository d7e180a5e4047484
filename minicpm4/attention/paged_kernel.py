"""Optional CPU kernel for paged attention (paged_attention.py): keys/values read in place from the block cache.

Layout (the engine's cache): k/v [num_blocks, Hkv, B, D], one block-head a contiguous [B, D] tile.
Work item = (sequence, KV head, chunk of Tc query tokens); its rows are the G query heads of that KV
head for each token (R = Tc * G rows, t-major), so one pass over a key tile serves them all.
Keys are taken in chunks of whole blocks (>= 64 keys: 16-key blocks are walked four at a time), with a
FlashAttention-style online softmax in fp32 per chunk:

  scores   S^T[j, r] = k_j . q_r, vectorised over the rows r (q is transposed once per item into
           qT [D, Rp]; each key element is broadcast from the tile in place), so the row max, the
           exp and the row sums of the softmax are plain lane-wise vector ops and need no
           horizontal sums or key transposes. Rows per vector: 8 when R <= 8 (decode, G <= 8), else 16.
  output   acc[r, :] += p[r, j] * v_j, vectorised over D: tiles of 4 rows x 64 dims, value rows in place.
  masking  only chunks that reach past the smallest query position of the item compare positions.

fp32 caches are read in place. bf16 caches with bf16 q, where the CPU has AVX512-BF16: vdpbf16ps (two
bf16 products per fp32 lane) for the scores straight from the tile, and for the output with p rounded
to bf16 (as FlashAttention and dense.grouped_attention do; ~1 bf16 ulp of the output against the fp32
reference) against value rows interleaved in pairs; measured 20-30% faster than converting the tiles to
fp32 for prefill. Other bf16 cases convert each tile to an fp32 buffer (it stays in L1 for every row).
q may be fp32 or bf16, the output has q's dtype (bf16: round to nearest even). exp is 2^x with the
log2(e) factor folded into q's scale. The next chunk's tiles are prefetched (random jumps: ~1.5x on
decode over 64 MB of cache). Threads: items are sorted longest first and handed out by an atomic
counter, so Python threads (ctypes releases the GIL) balance ragged batches dynamically.

Tiles are picked with #ifdef __AVX512F__ (32 vector registers); the same source is correct, if slower,
on AVX2 or plain x86-64 (the compiler splits 16-wide vectors; checked with -march=haswell,
skylake-avx512 and x86-64). Built with cpp_build.py (-march=native).
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch

from minicpm4.attention import cpp_build

_SOURCE = r"""
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>
#include <algorithm>
#include <sched.h>
#include <xmmintrin.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint32_t v8u __attribute__((vector_size(32)));

template <typename V> struct VT;  // lane count, int and unsigned vectors of the same shape
template <> struct VT<v8> { typedef v8i I; typedef v8u U; static const int W = 8; };
template <> struct VT<v16> { typedef v16i I; typedef v16u U; static const int W = 16; };

// Unaligned loads/stores via memcpy: a vector typedef's aligned(4) is dropped when it is a template argument.
template <typename V> static inline V ld(const float* p) { V x; memcpy(&x, p, sizeof(V)); return x; }
template <typename V> static inline void st(float* p, V x) { memcpy(p, &x, sizeof(V)); }
template <typename V> static inline V bc(float x) { return V{} + x; }

// Tile sizes: QK_J keys per score tile (J accumulator registers of W rows), PV_NV 16-float vectors per output
// tile row (4 rows x 16 PV_NV dims of accumulators). AVX2 has 16 registers of 8 floats, AVX-512 32 of 16.
// (8 keys measured as fast as 12 or 16 on the dev box; fewer accumulators stall on FMA latency.)
template <typename V> struct QK_J;
#ifdef __AVX512F__
template <> struct QK_J<v8> { static const int value = 8; };
template <> struct QK_J<v16> { static const int value = 8; };
static const int PV_NV = 4;
static const bool QK_PAIR = true;  // two row vectors per score tile (2 x 8 accumulators)
#else
template <> struct QK_J<v8> { static const int value = 8; };
template <> struct QK_J<v16> { static const int value = 4; };
static const int PV_NV = 1;
static const bool QK_PAIR = false;
#endif

// 2^x for x <= 0, exactly 0 for masked scores (-inf): 2^n * 2^f with n = round(x), f = x - n in [-0.5, 0.5],
// 2^f by its degree-6 Taylor polynomial in f (rel. err 1.2e-7).
#define EXP2_POLY(f)                                                                                              \
    (((((((1.5403530393381606e-4f * (f) + 1.3333558146428443e-3f) * (f) + 9.6181291076284772e-3f) * (f) +      \
         5.5504108664821580e-2f) * (f) + 2.4022650695910071e-1f) * (f) + 6.9314718055994531e-1f) * (f) + 1.0f))
#ifdef __AVX512F__
// AVX-512: roundscale + scalef (which also flushes 2^-150 to exactly 0): 10 instructions.
#include <immintrin.h>
template <typename V> static inline V vexp2(V x);
template <> inline v16 vexp2<v16>(v16 x) {
    x = x < bc<v16>(-150.0f) ? bc<v16>(-150.0f) : x;
    const v16 n = (v16)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v16 f = x - n;
    return (v16)_mm512_scalef_ps((__m512)EXP2_POLY(f), (__m512)n);
}
template <> inline v8 vexp2<v8>(v8 x) {
    x = x < bc<v8>(-150.0f) ? bc<v8>(-150.0f) : x;
    const v8 n = (v8)_mm256_roundscale_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v8 f = x - n;
    return (v8)_mm256_scalef_ps((__m256)EXP2_POLY(f), (__m256)n);
}
#else
// Portable: n = floor(x + 0.5) by truncation and a fix-up, 2^n from the exponent bits (n = -127 -> 0.0f).
template <typename V> static inline V vexp2(V x) {
    typedef typename VT<V>::I I;
    x = x < bc<V>(-127.0f) ? bc<V>(-127.0f) : x;
    V t = x + 0.5f;
    I ti = __builtin_convertvector(t, I);          // truncation toward zero
    V tf = __builtin_convertvector(ti, V);
    ti = ti + (I)(tf > t);                          // floor: subtract 1 where trunc > t (true = -1)
    const V f = x - __builtin_convertvector(ti, V);
    I bits = (ti + 127) << 23;
    V scale;
    memcpy(&scale, &bits, sizeof(scale));
    return EXP2_POLY(f) * scale;
}
#endif

static inline float bf16_to_f32(uint16_t x) {
    const uint32_t bits = uint32_t(x) << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    u += 0x7FFFu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

// n (a multiple of 16) bf16 values -> fp32
static void convert_bf16(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        v16h h;
        memcpy(&h, src + i, sizeof(h));
        v16u u = __builtin_convertvector(h, v16u) << 16;
        memcpy(dst + i, &u, sizeof(u));
    }
}

// S^T[j0 + jj, rows] = sum_d k[j0 + jj, d] * qT[d, rows] for jj < J, over NC row vectors. qt points at the
// first row vector of d = 0 (row stride Rp), k at key j0 (row stride D), s at S^T[j0] (row stride Rp).
// NC = 2 loads each broadcast key element once for two row vectors: ~0.6 loads per FMA instead of ~1.1
// (one vector load + one broadcast per FMA would bind on the load ports, not the FMA units).
template <typename V, int J, int NC>
static inline void qk_tile(const float* qt, int64_t Rp, const float* k, int64_t D, float* s) {
    const int W = VT<V>::W;
    V acc[NC][J];
#pragma GCC unroll 16
    for (int jj = 0; jj < J; ++jj)
#pragma GCC unroll 2
        for (int c = 0; c < NC; ++c) acc[c][jj] = V{};
    for (int64_t d = 0; d < D; ++d) {
        V qv[NC];
#pragma GCC unroll 2
        for (int c = 0; c < NC; ++c) qv[c] = ld<V>(qt + d * Rp + c * W);
#pragma GCC unroll 16
        for (int jj = 0; jj < J; ++jj) {
            const V b = bc<V>(k[jj * D + d]);
#pragma GCC unroll 2
            for (int c = 0; c < NC; ++c) acc[c][jj] += b * qv[c];
        }
    }
#pragma GCC unroll 16
    for (int jj = 0; jj < J; ++jj)
#pragma GCC unroll 2
        for (int c = 0; c < NC; ++c) st<V>(s + jj * Rp + c * W, acc[c][jj]);
}

// The n % J tail keys of a block: one tile of exactly that many keys.
template <typename V, int J, int NC>
static inline void qk_tail(int64_t m, const float* qt, int64_t Rp, const float* k, int64_t D, float* s) {
    if constexpr (J > 0) {
        if (m == J) qk_tile<V, J, NC>(qt, Rp, k, D, s);
        else qk_tail<V, J - 1, NC>(m, qt, Rp, k, D, s);
    }
}

template <typename V, int NC>
static inline void qk_rows(const float* qt, int64_t Rp, const float* k, int64_t n, int64_t D, float* S) {
    const int J = QK_J<V>::value;
    int64_t j = 0;
    for (; j + J <= n; j += J) qk_tile<V, J, NC>(qt, Rp, k + j * D, D, S + j * Rp);
    qk_tail<V, J - 1, NC>(n - j, qt, Rp, k + j * D, D, S + j * Rp);
}

// S^T [n, Rp] for the n keys of one tile (fp32 rows).
template <typename V>
static void qk_block(const float* qT, int64_t Rp, const float* k, int64_t n, int64_t D, float* S) {
    const int W = VT<V>::W;
    int64_t rc = 0;
    for (; QK_PAIR && rc + 2 * W <= Rp; rc += 2 * W) qk_rows<V, 2>(qT + rc, Rp, k, n, D, S + rc);
    for (; rc < Rp; rc += W) qk_rows<V, 1>(qT + rc, Rp, k, n, D, S + rc);
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
// bf16 q and keys: vdpbf16ps does two d per lane (exact bf16 products, fp32 sums), with the key pair
// k[j, 2p : 2p + 2] broadcast as one 32-bit word straight from the cache tile, so the tile needs no conversion.
// qp: [D / 2, Rp, 2] bf16 (q pairs, unscaled); the scores are scaled on the way out.
#include <immintrin.h>
#define HAVE_DPBF16 1
static inline v16 dp2(v16 acc, __m512i a, __m512i b) {
    return (v16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}
static inline v8 dp2(v8 acc, __m256i a, __m256i b) {
    return (v8)_mm256_dpbf16_ps((__m256)acc, (__m256bh)a, (__m256bh)b);
}
static inline __m512i ldq(const uint16_t* p, v16*) { return _mm512_loadu_si512(p); }
static inline __m256i ldq(const uint16_t* p, v8*) { return _mm256_loadu_si256((const __m256i*)p); }
static inline __m512i bcw(const uint16_t* p, v16*) { int32_t w; memcpy(&w, p, 4); return _mm512_set1_epi32(w); }
static inline __m256i bcw(const uint16_t* p, v8*) { int32_t w; memcpy(&w, p, 4); return _mm256_set1_epi32(w); }

template <typename V, int J, int NC>
static inline void qk_tile_bf16(const uint16_t* qp, int64_t Rp, const uint16_t* k, int64_t D, float* s, float scale) {
    const int W = VT<V>::W;
    V acc[NC][J];
#pragma GCC unroll 16
    for (int jj = 0; jj < J; ++jj)
#pragma GCC unroll 2
        for (int c = 0; c < NC; ++c) acc[c][jj] = V{};
    for (int64_t p = 0; p < D / 2; ++p) {
        decltype(ldq(qp, (V*)nullptr)) a[NC];
#pragma GCC unroll 2
        for (int c = 0; c < NC; ++c) a[c] = ldq(qp + (p * Rp + c * W) * 2, (V*)nullptr);
#pragma GCC unroll 16
        for (int jj = 0; jj < J; ++jj) {
            const auto b = bcw(k + jj * D + 2 * p, (V*)nullptr);
#pragma GCC unroll 2
            for (int c = 0; c < NC; ++c) acc[c][jj] = dp2(acc[c][jj], a[c], b);
        }
    }
#pragma GCC unroll 16
    for (int jj = 0; jj < J; ++jj)
#pragma GCC unroll 2
        for (int c = 0; c < NC; ++c) st<V>(s + jj * Rp + c * W, acc[c][jj] * scale);
}

template <typename V, int J, int NC>
static inline void qk_tail_bf16(int64_t m, const uint16_t* qp, int64_t Rp, const uint16_t* k, int64_t D, float* s,
                                float scale) {
    if constexpr (J > 0) {
        if (m == J) qk_tile_bf16<V, J, NC>(qp, Rp, k, D, s, scale);
        else qk_tail_bf16<V, J - 1, NC>(m, qp, Rp, k, D, s, scale);
    }
}

template <typename V, int NC>
static inline void qk_rows_bf16(const uint16_t* qp, int64_t Rp, const uint16_t* k, int64_t n, int64_t D, float* S,
                                float scale) {
    const int J = QK_J<V>::value;
    int64_t j = 0;
    for (; j + J <= n; j += J) qk_tile_bf16<V, J, NC>(qp, Rp, k + j * D, D, S + j * Rp, scale);
    qk_tail_bf16<V, J - 1, NC>(n - j, qp, Rp, k + j * D, D, S + j * Rp, scale);
}

template <typename V>
static void qk_block_bf16(const uint16_t* qp, int64_t Rp, const uint16_t* k, int64_t n, int64_t D, float* S,
                          float scale) {
    const int W = VT<V>::W;
    int64_t rc = 0;
    for (; rc + 2 * W <= Rp; rc += 2 * W) qk_rows_bf16<V, 2>(qp + 2 * rc, Rp, k, n, D, S + rc, scale);
    for (; rc < Rp; rc += W) qk_rows_bf16<V, 1>(qp + 2 * rc, Rp, k, n, D, S + rc, scale);
}
#else
#define HAVE_DPBF16 0
#endif

template <typename V>
static inline typename VT<V>::U bf16_bits(V x) {  // round to nearest even, as 32-bit lanes holding 16 bits
    typedef typename VT<V>::U U;
    U u;
    memcpy(&u, &x, sizeof(u));
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// Online softmax over one chunk of n keys at positions start .. start + n - 1 (log2 domain). Masks keys after
// each row's position when `mask`, updates the running max m and sum l, writes alpha = 2^(m_old - m_new) (the
// factor for the accumulated output) and replaces the scores by p = 2^(s - m_new).
// pp != nullptr (the bf16 PV path): p is written instead as bf16 pairs pp[j / 2, r] = p[j] | p[j + 1] << 16
// (round to nearest even; p[n] = 0 when n is odd), the operand layout of vdpbf16ps. l sums the fp32 p.
template <typename V>
static void softmax_block(float* S, int64_t Rp, int64_t n, int64_t start, bool mask, const int32_t* rowpos,
                          float* m, float* l, float* alpha, uint32_t* pp, const uint64_t* tbits, int64_t tbase) {
    typedef typename VT<V>::I I;
    const int W = VT<V>::W;
    for (int64_t rc = 0; rc < Rp; rc += W) {
        V mx = ld<V>(m + rc);
        const V m_old = mx;
        if (mask) {
            I rp;
            memcpy(&rp, rowpos + rc, sizeof(rp));
            for (int64_t j = 0; j < n; ++j) {
                V s = ld<V>(S + j * Rp + rc);
                s = (I{} + int32_t(start + j)) > rp ? bc<V>(-INFINITY) : s;
                if (tbits && start + j >= tbase) {  // draft-tree keys: row r sees key tbase + b iff bit b of tbits[r]
                    float lane[W];
                    memcpy(lane, &s, sizeof(lane));
                    const int64_t b = start + j - tbase;
                    for (int x = 0; x < W; ++x)
                        if (b >= 64 || !((tbits[rc + x] >> b) & 1)) lane[x] = -INFINITY;
                    memcpy(&s, lane, sizeof(lane));
                }
                st<V>(S + j * Rp + rc, s);
                mx = s > mx ? s : mx;
            }
        } else {
            for (int64_t j = 0; j < n; ++j) {
                V s = ld<V>(S + j * Rp + rc);
                mx = s > mx ? s : mx;
            }
        }
        V a = vexp2<V>(m_old - mx);
        V sum = V{};
        if (pp) {
            for (int64_t j = 0; j < n; j += 2) {
                const V p0 = vexp2<V>(ld<V>(S + j * Rp + rc) - mx);
                const V p1 = j + 1 < n ? vexp2<V>(ld<V>(S + (j + 1) * Rp + rc) - mx) : V{};
                sum += p0 + p1;
                const typename VT<V>::U w = bf16_bits(p0) | (bf16_bits(p1) << 16);
                memcpy(pp + j / 2 * Rp + rc, &w, sizeof(w));
            }
        } else {
            for (int64_t j = 0; j < n; ++j) {
                V p = vexp2<V>(ld<V>(S + j * Rp + rc) - mx);
                st<V>(S + j * Rp + rc, p);
                sum += p;
            }
        }
        st<V>(l + rc, ld<V>(l + rc) * a + sum);
        st<V>(m + rc, mx);
        st<V>(alpha + rc, a);
    }
}

// The value rows of one chunk of keys: up to 64 runs of contiguous rows (a run = one cache tile, or the whole
// chunk once converted to fp32), key j0[u] + i of the chunk at v[u] + i * D.
// bf16 PV path instead: vp [npairs, D] words v[2i, d] | v[2i + 1, d] << 16 and pp [npairs, Rp] (softmax_block).
struct VRuns {
    int nrun = 0;
    const float* v[64];
    int64_t j0[64], n[64];
    const uint32_t *vp = nullptr, *pp = nullptr;
    int64_t npairs = 0;
    void add(const float* p, int64_t first, int64_t count) { v[nrun] = p; j0[nrun] = first; n[nrun] = count; ++nrun; }
};

// acc[r0 + i, d : d + 16 NV] = alpha[r0 + i] * acc + sum_j P^T[j, r0 + i] v[j, d :] for i < RT.
template <int RT, int NV>
static inline void pv_tile(const float* P, int64_t Rp, const float* alpha, const VRuns& vr, int64_t r0, int64_t d,
                           int64_t D, float* acc) {
    v16 c[RT][NV];
    float* a = acc + r0 * D + d;
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i)
#pragma GCC unroll 8
        for (int u = 0; u < NV; ++u) c[i][u] = ld<v16>(a + i * D + 16 * u) * alpha[r0 + i];
#if HAVE_DPBF16
    for (int64_t jp = 0; jp < vr.npairs; ++jp) {  // bf16: two keys per instruction
        __m512i x[NV];
#pragma GCC unroll 8
        for (int u = 0; u < NV; ++u) x[u] = _mm512_loadu_si512(vr.vp + jp * D + d + 16 * u);
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) {
            const __m512i pj = _mm512_set1_epi32(int32_t(vr.pp[jp * Rp + r0 + i]));
#pragma GCC unroll 8
            for (int u = 0; u < NV; ++u)
                c[i][u] = (v16)_mm512_dpbf16_ps((__m512)c[i][u], (__m512bh)x[u], (__m512bh)pj);
        }
    }
#endif
    for (int run = 0; run < vr.nrun; ++run) {
        const float* v = vr.v[run] + d;
        const float* p = P + vr.j0[run] * Rp + r0;
        for (int64_t j = 0; j < vr.n[run]; ++j) {
            v16 x[NV];
#pragma GCC unroll 8
            for (int u = 0; u < NV; ++u) x[u] = ld<v16>(v + j * D + 16 * u);
#pragma GCC unroll 8
            for (int i = 0; i < RT; ++i) {
                const v16 pj = bc<v16>(p[j * Rp + i]);
#pragma GCC unroll 8
                for (int u = 0; u < NV; ++u) c[i][u] += pj * x[u];
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i)
#pragma GCC unroll 8
        for (int u = 0; u < NV; ++u) st<v16>(a + i * D + 16 * u, c[i][u]);
}

template <int RT>
static inline void pv_rows(const float* P, int64_t Rp, const float* alpha, const VRuns& vr, int64_t r0, int64_t D,
                           float* acc) {
    int64_t d = 0;
    for (; d + 16 * PV_NV <= D; d += 16 * PV_NV) pv_tile<RT, PV_NV>(P, Rp, alpha, vr, r0, d, D, acc);
    switch ((D - d) / 16) {
        case 3: pv_tile<RT, 3>(P, Rp, alpha, vr, r0, d, D, acc); break;
        case 2: pv_tile<RT, 2>(P, Rp, alpha, vr, r0, d, D, acc); break;
        case 1: pv_tile<RT, 1>(P, Rp, alpha, vr, r0, d, D, acc); break;
        default: break;
    }
}

// acc [R, D] += this chunk's P V (rows in tiles of 4).
static void pv_chunk(const float* P, int64_t Rp, int64_t R, const float* alpha, const VRuns& vr, int64_t D,
                     float* acc) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) pv_rows<4>(P, Rp, alpha, vr, r, D, acc);
    switch (R - r) {
        case 3: pv_rows<3>(P, Rp, alpha, vr, r, D, acc); break;
        case 2: pv_rows<2>(P, Rp, alpha, vr, r, D, acc); break;
        case 1: pv_rows<1>(P, Rp, alpha, vr, r, D, acc); break;
        default: break;
    }
}

// vp [ceil(n / 2), D] = bf16 value rows of keys 2i and 2i + 1 interleaved (0 for a missing odd last key);
// row(j) points at key j's D values.
template <typename RowFn>
static void pair_values(RowFn row, int64_t n, int64_t D, uint32_t* vp) {
    for (int64_t j = 0; j < n; j += 2) {
        const uint16_t* a = row(j);
        const uint16_t* b = j + 1 < n ? row(j + 1) : nullptr;
        for (int64_t d = 0; d < D; d += 16) {
            v16h x, y = v16h{};
            memcpy(&x, a + d, sizeof(x));
            if (b) memcpy(&y, b + d, sizeof(y));
            const v16u w = __builtin_convertvector(x, v16u) | (__builtin_convertvector(y, v16u) << 16);
            memcpy(vp + j / 2 * D + d, &w, sizeof(w));
        }
    }
}

struct Problem {
    const void* q; int64_t q_sn, q_sh; int64_t q_bf16;        // q [N, Hq, D] (strides in elements, d contiguous)
    const void* k; const void* v; int64_t c_sb, c_sh; int64_t kv_bf16;  // caches [NB, Hkv, B, D]: block/head strides
    const int32_t* bt; int64_t bt_s;                           // block tables [S, max_blocks], row stride
    const int32_t* qsl; const int32_t* ctx; const int64_t* pos;
    void* out;                                                 // [N, Hq, D] contiguous, q's dtype
    int64_t Hq, Hkv, D, B;
    float scale;                                               // 1/sqrt(D) * log2(e)
    const uint64_t* tmask; const int64_t* tbase;               // draft trees (or null): per query / per sequence
};

static inline int64_t chunk_keys(int64_t B) { return B >= 64 ? B : (64 + B - 1) / B * B; }

struct Scratch {
    std::vector<float> qT, S, acc, m, l, alpha, kb, vb;
    std::vector<uint16_t> qp;
    std::vector<uint32_t> pp, vp;
    std::vector<int32_t> rowpos;
    std::vector<uint64_t> tbits;
    Scratch(int64_t Rmax, int64_t D, int64_t B)
        : qT(D * Rmax), S(chunk_keys(B) * Rmax), acc(Rmax * D), m(Rmax), l(Rmax), alpha(Rmax), kb(B * D),
          vb(chunk_keys(B) * D),
          qp(D * Rmax), pp((chunk_keys(B) + 1) / 2 * Rmax), vp((chunk_keys(B) + 1) / 2 * D), rowpos(Rmax),
          tbits(Rmax) {}
};

template <typename V>
static void attend_item(const Problem& P, int64_t s, int64_t h, int64_t t0, int64_t t1, Scratch& w) {
    const int W = VT<V>::W;
    const int64_t G = P.Hq / P.Hkv, D = P.D, B = P.B, T = t1 - t0, R = T * G, Rp = (R + W - 1) / W * W;
    const bool dp = HAVE_DPBF16 && P.q_bf16 && P.kv_bf16;
    // qT [D, Rp] = scaled q rows (row r = t * G + g), or for dp the bf16 pairs qp [D / 2, Rp, 2], unscaled.
    // Padded rows are zero and see every key.
    int64_t minpos = INT64_MAX, maxpos = -1;
    for (int64_t t = 0; t < T; ++t) {
        minpos = std::min(minpos, P.pos[t0 + t]);
        maxpos = std::max(maxpos, P.pos[t0 + t]);
        for (int64_t g = 0; g < G; ++g) {
            const int64_t r = t * G + g, off = (t0 + t) * P.q_sn + (h * G + g) * P.q_sh;
            if (dp)
                for (int64_t d = 0; d < D; ++d) w.qp[(d / 2 * Rp + r) * 2 + d % 2] = ((const uint16_t*)P.q)[off + d];
            else
                for (int64_t d = 0; d < D; ++d) {
                    const float x = P.q_bf16 ? bf16_to_f32(((const uint16_t*)P.q)[off + d])
                                             : ((const float*)P.q)[off + d];
                    w.qT[d * Rp + r] = x * P.scale;
                }
            w.rowpos[r] = int32_t(P.pos[t0 + t]);
            w.tbits[r] = P.tmask ? P.tmask[t0 + t] : ~uint64_t(0);
        }
    }
    for (int64_t r = R; r < Rp; ++r) {
        for (int64_t d = 0; d < D; ++d) w.qT[d * Rp + r] = 0.0f;
        for (int64_t d = 0; d < D; ++d) w.qp[(d / 2 * Rp + r) * 2 + d % 2] = 0;
        w.rowpos[r] = INT32_MAX;
        w.tbits[r] = ~uint64_t(0);
    }
    // Draft-tree keys start at key tbase of this sequence (no tree: never).
    const int64_t tb = P.tmask && P.tbase && P.tbase[s] >= 0 ? P.tbase[s] : INT64_MAX;
    std::fill(w.m.begin(), w.m.begin() + Rp, -1e30f);  // finite: m_old - m_new never meets inf - inf
    std::fill(w.l.begin(), w.l.begin() + Rp, 0.0f);
    std::fill(w.acc.begin(), w.acc.begin() + R * D, 0.0f);
    const int64_t L = std::min<int64_t>(P.ctx[s], maxpos + 1);  // keys read: 0 .. L - 1, never beyond the context
    const int32_t* table = P.bt + s * P.bt_s;
    const size_t esz = P.kv_bf16 ? 2 : 4;
    auto tile_of = [&](const void* cache, int64_t b) {
        return (const char*)cache + (int64_t(table[b]) * P.c_sb + h * P.c_sh) * esz;
    };
    // Chunks of whole blocks, at least 64 keys: one softmax update and one pass over the output tiles per chunk
    // (with 16-key blocks, per-block passes spent ~20% re-loading and storing the accumulators).
    const int64_t CH = chunk_keys(B);
    for (int64_t start = 0; start < L; start += CH) {
        const int64_t n = std::min(CH, L - start), b0 = start / B;
        for (int64_t o = 0; o < std::min(CH, L - start - CH); o += B) {
            // the next chunk's tiles are random jumps away (usually new pages): fetch them now
            const int64_t bytes = std::min(B, L - start - CH - o) * D * int64_t(esz);
            const char* kn = tile_of(P.k, b0 + (CH + o) / B);
            const char* vn = tile_of(P.v, b0 + (CH + o) / B);
            for (int64_t x = 0; x < bytes; x += 64) { __builtin_prefetch(kn + x); __builtin_prefetch(vn + x); }
        }
        VRuns vr;
        for (int64_t off = 0; off < n; off += B) {
            const int64_t m = std::min(B, n - off);
            const char* kt = tile_of(P.k, b0 + off / B);
            const char* vt = tile_of(P.v, b0 + off / B);
            float* S = w.S.data() + off * Rp;
#if HAVE_DPBF16
            if (dp)
                qk_block_bf16<V>(w.qp.data(), Rp, (const uint16_t*)kt, m, D, S, P.scale);
            else
#endif
            if (P.kv_bf16) {
                convert_bf16((const uint16_t*)kt, w.kb.data(), m * D);
                qk_block<V>(w.qT.data(), Rp, w.kb.data(), m, D, S);
            } else {
                qk_block<V>(w.qT.data(), Rp, (const float*)kt, m, D, S);
            }
            if (dp)
                ;  // paired below, across tile boundaries
            else if (P.kv_bf16)
                convert_bf16((const uint16_t*)vt, w.vb.data() + off * D, m * D);
            else
                vr.add((const float*)vt, off, m);
        }
        if (dp) {
            pair_values([&](int64_t j) { return (const uint16_t*)tile_of(P.v, b0 + j / B) + (j % B) * D; }, n, D,
                        w.vp.data());
            vr.vp = w.vp.data(); vr.pp = w.pp.data(); vr.npairs = (n + 1) / 2;
        } else if (P.kv_bf16) {
            vr.add(w.vb.data(), 0, n);
        }
        const bool in_tree = start + n - 1 >= tb;
        softmax_block<V>(w.S.data(), Rp, n, start, start + n - 1 > minpos || in_tree, w.rowpos.data(), w.m.data(),
                         w.l.data(), w.alpha.data(), dp ? w.pp.data() : nullptr, in_tree ? w.tbits.data() : nullptr, tb);
        pv_chunk(w.S.data(), Rp, R, w.alpha.data(), vr, D, w.acc.data());
    }
    for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
            const int64_t r = t * G + g;
            const float inv = w.l[r] > 0 ? 1.0f / w.l[r] : 0.0f;
            const int64_t off = ((t0 + t) * P.Hq + h * G + g) * D;
            if (P.q_bf16)
                for (int64_t d = 0; d < D; ++d) ((uint16_t*)P.out)[off + d] = f32_to_bf16(w.acc[r * D + d] * inv);
            else
                for (int64_t d = 0; d < D; ++d) ((float*)P.out)[off + d] = w.acc[r * D + d] * inv;
        }
}

// Work items (s, kv head, t0, t1) over query chunks of at most Tc tokens, longest first (cost = rows x keys).
// items has room for cap rows of 4; *work = sum of tokens x keys x Hkv. Checks the metadata first, since a bad
// entry would read outside the cache: returns the item count, or -1 (cap too small), -2 (query_start_loc not
// 0 <= ... non-decreasing ... == N), -3 (a context needs more blocks than a block_tables row has, or is < 0),
// -4 (a block id a sequence reads is outside 0 .. NB - 1).
extern "C" int64_t paged_attn_plan(const int32_t* qsl, const int32_t* ctx, const int64_t* pos, const int32_t* bt,
                                   int64_t bt_s, int64_t max_blocks, int64_t S, int64_t N, int64_t NB, int64_t B,
                                   int64_t Hkv, int64_t Tc, int64_t* items, int64_t cap, double* work) {
    if (qsl[0] != 0 || qsl[S] != N) return -2;
    struct Chunk { int64_t cost, s, t0, t1; };
    std::vector<Chunk> chunks;
    double total = 0;
    for (int64_t s = 0; s < S; ++s) {
        if (qsl[s + 1] < qsl[s]) return -2;
        int64_t maxpos = -1;
        for (int64_t t = qsl[s]; t < qsl[s + 1]; ++t) maxpos = std::max(maxpos, pos[t]);
        const int64_t L = std::min<int64_t>(ctx[s], maxpos + 1), nb = (L + B - 1) / B;
        if (ctx[s] < 0 || nb > max_blocks) return -3;
        for (int64_t b = 0; b < nb; ++b)
            if (bt[s * bt_s + b] < 0 || bt[s * bt_s + b] >= NB) return -4;
        for (int64_t t0 = qsl[s]; t0 < qsl[s + 1]; t0 += Tc) {
            const int64_t t1 = std::min<int64_t>(t0 + Tc, qsl[s + 1]);
            int64_t mp = -1;
            for (int64_t t = t0; t < t1; ++t) mp = std::max(mp, pos[t]);
            const int64_t cost = (t1 - t0) * std::max<int64_t>(1, std::min<int64_t>(ctx[s], mp + 1));
            chunks.push_back({cost, s, t0, t1});
            total += double(cost) * Hkv;
        }
    }
    if (int64_t(chunks.size()) * Hkv > cap) return -1;
    std::stable_sort(chunks.begin(), chunks.end(), [](const Chunk& a, const Chunk& b) { return a.cost > b.cost; });
    int64_t n = 0;
    for (const Chunk& c : chunks)
        for (int64_t h = 0; h < Hkv; ++h, ++n) {
            items[4 * n] = c.s; items[4 * n + 1] = h; items[4 * n + 2] = c.t0; items[4 * n + 3] = c.t1;
        }
    *work = total;
    return n;
}

// One worker: takes items from counter[0] until none is left, then waits until counter[1] (items finished)
// reaches n_items, so ANY caller returns only when the whole output is written. Every thread calls this with the
// same arguments; a thread that starts late finds nothing to take and returns at once: the caller never waits for
// a thread the OS has not scheduled yet. Tc: the planner's chunk length (sizes the scratch). Requires D % 16 == 0.
extern "C" void paged_attn_run(const void* q, int64_t q_sn, int64_t q_sh, int64_t q_bf16, const void* k, const void* v,
                               int64_t c_sb, int64_t c_sh, int64_t kv_bf16, const int32_t* bt, int64_t bt_s,
                               const int32_t* qsl, const int32_t* ctx, const int64_t* pos, void* out, int64_t Hq,
                               int64_t Hkv, int64_t D, int64_t B, double scale, const int64_t* items, int64_t n_items,
                               int64_t Tc, int64_t* counter, const uint64_t* tmask, const int64_t* tbase) {
    // Flush denormals for this call (restored on return): the exp2 of scores far below the row max lands in
    // the denormal range, where x86 slows down ~50x per operation. Measured on the default model's real q/k: a
    // 13-row draft-tree item at 600 keys took 250 us instead of 130; their contributions are below 2^-126 anyway.
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // FTZ | DAZ
    const Problem P{q, q_sn, q_sh, q_bf16, k, v, c_sb, c_sh, kv_bf16, bt, bt_s, qsl, ctx, pos, out, Hq, Hkv, D, B,
                    float(scale), tmask, tbase};
    const int64_t G = Hq / Hkv;
    if (__atomic_load_n(counter, __ATOMIC_RELAXED) < n_items) {
        Scratch w((Tc * G + 15) / 16 * 16, D, B);
        for (;;) {
            const int64_t i = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
            if (i >= n_items) break;
            const int64_t* it = items + 4 * i;
            if ((it[3] - it[2]) * G <= 8)
                attend_item<v8>(P, it[0], it[1], it[2], it[3], w);
            else
                attend_item<v16>(P, it[0], it[1], it[2], it[3], w);
            __atomic_fetch_add(counter + 1, 1, __ATOMIC_RELEASE);
        }
    }
    while (__atomic_load_n(counter + 1, __ATOMIC_ACQUIRE) < n_items) sched_yield();
    _mm_setcsr(csr);
}

// Cache write: row i of k/v [N, Hkv, D] goes to block slot[i] / B, offset slot[i] % B of every head.
// Returns the number of slots outside 0 .. NB * B - 1 (then nothing is written).
extern "C" int64_t paged_write_kv(void* kc, void* vc, int64_t c_sb, int64_t c_sh, const void* k, const void* v,
                                  int64_t k_sn, int64_t k_sh, int64_t v_sn, int64_t v_sh, const int64_t* slot,
                                  int64_t N, int64_t Hkv, int64_t D, int64_t B, int64_t NB, int64_t esz) {
    int64_t bad = 0;
    for (int64_t i = 0; i < N; ++i) bad += slot[i] < 0 || slot[i] >= NB * B;
    if (bad) return bad;
    for (int64_t i = 0; i < N; ++i) {
        const int64_t base = (slot[i] / B) * c_sb + (slot[i] % B) * D;
        for (int64_t h = 0; h < Hkv; ++h) {
            memcpy((char*)kc + (base + h * c_sh) * esz, (const char*)k + (i * k_sn + h * k_sh) * esz, D * esz);
            memcpy((char*)vc + (base + h * c_sh) * esz, (const char*)v + (i * v_sn + h * v_sh) * esz, D * esz);
        }
    }
    return 0;
}
"""

_FLAGS = [*cpp_build.FLAGS, "-ffp-contract=fast"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_P, _I = ctypes.c_void_p, ctypes.c_int64


def _build() -> ctypes.CDLL | None:
    lib = cpp_build.build_library("paged_attention", _SOURCE, _FLAGS)
    if lib is None:
        return None
    lib.paged_attn_plan.restype = ctypes.c_int64
    lib.paged_attn_plan.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _P, _I, _P]
    lib.paged_attn_run.restype = None
    lib.paged_attn_run.argtypes = ([_P, _I, _I, _I, _P, _P, _I, _I, _I, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I,
                                    ctypes.c_double, _P, _I, _I, _P, _P, _P])
    lib.paged_write_kv.restype = ctypes.c_int64
    lib.paged_write_kv.argtypes = [_P, _P, _I, _I, _P, _P, _I, _I, _I, _I, _P, _I, _I, _I, _I, _I, _I]
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernel library, or None (no compiler, build failed, MINICPM4_NO_CPU_KERNEL set)."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _lib, _tried = _build(), True
    return _lib


def available() -> bool:
    return library() is not None


# Rows (query heads x tokens) per work item in prefill: K/V tiles are re-read once per item, so more rows
# amortise them better, while the item's scratch (q^T, scores, output: ~3 x 64 x D x 4 bytes) stays in L2
# and a 512-token chunk still yields many items to balance over threads.
ROWS_PER_ITEM = 64
# Multiply-adds (rows x keys x D) per extra thread (~0.2 ms of work): waking a pool thread costs ~20-50 us,
# and far more on a loaded machine.
PARALLEL_MIN_WORK = 1 << 22


_PLAN_ERRORS = {
    -1: "paged attention: work item buffer too small (a bug)",
    -2: "query_start_loc must start at 0, never decrease, and end at N = q.shape[0]",
    -3: "a context needs more blocks than a block_tables row has (or context_lens < 0)",
    -4: "block_tables holds a block id outside 0 .. num_blocks - 1 within a sequence's context",
}


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """CPU fp32/bf16 tensors, head dim a multiple of 16, each block-head tile a contiguous [B, D], a built library."""
    ok_dtypes = (torch.float32, torch.bfloat16)
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in ok_dtypes
            and k_cache.dtype in ok_dtypes and q.shape[-1] % 16 == 0 and q.stride(-1) == 1
            and k_cache.stride(3) == 1 and k_cache.stride(2) == k_cache.shape[3] and available())


# The work items of the last plan, reused while the same metadata tensor objects come back: every layer of an
# engine step passes the same PagedBatch tensors, so the planner (and its ~20 us of Python) runs once per step
# instead of once per layer. Contract: metadata tensors are never modified in place after a call (every caller
# builds fresh ones; inference-mode tensors have no version counter to check). The memo holds the tensors, so
# their memory cannot be reused by new ones meanwhile; one memo per thread.
_memo = threading.local()


def _plan(block_tables: torch.Tensor, qsl: torch.Tensor, ctx: torch.Tensor, positions: torch.Tensor, N: int, S: int,
          NB: int, B: int, Hq: int, Hkv: int, tc: int) -> tuple[torch.Tensor, int, float]:
    tensors = (block_tables, qsl, ctx, positions)
    key = (N, S, NB, B, Hkv, tc)
    last = getattr(_memo, "last", None)
    if last is not None and last[1] == key and all(a is b for a, b in zip(last[0], tensors)):
        return last[2]
    assert Hq % Hkv == 0, f"{Hq} query heads do not split into groups over {Hkv} KV heads"
    assert block_tables.dim() == 2 and block_tables.shape[0] == S, "block_tables must be [S, max_blocks]"
    assert qsl.shape == (S + 1,) and positions.shape == (N,), "query_start_loc [S + 1], positions [N]"
    cap = Hkv * (N // tc + S + 1)
    items = torch.empty(cap, 4, dtype=torch.int64)
    total = ctypes.c_double(0.0)  # query tokens x keys x KV heads over all items (x G x D = multiply-adds)
    n_items = library().paged_attn_plan(qsl.data_ptr(), ctx.data_ptr(), positions.data_ptr(), block_tables.data_ptr(),
                                        block_tables.stride(0), block_tables.shape[1], S, N, NB, B, Hkv, tc,
                                        items.data_ptr(), cap, ctypes.byref(total))
    if n_items < 0:
        raise ValueError(_PLAN_ERRORS.get(n_items, f"paged attention plan failed ({n_items})"))
    result = (items, n_items, total.value)
    _memo.last = (tensors, key, result)
    return result


def forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            query_start_loc: torch.Tensor, context_lens: torch.Tensor, positions: torch.Tensor,
            threads: int | None = None, tree_mask: torch.Tensor | None = None,
            tree_base: torch.Tensor | None = None) -> torch.Tensor:
    """paged_attention on the kernel. q [N, Hq, D] (d contiguous); caches [NB, Hkv, B, D] (supports());
    block_tables int32 [S, max_blocks]; query_start_loc int32 [S + 1]; context_lens int32 [S]; positions
    int64 [N]; tree_mask int64 [N] / tree_base int64 [S] (paged_attention.py) or None. -> out [N, Hq, D]."""
    lib = library()
    assert lib is not None, "the paged attention CPU kernel is not built"
    N, Hq, D = q.shape
    _, Hkv, B, _ = k_cache.shape
    S = context_lens.shape[0]
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and v_cache.dtype == k_cache.dtype
    for name, t, dt in (("block_tables", block_tables, torch.int32), ("query_start_loc", query_start_loc, torch.int32),
                        ("context_lens", context_lens, torch.int32), ("positions", positions, torch.int64)):
        assert t.dtype == dt and t.is_contiguous(), f"{name} must be a contiguous {dt} tensor"
    out = torch.empty(N, Hq, D, dtype=q.dtype)
    if N == 0:
        return out
    G = Hq // Hkv
    tc = max(1, ROWS_PER_ITEM // G)
    items, n_items, total = _plan(block_tables, query_start_loc, context_lens, positions, N, S, k_cache.shape[0], B,
                                  Hq, Hkv, tc)
    counter = torch.zeros(2, dtype=torch.int64)  # [next item, items finished]
    args = (q.data_ptr(), q.stride(0), q.stride(1), int(q.dtype == torch.bfloat16), k_cache.data_ptr(),
            v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), int(k_cache.dtype == torch.bfloat16),
            block_tables.data_ptr(), block_tables.stride(0),
            query_start_loc.data_ptr(), context_lens.data_ptr(), positions.data_ptr(), out.data_ptr(), Hq, Hkv, D, B,
            math.log2(math.e) / math.sqrt(D), items.data_ptr(), n_items, tc, counter.data_ptr(),
            tree_mask.data_ptr() if tree_mask is not None else None,
            tree_base.data_ptr() if tree_mask is not None else None)
    n = threads or torch.get_num_threads()
    n = max(1, min(n, n_items, 1 + int(total * G * D / PARALLEL_MIN_WORK)))
    if tree_mask is not None:
        assert tree_mask.dtype == torch.int64 and tree_mask.shape == (N,) and tree_mask.is_contiguous()
        assert tree_base is not None and tree_base.dtype == torch.int64 and tree_base.shape == (S,)
    keep = (q, k_cache, v_cache, block_tables, query_start_loc, context_lens, positions, out, items, counter,
            tree_mask, tree_base)

    def worker(i: int, keep=keep) -> None:  # `keep`: a late pool thread still finds every pointer's memory alive
        lib.paged_attn_run(*args)

    cpp_build.run_parallel(worker, n, wait=False)
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """The cache write on the kernel: caches as supports(), k/v [N, Hkv, D] in the cache dtype with d contiguous,
    slot_mapping int64 [N] contiguous."""
    lib = library()
    assert lib is not None, "the paged attention CPU kernel is not built"
    N, Hkv, D = k.shape
    assert v.shape == k.shape and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    assert k_cache.shape[1:] == (Hkv, k_cache.shape[2], D) and v_cache.shape == k_cache.shape
    assert slot_mapping.shape == (N,) and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    bad = lib.paged_write_kv(k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                             k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             slot_mapping.data_ptr(), N, Hkv, D, k_cache.shape[2], k_cache.shape[0],
                             k_cache.element_size())
    if bad:
        raise IndexError(f"write_kv: {bad} slot(s) outside 0 .. {k_cache.shape[0] * k_cache.shape[2] - 1}")
