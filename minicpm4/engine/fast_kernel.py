"""C++ kernels behind FastDecoder's small-batch path (decode, few-token chunks): GEMV against nn.Linear weights, and
the elementwise ops of a layer fused around them, two calls per layer.

Why (measured on the 2-core AVX-512 dev box, benchmarks/decode_step.py): a one-token F.linear against the
73,448 x 1,024 bf16 LM head ran at 9-25 GB/s, small-M oneDNN/MKL calls straggle for whole scheduler time slices
when the other core is busy (4-16 ms for a 1,024-row GEMV), and a layer's ~35 eager elementwise ops cost
~2.4 us each. Here:
  * linear: y = x W^T with x [M, K] (M <= max_tokens), W [N, K] untouched (no prepacking, no copy): a tile of
    R weight rows x MG token rows accumulates fp32 dot products (AVX512-BF16 `vdpbf16ps` for bf16, FMA for fp32).
  * packed INT4 / ternary weights (minicpm4/quant/kernels.py, spliced into this source so that one pool serves
    both): a `Lin` job then carries the packed descriptor and the activations quantized to int8 by the caller.
  * a thread pool whose chunks can be stolen back: a descheduled worker never makes a call wait (see the C++);
    the caller takes row chunks from the front and workers from the back, so each streams contiguous rows
    (2 threads: 36 GB/s, the box's measured 2-thread read bandwidth at the time, vs 22 GB/s interleaved).
  * RMSNorm, RoPE + q/k/v split, SwiGLU, the muP residuals: vectorised, in model.py's rounding order (fp32 math,
    a cast where the PyTorch code casts), so bf16 results match the plain path up to summation order.
Built on first use by attention/cpp_build.py (-march=native, cached in ~/.cache/minicpm4); no AVX-512, no
compiler or MINICPM4_NO_CPU_KERNEL set -> `library()` is None and FastDecoder runs its PyTorch path.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from minicpm4.attention import cpp_build

_SOURCE = r"""
// Decode-sized CPU kernels for FastDecoder: GEMV/skinny GEMM against nn.Linear-layout weights, RMSNorm, RoPE,
// SwiGLU and muP residuals, fused into two calls per layer. Elementwise math follows model.py's rounding order.
#ifndef __AVX512F__
#error "FastDecoder kernel needs AVX-512 (the PyTorch path runs elsewhere)"
#endif
#include <immintrin.h>
#include <sched.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <thread>
#include <vector>

#define UNR _Pragma("GCC unroll 8")
typedef uint16_t bf16;

static inline float bf2f(bf16 x) { uint32_t u = uint32_t(x) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16 f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return bf16(u >> 16); }
static inline float rbf(float f) { return bf2f(f2bf(f)); }  // round through bf16 (round to nearest even)

// ---- y[M, n0:n1] = x[M, K] . W[n0:n1, K]^T into acc [M][n1 - n0] fp32; W in nn.Linear layout -----------------------
#ifdef __AVX512BF16__
static inline __m512 dot_bf(__m512 a, __m512i x, __m512i w) { return _mm512_dpbf16_ps(a, (__m512bh)x, (__m512bh)w); }
#else  // AVX-512F without bf16 dot products: widen both halves and FMA (same fp32 products, another summation order)
static inline __m512 dot_bf(__m512 a, __m512i x, __m512i w) {
    const __m512 xl = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), wl = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000);
    const __m512 xh = _mm512_castsi512_ps(_mm512_and_si512(x, hi)), wh = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
    return _mm512_fmadd_ps(xh, wh, _mm512_fmadd_ps(xl, wl, a));
}
#endif

// PF: prefetch the same k-slice of the R rows at pf (the next row group) into L1 while this one computes. With
// several token rows a row group takes long enough that the hardware prefetcher falls behind (single core,
// 8192 x 1024 bf16 from DRAM: 16 rows 62 -> 96 GMAC/s, 4 rows 39 -> 59); one row (pure streaming) gains nothing.
template <int R, int MG, bool PF>
static inline void tile_bf16(const bf16* x, const bf16* w, int64_t K, float* acc, int64_t lda, const bf16* pf) {
    __m512 a[MG][R];
    UNR for (int m = 0; m < MG; ++m) UNR for (int r = 0; r < R; ++r) a[m][r] = _mm512_setzero_ps();
    auto step = [&](int64_t k, __mmask32 mk) __attribute__((always_inline)) {
        __m512i wv[R];
        UNR for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mk, w + r * K + k);
        if (PF) { UNR for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(pf + r * K + k), _MM_HINT_T0); }
        UNR for (int m = 0; m < MG; ++m) {
            const __m512i xv = _mm512_maskz_loadu_epi16(mk, x + m * K + k);
            UNR for (int r = 0; r < R; ++r) a[m][r] = dot_bf(a[m][r], xv, wv[r]);
        }
    };
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) step(k, (__mmask32)~0u);
    if (k < K) step(k, (__mmask32)((1u << (K - k)) - 1));
    UNR for (int m = 0; m < MG; ++m) UNR for (int r = 0; r < R; ++r) acc[m * lda + r] = _mm512_reduce_add_ps(a[m][r]);
}

template <int R, int MG, bool PF>
static inline void tile_f32(const float* x, const float* w, int64_t K, float* acc, int64_t lda, const float* pf) {
    __m512 a[MG][R];
    UNR for (int m = 0; m < MG; ++m) UNR for (int r = 0; r < R; ++r) a[m][r] = _mm512_setzero_ps();
    auto step = [&](int64_t k, __mmask16 mk) __attribute__((always_inline)) {
        __m512 wv[R];
        UNR for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mk, w + r * K + k);
        if (PF) { UNR for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(pf + r * K + k), _MM_HINT_T0); }
        UNR for (int m = 0; m < MG; ++m) {
            const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * K + k);
            UNR for (int r = 0; r < R; ++r) a[m][r] = _mm512_fmadd_ps(xv, wv[r], a[m][r]);
        }
    };
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) step(k, (__mmask16)0xffff);
    if (k < K) step(k, (__mmask16)((1u << (K - k)) - 1));
    UNR for (int m = 0; m < MG; ++m) UNR for (int r = 0; r < R; ++r) acc[m * lda + r] = _mm512_reduce_add_ps(a[m][r]);
}

// Rows [n0, n1) of W (N rows in all) against the M token rows of x: one token row streams 8 weight rows at a time;
// several stream 4 weight rows, each against groups of up to 6 token rows (24 accumulators), the first group
// prefetching the next 4 weight rows.
template <typename T, template <int, int, bool> class Tile>
static void rows_kernel(const T* x, const T* w, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1, float* acc) {
    const int64_t lda = n1 - n0;
    int64_t n = n0;
    if (M == 1)
        for (; n + 8 <= n1; n += 8) Tile<8, 1, false>::run(x, w + n * K, K, acc + (n - n0), lda, nullptr);
    for (; n + 4 <= n1; n += 4) {
        const T* wn = w + n * K;
        const T* pf = n + 8 <= N ? wn + 4 * K : wn;
        float* an = acc + (n - n0);
        int64_t m = 0;
        auto group = [&](auto mg) __attribute__((always_inline)) {
            constexpr int MG = decltype(mg)::value;
            if (m == 0) Tile<4, MG, true>::run(x, wn, K, an, lda, pf);
            else Tile<4, MG, false>::run(x + m * K, wn, K, an + m * lda, lda, nullptr);
            m += MG;
        };
        while (m + 6 <= M) group(std::integral_constant<int, 6>{});
        switch (M - m) {
            case 5: group(std::integral_constant<int, 5>{}); break;
            case 4: group(std::integral_constant<int, 4>{}); break;
            case 3: group(std::integral_constant<int, 3>{}); break;
            case 2: group(std::integral_constant<int, 2>{}); break;
            case 1: group(std::integral_constant<int, 1>{}); break;
        }
    }
    for (; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) Tile<1, 1, false>::run(x + m * K, w + n * K, K, acc + m * lda + (n - n0), lda, nullptr);
}
template <int R, int MG, bool PF> struct TileBF {
    static void run(const bf16* x, const bf16* w, int64_t K, float* a, int64_t l, const bf16* pf) { tile_bf16<R, MG, PF>(x, w, K, a, l, pf); }
};
template <int R, int MG, bool PF> struct TileF {
    static void run(const float* x, const float* w, int64_t K, float* a, int64_t l, const float* pf) { tile_f32<R, MG, PF>(x, w, K, a, l, pf); }
};

// @QUANT_GEMV@ (minicpm4/quant/kernels.py CPP_GEMV is spliced in here at build time)
// out_mode: 0 fp32, 1 bf16, 2 fp32 holding the bf16-rounded value (model.logits in bf16: F.linear(...).float()).
// q: a packed INT4 / ternary weight (then w, x unused: the activations are qa, quantized before the job), else null.
struct Lin { const void* x; const void* w; void* y; int64_t M, N, K, ldy, rows, wbf16, out_mode; const QW* q; QAct qa; };

static void lin_compute(const Lin& a, int64_t c, float* acc) {
    const int64_t n0 = c * a.rows, n1 = std::min(a.N, n0 + a.rows);
    if (a.q) qrows(*a.q, a.qa, a.M, n0, n1, acc);
    else if (a.wbf16) rows_kernel<bf16, TileBF>((const bf16*)a.x, (const bf16*)a.w, a.M, a.N, a.K, n0, n1, acc);
    else rows_kernel<float, TileF>((const float*)a.x, (const float*)a.w, a.M, a.N, a.K, n0, n1, acc);
}
static void lin_commit(const Lin& a, int64_t c, const float* acc) {
    const int64_t n0 = c * a.rows, nr = std::min(a.N, n0 + a.rows) - n0;
    for (int64_t m = 0; m < a.M; ++m) {
        const float* s = acc + m * nr;
        if (a.out_mode == 1) { bf16* y = (bf16*)a.y + m * a.ldy + n0; for (int64_t r = 0; r < nr; ++r) y[r] = f2bf(s[r]); }
        else if (a.out_mode == 2) { float* y = (float*)a.y + m * a.ldy + n0; for (int64_t r = 0; r < nr; ++r) y[r] = rbf(s[r]); }
        else memcpy((float*)a.y + m * a.ldy + n0, s, nr * sizeof(float));
    }
}

// ---- the thread pool ----------------------------------------------------------------------------------------------
// Row chunks are claimed by CAS on one word (generation, front and back of the unclaimed range). Each chunk's result goes to a private
// buffer and is committed by CAS on a per-chunk word tagged with the job's generation. When a worker sits on a chunk
// (descheduled: the box is shared, or the other core is busy), the caller steals it after a grace of a few of its own
// chunk times and computes it itself; the worker's late commit then fails and is dropped. So a job never waits on a
// straggler for a scheduler time slice (measured: 4-8 ms for a 16 MB GEMV under OpenMP's static split), and two
// threads are never slower than one. Workers only read job memory the pool owns (staged inputs, weights).
static constexpr int64_t MAXCH = (1 << 16) - 1, RING = 16, MAXACC = 64 * 64;
static std::atomic<uint64_t> g_claim{0};
static std::atomic<uint64_t> g_chunk[MAXCH];  // generation << 2 | state (1 committing, 2 done, 3 stolen)
static std::atomic<int64_t> g_done{0}, g_inflight{0};
static std::atomic<int32_t> g_sleepers{0};
static std::atomic<uint32_t> g_wake{0};  // futex word: the newest job's generation
static Lin g_ring[RING];
static std::atomic<int64_t> g_spin_ns{100000};
static int g_nworkers = 0;
static uint32_t g_gen = 0;  // caller side, under g_caller (one pool job at a time)
static std::mutex g_caller;
static std::atomic<int64_t> g_stolen{0};

static long futex(std::atomic<uint32_t>* a, int op, uint32_t v) { return syscall(SYS_futex, (uint32_t*)a, op, v, nullptr, nullptr, 0); }
static inline int64_t now_ns() { return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

static void commit(const Lin& a, uint64_t gen, int64_t c, const float* acc) {
    std::atomic<uint64_t>& w = g_chunk[c];
    uint64_t v = w.load(std::memory_order_acquire);
    if ((v >> 2) >= gen || !w.compare_exchange_strong(v, gen << 2 | 1, std::memory_order_acq_rel)) return;
    lin_commit(a, c, acc);
    w.store(gen << 2 | 2, std::memory_order_release);
    g_done.fetch_add(1, std::memory_order_acq_rel);
}

// The claim word is gen << 32 | front << 16 | back: chunks [front, back) are unclaimed. The caller takes chunks from
// the front, workers from the back, so each thread streams one contiguous run of weight rows (interleaved 64 KB
// chunks kept two threads at 24 GB/s, below one thread's 28, as every chunk restarted the hardware prefetcher).
static int64_t run_chunks(uint32_t gen, bool front, int64_t* ns_used) {
    alignas(64) float acc[MAXACC];
    int64_t ran = 0;
    for (;;) {
        uint64_t s = g_claim.load(std::memory_order_acquire);
        if ((uint32_t)(s >> 32) != gen) return ran;
        const Lin a = g_ring[gen % RING];  // consistent when the claim below succeeds: the slot is rewritten only
        // after this job is over, and then the claim word has moved on
        const int64_t lo = (int64_t)((s >> 16) & 0xffff), hi = (int64_t)(s & 0xffff);
        if (lo >= hi) return ran;
        const int64_t idx = front ? lo : hi - 1;
        if (!g_claim.compare_exchange_weak(s, front ? s + (1u << 16) : s - 1, std::memory_order_acq_rel)) continue;
        const int64_t t0 = ns_used ? now_ns() : 0;
        lin_compute(a, idx, acc);
        commit(a, gen, idx, acc);
        if (ns_used) *ns_used += now_ns() - t0;
        ++ran;
    }
}

// Denormals flushed inside the kernels (FTZ | DAZ in MXCSR; the caller's mode is restored on return): x86 runs an
// operation on a denormal ~50x slower, and SiLU's exp or a softmax of far-below-max scores produce them; values
// below 2^-126 change nothing the model computes. Pool threads keep the mode for life.
struct FlushDenormals {
    unsigned saved;
    FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
    ~FlushDenormals() { _mm_setcsr(saved); }
};

static void worker_main() {
    _mm_setcsr(_mm_getcsr() | 0x8040);
    uint32_t seen = g_wake.load();
    for (;;) {
        uint32_t cur;
        const int64_t t0 = now_ns();
        int64_t i = 0;
        while ((cur = g_wake.load(std::memory_order_acquire)) == seen) {  // spin, then yield, then sleep
            if (++i < 1000) { _mm_pause(); continue; }
            if (now_ns() - t0 > g_spin_ns.load(std::memory_order_relaxed)) break;
            sched_yield();
        }
        if (cur == seen) {
            g_sleepers.fetch_add(1);
            while ((cur = g_wake.load(std::memory_order_acquire)) == seen) futex(&g_wake, FUTEX_WAIT_PRIVATE, seen);
            g_sleepers.fetch_sub(1);
        }
        seen = cur;
        g_inflight.fetch_add(1);
        run_chunks(cur, false, nullptr);
        g_inflight.fetch_sub(1);
    }
}

extern "C" int64_t ff_pool_start(int64_t nthreads, int64_t spin_ns) {
    g_spin_ns.store(spin_ns);
    for (; g_nworkers < nthreads - 1; ++g_nworkers) std::thread(worker_main).detach();
    return g_nworkers;
}
extern "C" void ff_pool_quiesce() { while (g_inflight.load() > 0) sched_yield(); }  // before weights are freed
extern "C" int64_t ff_stolen() { return g_stolen.load(); }

// threads: 0 = caller only, else the pool
static void linear(const Lin& a0, int64_t threads) {
    Lin a = a0;
    a.rows = std::max<int64_t>(a.rows, (a.N + MAXCH - 1) / MAXCH);
    a.rows = std::max<int64_t>(1, std::min(a.rows, MAXACC / a.M));
    if (a.q) a.rows = std::max<int64_t>(16, a.rows / 16 * 16);  // whole 16-row tiles (callers keep M <= MAXACC / 16)
    const int64_t n = (a.N + a.rows - 1) / a.rows;
    alignas(64) float acc[MAXACC];
    if (!threads || g_nworkers == 0 || n == 1) {
        for (int64_t c = 0; c < n; ++c) { lin_compute(a, c, acc); lin_commit(a, c, acc); }
        return;
    }
    std::lock_guard<std::mutex> lock(g_caller);
    const uint32_t gen = ++g_gen;
    g_ring[gen % RING] = a;
    g_done.store(0, std::memory_order_relaxed);
    g_claim.store((uint64_t)gen << 32 | (uint64_t)n, std::memory_order_release);
    g_wake.store(gen, std::memory_order_release);
    if (g_sleepers.load(std::memory_order_acquire) > 0) futex(&g_wake, FUTEX_WAKE_PRIVATE, INT32_MAX);
    int64_t ns = 0;
    const int64_t ran = run_chunks(gen, true, &ns);
    const int64_t grace = 3 * ns / std::max<int64_t>(ran, 1) + 5000, t0 = now_ns();
    while (g_done.load(std::memory_order_acquire) < n) {
        if (now_ns() - t0 < grace) { _mm_pause(); continue; }
        for (int64_t c = 0; c < n; ++c) {  // steal what a worker still holds
            std::atomic<uint64_t>& w = g_chunk[c];
            uint64_t v = w.load(std::memory_order_acquire);
            if ((v >> 2) >= gen || !w.compare_exchange_strong(v, (uint64_t)gen << 2 | 3, std::memory_order_acq_rel)) continue;
            lin_compute(a, c, acc);
            lin_commit(a, c, acc);
            w.store((uint64_t)gen << 2 | 2, std::memory_order_release);
            g_done.fetch_add(1, std::memory_order_acq_rel);
            g_stolen.fetch_add(1, std::memory_order_relaxed);
        }
        while (g_done.load(std::memory_order_acquire) < n) _mm_pause();  // a commit in progress
    }
}

// ---- elementwise, in model.py's rounding order (compiled with -ffp-contract=off: no fused multiply-adds here) ----
static inline __mmask16 tail16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
static inline __m512 ld16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
static inline __m512 ld16(const bf16* p, __mmask16 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
static inline __m512i rne_bits(__m512 v) {  // fp32 bits rounded to nearest even at bit 16 (finite inputs)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
}
static inline __m512 rbf16(__m512 v) { return _mm512_castsi512_ps(_mm512_and_si512(rne_bits(v), _mm512_set1_epi32((int)0xffff0000))); }
static inline void st16(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
static inline void st16(bf16* p, __m512 v, __mmask16 k) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rne_bits(v), 16)));
}
template <typename T> static inline __m512 round_as(__m512 v) { return sizeof(T) == 2 ? rbf16(v) : v; }

// RMSNorm: y = w * to_dtype(x * rsqrt(mean(x^2) + eps)), x [M, H]
template <typename T>
static void rmsnorm(const T* x, const T* w, T* y, int64_t M, int64_t H, float eps) {
    for (int64_t m = 0; m < M; ++m) {
        const T* xm = x + m * H;
        __m512 s = _mm512_setzero_ps();
        for (int64_t i = 0; i < H; i += 16) { const __m512 v = ld16(xm + i, tail16(H - i)); s = _mm512_fmadd_ps(v, v, s); }
        const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(s) / float(H) + eps));
        for (int64_t i = 0; i < H; i += 16) {
            const __mmask16 k = tail16(H - i);
            const __m512 n = round_as<T>(_mm512_mul_ps(ld16(xm + i, k), r));
            st16(y + m * H + i, _mm512_mul_ps(ld16(w + i, k), n), k);
        }
    }
}

// h = h + to_dtype(o * rs) over n values (two roundings, as `h + branch * residual_scale`)
template <typename T>
static void residual(T* h, const T* o, int64_t n, float rs) {
    const __m512 s = _mm512_set1_ps(rs);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail16(n - i);
        st16(h + i, _mm512_add_ps(ld16(h + i, k), round_as<T>(_mm512_mul_ps(ld16(o + i, k), s))), k);
    }
}

// exp (|rel err| ~2e-7): 2^n * e^f, f in [-ln2/2, ln2/2], degree-7 Taylor; inputs clamped to [-87, 88].
static inline __m512 vexp(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x));
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (float ci : c) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
    return _mm512_scalef_ps(p, n);
}

// act = to_dtype(silu(g)) * u (gu [M, 2I] = gate | up; F.silu(gate) * up)
template <typename T>
static void silu_mul(const T* gu, T* act, int64_t M, int64_t I) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t m = 0; m < M; ++m) {
        const T* g = gu + m * 2 * I; const T* u = g + I; T* o = act + m * I;
        for (int64_t i = 0; i < I; i += 16) {
            const __mmask16 k = tail16(I - i);
            const __m512 x = ld16(g + i, k);
            const __m512 s = round_as<T>(_mm512_div_ps(x, _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
            st16(o + i, _mm512_mul_ps(s, ld16(u + i, k)), k);
        }
    }
}

// qkv [N, (Hq + 2 Hkv) D] -> q [N, Hq, D], k [N, Hkv, D] rotated (rotate-half in fp32, cast back), v [N, Hkv, D].
// cos/sin [L, D] fp32 tables (LongRoPE attention scaling included), positions [N] int64.
template <typename T>
static void rope_split(const T* qkv, const float* cos, const float* sin, const int64_t* pos, T* q, T* k, T* v,
                       int64_t N, int64_t Hq, int64_t Hkv, int64_t D) {
    const int64_t W = (Hq + 2 * Hkv) * D, h2 = D / 2;
    for (int64_t t = 0; t < N; ++t) {
        const float* c = cos + pos[t] * D; const float* s = sin + pos[t] * D;
        for (int64_t h = 0; h < Hq + Hkv; ++h) {
            const T* x = qkv + t * W + h * D;
            T* o = h < Hq ? q + (t * Hq + h) * D : k + (t * Hkv + h - Hq) * D;
            for (int64_t i = 0; i < h2; i += 16) {  // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
                const __mmask16 km = tail16(h2 - i);
                const __m512 x1 = ld16(x + i, km), x2 = ld16(x + h2 + i, km);
                st16(o + i, _mm512_sub_ps(_mm512_mul_ps(x1, ld16(c + i, km)), _mm512_mul_ps(x2, ld16(s + i, km))), km);
                st16(o + h2 + i, _mm512_add_ps(_mm512_mul_ps(x2, ld16(c + h2 + i, km)), _mm512_mul_ps(x1, ld16(s + h2 + i, km))), km);
            }
        }
        memcpy(v + t * Hkv * D, qkv + t * W + (Hq + Hkv) * D, Hkv * D * sizeof(T));
    }
}

// ---- a model: weights by reference, scratch owned here (never freed: a descheduled worker may still read it) -------
struct WD { const void* w; const QW* q; };  // one linear: a dense [N, K] weight in the model's dtype, or packed (q)
struct LayerW { const void *in_norm, *post_norm; WD qkv, o, gate_up, down; };
struct Model {
    int64_t H, I, Hq, Hkv, D, wbf16, max_tokens, threads, rows_target;
    float eps, rs;
    const float *cos, *sin;
    int64_t ctx;  // rows of the cos/sin tables
    std::vector<LayerW> layers;
    void *x, *qkv, *ob, *ob2, *gu, *act, *xin;
    int64_t prof_on = 0, prof[6] = {0, 0, 0, 0, 0, 0};  // ns per op class (ff_profile)
    int8_t* xq = nullptr; float *sx = nullptr, *cx = nullptr, *qbuf = nullptr;  // packed linears' quantized activations
};
// Op classes of the per-op profile: elementwise (norms, RoPE, SwiGLU, residuals, staging), qkv, o_proj, gate_up,
// down, lm_head GEMVs. Timing costs ~20 ns a call and only runs while profiling is on.
#define PROF(m, c, stmt) do { if ((m)->prof_on) { const int64_t t0_ = now_ns(); stmt; (m)->prof[c] += now_ns() - t0_; } else { stmt; } } while (0)
extern "C" void ff_profile(void* mp, int64_t on, int64_t* out) {  // out[6] <- counters (then reset)
    Model* m = (Model*)mp;
    if (out) for (int i = 0; i < 6; ++i) out[i] = m->prof[i];
    for (int i = 0; i < 6; ++i) m->prof[i] = 0;
    m->prof_on = on;
}

static void* scratch(int64_t bytes) { void* p = aligned_alloc(64, (bytes + 63) / 64 * 64); memset(p, 0, (bytes + 63) / 64 * 64); return p; }

extern "C" void* ff_model_new(int64_t H, int64_t I, int64_t Hq, int64_t Hkv, int64_t D, int64_t wbf16, int64_t max_tokens,
                              float eps, float rs, const float* cos, const float* sin, int64_t ctx, int64_t threads,
                              int64_t rows_target) {
    Model* m = new Model{H, I, Hq, Hkv, D, wbf16, max_tokens, threads, rows_target, eps, rs, cos, sin, ctx, {}, 0, 0, 0, 0, 0, 0, 0};
    const int64_t e = wbf16 ? 2 : 4, T = max_tokens;
    m->x = scratch(T * H * e); m->qkv = scratch(T * (Hq + 2 * Hkv) * D * e); m->ob = scratch(T * H * e);
    m->ob2 = scratch(T * std::max(Hq * D, H) * e); m->gu = scratch(T * 2 * I * e); m->act = scratch(T * I * e);
    m->xin = scratch(T * std::max(H, I) * 4);
    const int64_t QK = std::max({H, I, Hq * D});  // >= any packed linear's K (groups: >= 16 inputs)
    m->xq = (int8_t*)scratch(T * QK); m->sx = (float*)scratch(T * QK / 16 * 4); m->cx = (float*)scratch(T * QK / 16 * 4);
    m->qbuf = (float*)scratch(QK * 4);
    return m;
}
// After ff_pool_quiesce no worker touches this model's scratch or weights: a late worker claims nothing.
extern "C" void ff_model_free(void* mp) {
    ff_pool_quiesce();
    Model* m = (Model*)mp;
    for (void* p : {m->x, m->qkv, m->ob, m->ob2, m->gu, m->act, m->xin, (void*)m->xq, (void*)m->sx, (void*)m->cx,
                    (void*)m->qbuf}) free(p);
    delete m;
}
// Each linear: a dense weight pointer, or a packed descriptor (*_q non-null; kept alive by the caller).
extern "C" void ff_model_add_layer(void* mp, const void* in_norm, const void* qkv, const void* o, const void* post_norm,
                                   const void* gate_up, const void* down, const QW* qkv_q, const QW* o_q,
                                   const QW* gate_up_q, const QW* down_q) {
    ((Model*)mp)->layers.push_back(LayerW{in_norm, post_norm, {qkv, qkv_q}, {o, o_q}, {gate_up, gate_up_q}, {down, down_q}});
}

// output rows per chunk: ~kb KB of weights, in multiples of `tile` rows (the packed kernel's 16-row tiles)
static int64_t rows_for(int64_t kb, int64_t row_bytes, int64_t tile = 8) {
    return std::max<int64_t>(tile, (kb * 1024 / row_bytes) / tile * tile);
}
static int64_t qrow_bytes(const QW& q) { return q.K / (q.fmt == 1 ? 2 : 4) + (q.fmt == 1 ? 3 : 2) * q.G; }
// x [M, K] in the model's dtype (M <= max_tokens); a packed weight quantizes it into the model's scratch first.
static void mlin(const Model* m, const void* x, const WD& w, void* y, int64_t M, int64_t N, int64_t K, int64_t out_mode) {
    if (!w.q) {
        linear(Lin{x, w.w, y, M, N, K, /*ldy*/ N, rows_for(m->rows_target, K * (m->wbf16 ? 2 : 4)), m->wbf16, out_mode},
               m->threads > 1);
        return;
    }
    qquant(*w.q, x, m->wbf16, M, m->xq, m->sx, m->cx, m->qbuf);
    linear(Lin{nullptr, nullptr, y, M, N, K, N, rows_for(m->rows_target, qrow_bytes(*w.q), 16), 0, out_mode, w.q,
               QAct{m->xq, m->sx, m->cx}}, m->threads > 1);
}

// Pre-attention: x = RMSNorm_in(h); qkv = x W_qkv^T; RoPE q/k; split. h [N, H]; q/k/v outputs.
// Returns -1 (and writes nothing) when a position is outside the rotary table, else 0.
extern "C" int64_t ff_attn_in(void* mp, int64_t layer, const void* h, int64_t N, const int64_t* pos, void* q, void* k, void* v) {
    FlushDenormals ftz;
    Model* m = (Model*)mp;
    for (int64_t t = 0; t < N; ++t)
        if (pos[t] < 0 || pos[t] >= m->ctx) return -1;
    const LayerW& L = m->layers[layer];
    const int64_t W = (m->Hq + 2 * m->Hkv) * m->D;
    if (m->wbf16) {
        PROF(m, 0, rmsnorm((const bf16*)h, (const bf16*)L.in_norm, (bf16*)m->x, N, m->H, m->eps));
        PROF(m, 1, mlin(m, m->x, L.qkv, m->qkv, N, W, m->H, 1));
        PROF(m, 0, rope_split((const bf16*)m->qkv, m->cos, m->sin, pos, (bf16*)q, (bf16*)k, (bf16*)v, N, m->Hq, m->Hkv, m->D));
    } else {
        PROF(m, 0, rmsnorm((const float*)h, (const float*)L.in_norm, (float*)m->x, N, m->H, m->eps));
        PROF(m, 1, mlin(m, m->x, L.qkv, m->qkv, N, W, m->H, 0));
        PROF(m, 0, rope_split((const float*)m->qkv, m->cos, m->sin, pos, (float*)q, (float*)k, (float*)v, N, m->Hq, m->Hkv, m->D));
    }
    return 0;
}

// Post-attention: h += o_proj(o) * rs; h += down(silu(gate(x)) * up(x)) * rs with x = RMSNorm_post(h). h updated in place.
template <typename T>
static void attn_out_mlp(Model* m, const LayerW& L, T* h, const T* o, int64_t N) {
    const int64_t HqD = m->Hq * m->D, H = m->H, I = m->I, om = sizeof(T) == 2 ? 1 : 0;
    PROF(m, 0, memcpy(m->ob2, o, N * HqD * sizeof(T)));  // stage: workers only read pool-owned memory
    PROF(m, 2, mlin(m, m->ob2, L.o, m->ob, N, H, HqD, om));
    PROF(m, 0, residual(h, (const T*)m->ob, N * H, m->rs));
    PROF(m, 0, rmsnorm((const T*)h, (const T*)L.post_norm, (T*)m->x, N, H, m->eps));
    PROF(m, 3, mlin(m, m->x, L.gate_up, m->gu, N, 2 * I, H, om));
    PROF(m, 0, silu_mul((const T*)m->gu, (T*)m->act, N, I));
    PROF(m, 4, mlin(m, m->act, L.down, m->ob, N, H, I, om));
    PROF(m, 0, residual(h, (const T*)m->ob, N * H, m->rs));
}
extern "C" void ff_attn_out_mlp(void* mp, int64_t layer, void* h, const void* o, int64_t N) {
    FlushDenormals ftz;
    Model* m = (Model*)mp;
    if (m->wbf16) attn_out_mlp(m, m->layers[layer], (bf16*)h, (const bf16*)o, N);
    else attn_out_mlp(m, m->layers[layer], (float*)h, (const float*)o, N);
}

extern "C" void ff_rmsnorm(void* mp, const void* x, const void* w, void* y, int64_t M) {
    FlushDenormals ftz;
    Model* m = (Model*)mp;
    if (m->wbf16) rmsnorm((const bf16*)x, (const bf16*)w, (bf16*)y, M, m->H, m->eps);
    else rmsnorm((const float*)x, (const float*)w, (float*)y, M, m->H, m->eps);
}

// Logits: y [M, V] fp32 = x [M, H] W^T (x already divided by the muP logit divisor), rounded through bf16 for bf16.
// w: the dense head, or wq: a packed one.
extern "C" void ff_logits(void* mp, const void* x, const void* w, const QW* wq, float* y, int64_t M, int64_t V) {
    FlushDenormals ftz;
    Model* m = (Model*)mp;
    const int64_t e = m->wbf16 ? 2 : 4;
    for (int64_t s = 0; s < M; s += m->max_tokens) {  // stage in blocks of max_tokens rows
        const int64_t n = std::min(m->max_tokens, M - s);
        memcpy(m->xin, (const char*)x + s * m->H * e, n * m->H * e);
        PROF(m, 5, mlin(m, m->xin, WD{w, wq}, y + s * V, n, V, m->H, m->wbf16 ? 2 : 0));
    }
}

// Plain GEMV for benchmarks/tests: y [M, N] = x [M, K] W^T with x staged (M * K elements <= max_tokens * max(H, I)).
extern "C" void ff_linear(void* mp, const void* x, const void* w, void* y, int64_t M, int64_t N, int64_t K, int64_t out_mode) {
    FlushDenormals ftz;
    Model* m = (Model*)mp;
    memcpy(m->xin, x, M * K * (m->wbf16 ? 2 : 4));
    mlin(m, m->xin, WD{w, nullptr}, y, M, N, K, out_mode);
}

// @QUANT_ENTRY@ (minicpm4/quant/kernels.py CPP_ENTRY: the standalone packed linear)

extern "C" int64_t ff_isa() {
#ifdef __AVX512BF16__
    return 2;
#else
    return 1;
#endif
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "ff_pool_start": ([_I, _I], _I),
    "ff_pool_quiesce": ([], None),
    "ff_stolen": ([], _I),
    "ff_model_new": ([_I] * 7 + [_F, _F, _P, _P, _I, _I, _I], _P),
    "ff_model_add_layer": ([_P] * 11, None),
    "ff_model_free": ([_P], None),
    "ff_attn_in": ([_P, _I, _P, _I, _P, _P, _P, _P], _I),
    "ff_attn_out_mlp": ([_P, _I, _P, _P, _I], None),
    "ff_rmsnorm": ([_P, _P, _P, _P, _I], None),
    "ff_logits": ([_P] * 5 + [_I, _I], None),
    "ff_qlinear": ([_P, _P, _I, _I, _P, _I, _I, _I], None),
    "ff_has_vnni": ([], _I),
    "ff_linear": ([_P, _P, _P, _P, _I, _I, _I, _I], None),
    "ff_isa": ([], _I),
    "ff_profile": ([_P, _I, _P], None),
}
# How long an idle pool worker spins (then sleeps on a futex) after a job: a decode step calls the pool every
# ~20-100 us, so a worker that slept each time would pay a futex wake-up (~10-50 us) per GEMV.
SPIN_NS = 200_000
_QUANT_MARK = "// @QUANT_GEMV@ (minicpm4/quant/kernels.py CPP_GEMV is spliced in here at build time)"
_QUANT_ENTRY = "// @QUANT_ENTRY@ (minicpm4/quant/kernels.py CPP_ENTRY: the standalone packed linear)"
_pool_threads = 1


def start_pool(threads: int) -> None:
    """Make the pool `threads` wide (caller included); it only grows."""
    global _pool_threads
    lib = library()
    with _lock:
        if lib is not None and threads > _pool_threads:
            lib.ff_pool_start(threads, SPIN_NS)
            _pool_threads = threads


def library() -> ctypes.CDLL | None:
    """The built kernel library, or None (no AVX-512 / no compiler / disabled)."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            from minicpm4.quant import kernels as qk  # the packed INT4 / ternary GEMV shares this pool

            source = _SOURCE.replace(_QUANT_MARK, qk.CPP_GEMV).replace(_QUANT_ENTRY, qk.CPP_ENTRY)
            lib = cpp_build.build_library("fast_forward", source, cpp_build.FLAGS + ["-ffp-contract=off", "-pthread"])
            if lib is not None:
                for name, (args, res) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = args, res
            _lib = lib
    return _lib


def has_bf16_dot() -> bool:
    """True when the kernel was built with AVX512-BF16 dot products (else bf16 is widened to fp32 + FMA)."""
    lib = library()
    return lib is not None and lib.ff_isa() == 2


def weight_args(w) -> tuple[int | None, int | None]:
    """A linear for the C++: (dense weight pointer, None) for a tensor, (None, descriptor address) for a
    quant.kernels.PackedWeight (the caller keeps the weight, and so its descriptor, alive)."""
    if isinstance(w, torch.Tensor):
        return w.data_ptr(), None
    return None, ctypes.addressof(w.desc())


class KernelModel:
    """One decoder's weights (by pointer: the caller keeps the tensors alive) and the kernel's scratch buffers.

    layers: (in_norm, qkv, o, post_norm, gate_up, down) per layer; each linear a dense tensor in `dtype` or a packed
    weight (minicpm4.quant.kernels.PackedWeight). Not thread-safe: one call at a time (the engine's step loop).
    Scratch is sized for max_tokens rows.
    """

    def __init__(self, *, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, max_tokens: int, eps: float, residual_scale: float, cos: torch.Tensor,
                 sin: torch.Tensor, layers: list[tuple], threads: int, chunk_kb: int = 64) -> None:
        lib = library()
        assert lib is not None, "the FastDecoder kernel is not built"
        assert dtype in (torch.float32, torch.bfloat16), dtype
        assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
        self.lib, self.dtype, self.max_tokens, self.hidden = lib, dtype, max_tokens, hidden
        self.cos, self.sin, self.layers = cos, sin, layers  # references: the kernel reads them in place
        self.threads = threads
        if threads > 1:
            start_pool(threads)
        self.handle = lib.ff_model_new(hidden, intermediate, heads, kv_heads, head_dim, int(dtype == torch.bfloat16),
                                       max_tokens, eps, residual_scale, cos.data_ptr(), sin.data_ptr(), cos.shape[0],
                                       threads, chunk_kb)
        for in_norm, qkv, o, post_norm, gate_up, down in layers:
            for w in (in_norm, post_norm, qkv, o, gate_up, down):
                assert not isinstance(w, torch.Tensor) or (w.dtype == dtype and w.is_contiguous()), "dense weights"
            (qkv_w, qkv_q), (o_w, o_q), (gu_w, gu_q), (d_w, d_q) = map(weight_args, (qkv, o, gate_up, down))
            lib.ff_model_add_layer(self.handle, in_norm.data_ptr(), qkv_w, o_w, post_norm.data_ptr(), gu_w, d_w,
                                   qkv_q, o_q, gu_q, d_q)

    def __del__(self) -> None:
        # Waits for any pool worker still inside a chunk of this model, then frees the scratch: only then may
        # the weight tensors this object references be released.
        if getattr(self, "handle", None):
            self.lib.ff_model_free(self.handle)
            self.handle = None
