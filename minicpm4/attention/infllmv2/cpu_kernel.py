"""Optional CPU kernel for the InfLLM v2 stage-2 forward: per-token block lists, no gather copies.

Why: in plain PyTorch every token's selected blocks must be gathered into a copy before a batched
matmul with only G = 16 rows (blocksparse.py); on the 2-core dev box that copy plus small-matmul
inefficiency cost ~2x against dense SDPA's per-FLOP speed. This kernel walks each token's block list
in place with a FlashAttention-style online softmax (the CUDA kernel's layout: the G heads of one
token are the rows of a tile), in fp32, and returns (out, lse) exactly like blocksparse_forward.

It is a small C++ source compiled on first use with the system C++ compiler into
~/.cache/minicpm4/ (keyed by a hash of source, flags and CPU flags; ../cpp_build.py) and loaded with ctypes: no
PyTorch headers, so it builds in ~2 s. Threads: the token range is split over torch.get_num_threads()
Python threads (ctypes releases the GIL). When no compiler is found or the build fails, `available()`
is False and callers use the PyTorch path; tests compare both against the reference.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from minicpm4.attention import cpp_build

_SOURCE = r"""
#include <cstdint>
#include <cmath>
#include <vector>
#include <algorithm>

typedef float v8 __attribute__((vector_size(32), aligned(4)));    // unaligned-capable 8 x fp32
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

static inline v8 ld(const float* p) { return *(const v8*)p; }
static inline void st(float* p, v8 x) { *(v8*)p = x; }
static inline v8 bc(float x) { return (v8){x, x, x, x, x, x, x, x}; }
static inline float hsum(v8 x) { return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7])); }

// exp(x) for x <= 0 (softmax numerators): 2^n * 2^f, f in [-0.5, 0.5], degree-7 Taylor of e^(f ln2) (rel. err ~1e-8).
static inline v8 vexp(v8 x) {
    x = x < bc(-87.0f) ? bc(-87.0f) : x;
    v8 t = x * bc(1.44269504088896341f) + bc(0.5f);
    v8i ti = __builtin_convertvector(t, v8i);               // truncation toward zero
    v8 tf = __builtin_convertvector(ti, v8);
    ti = ti + (tf > t);                                      // floor(t + 0.5): subtract 1 where trunc > t (true = -1)
    v8 f = (t - bc(0.5f) - __builtin_convertvector(ti, v8)) * bc(0.693147180559945309f);
    v8 p = bc(1.0f / 5040);
    p = p * f + bc(1.0f / 720); p = p * f + bc(1.0f / 120); p = p * f + bc(1.0f / 24);
    p = p * f + bc(1.0f / 6);   p = p * f + bc(0.5f);       p = p * f + bc(1.0f);      p = p * f + bc(1.0f);
    v8i bits = (ti + 127) << 23;
    v8 scale;
    __builtin_memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// One attended block for one token, all G heads: kb = its keys transposed [D, B] (d-major, so a tile of S is an
// outer product and needs no horizontal sums), vb = its values [B, D], n <= B keys from the block start (the rest
// is masked). Updates the running max m, sum l and unnormalised output acc (online softmax). pk/pv: the next
// block, prefetched while this one computes.
static void attend_block(const float* qt, const float* kb, const float* vb, int64_t n, const float* pk, const float* pv,
                         int64_t G, int64_t D, int64_t B, float* S, float* acc, float* m, float* l) {
    const int64_t lines = D * B / 16;  // 64-byte lines per block
    const int64_t nj = (n + 15) / 16 * 16;  // score columns computed (zero-padded keys beyond n are masked)
    // S[g][j] = q_g . k_j: tiles of 4 heads x 16 keys, outer products along D. Keys outer, heads inner:
    // the [D, 16] slice of kt (8 KB) stays in L1 while every head tile uses it.
    const int64_t G4 = G / 4 * 4;
    for (int64_t j = 0; j < nj; j += 16) {
        for (int64_t g = 0; g < G4; g += 4) {
            const float *q0 = qt + g * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
            v8 a00 = bc(0), a01 = bc(0), a10 = bc(0), a11 = bc(0), a20 = bc(0), a21 = bc(0), a30 = bc(0), a31 = bc(0);
            // first head tile: line (j/16) * D + d of the next block, else a line already in cache
            const int64_t step = (g == 0 && (j / 16 + 1) * D <= lines) ? 16 : 0;
            const float* pf = step ? pk + (j / 16) * D * 16 : kb + j;
            for (int64_t d = 0; d < D; ++d) {
                __builtin_prefetch(pf + d * step);
                v8 x0 = ld(kb + d * B + j), x1 = ld(kb + d * B + j + 8), y;
                y = bc(q0[d]); a00 += y * x0; a01 += y * x1;
                y = bc(q1[d]); a10 += y * x0; a11 += y * x1;
                y = bc(q2[d]); a20 += y * x0; a21 += y * x1;
                y = bc(q3[d]); a30 += y * x0; a31 += y * x1;
            }
            float* s = S + g * B + j;
            st(s, a00); st(s + 8, a01); st(s + B, a10); st(s + B + 8, a11);
            st(s + 2 * B, a20); st(s + 2 * B + 8, a21); st(s + 3 * B, a30); st(s + 3 * B + 8, a31);
        }
        for (int64_t g = G4; g < G; ++g) {
            v8 a0 = bc(0), a1 = bc(0);
            for (int64_t d = 0; d < D; ++d) {
                v8 y = bc(qt[g * D + d]);
                a0 += y * ld(kb + d * B + j); a1 += y * ld(kb + d * B + j + 8);
            }
            st(S + g * B + j, a0); st(S + g * B + j + 8, a1);
        }
    }
    // Online softmax: running max, rescale, P = exp(S - m) (zero beyond n).
    for (int64_t g = 0; g < G; ++g) {
        float* s = S + g * B;
        for (int64_t j = n; j < nj; ++j) s[j] = -INFINITY;
        v8 vm = bc(-INFINITY);
        for (int64_t j = 0; j < nj; j += 8) { v8 x = ld(s + j); vm = x > vm ? x : vm; }
        float mx = m[g];
        for (int i = 0; i < 8; ++i) mx = vm[i] > mx ? vm[i] : mx;
        if (mx > m[g]) {
            const float r = std::exp(m[g] - mx);  // m = -inf -> 0
            l[g] *= r;
            for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= r;
            m[g] = mx;
        }
        v8 sum = bc(0);
        for (int64_t j = 0; j < nj; j += 8) {
            v8 x = ld(s + j);
            v8 p = vexp(x - bc(mx));
            p = x == bc(-INFINITY) ? bc(0.0f) : p;
            st(s + j, p);
            sum += p;
        }
        l[g] += hsum(sum);
    }
    // acc[g] += sum_j P[g][j] v_j: tiles of 4 heads x 16 dims (8 for a D % 16 tail). Dims outer, heads
    // inner: the [n, 16] slice of the value block (4 KB) stays in L1 while every head tile uses it.
    for (int64_t d = 0; d < D; d += 16) {
        const bool full = d + 16 <= D;
        for (int64_t g = 0; g < G4; g += 4) {
            const float *p0 = S + g * B, *p1 = p0 + B, *p2 = p1 + B, *p3 = p2 + B;
            float* a = acc + g * D + d;
            const int64_t step = (g == 0 && (d / 16 + 1) * B <= lines) ? 16 : 0;  // as for the keys
            const float* pf = step ? pv + (d / 16) * B * 16 : vb + d;
            if (full) {
                v8 c00 = ld(a), c01 = ld(a + 8), c10 = ld(a + D), c11 = ld(a + D + 8);
                v8 c20 = ld(a + 2 * D), c21 = ld(a + 2 * D + 8), c30 = ld(a + 3 * D), c31 = ld(a + 3 * D + 8);
                for (int64_t j = 0; j < n; ++j) {
                    __builtin_prefetch(pf + j * step);
                    v8 x0 = ld(vb + j * D + d), x1 = ld(vb + j * D + d + 8), y;
                    y = bc(p0[j]); c00 += y * x0; c01 += y * x1;
                    y = bc(p1[j]); c10 += y * x0; c11 += y * x1;
                    y = bc(p2[j]); c20 += y * x0; c21 += y * x1;
                    y = bc(p3[j]); c30 += y * x0; c31 += y * x1;
                }
                st(a, c00); st(a + 8, c01); st(a + D, c10); st(a + D + 8, c11);
                st(a + 2 * D, c20); st(a + 2 * D + 8, c21); st(a + 3 * D, c30); st(a + 3 * D + 8, c31);
            } else {
                v8 c0 = ld(a), c1 = ld(a + D), c2 = ld(a + 2 * D), c3 = ld(a + 3 * D);
                for (int64_t j = 0; j < n; ++j) {
                    v8 x = ld(vb + j * D + d);
                    c0 += bc(p0[j]) * x; c1 += bc(p1[j]) * x; c2 += bc(p2[j]) * x; c3 += bc(p3[j]) * x;
                }
                st(a, c0); st(a + D, c1); st(a + 2 * D, c2); st(a + 3 * D, c3);
            }
        }
        for (int64_t g = G4; g < G; ++g)
            for (int64_t dd = d; dd < std::min(d + 16, D); dd += 8) {
                v8 c = ld(acc + g * D + dd);
                for (int64_t j = 0; j < n; ++j) c += bc(S[g * B + j]) * ld(vb + j * D + dd);
                st(acc + g * D + dd, c);
            }
    }
}

static void finish(const float* acc, const float* m, const float* l, int64_t G, int64_t D, float* o, float* lse) {
    for (int64_t g = 0; g < G; ++g) {
        const float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;
        for (int64_t d = 0; d < D; ++d) o[g * D + d] = acc[g * D + d] * inv;
        lse[g] = l[g] > 0 ? m[g] + std::log(l[g]) : INFINITY;
    }
}

// Prefill layout. q [H, T, G, D] (pre-scaled); kt: all key blocks transposed [NBLK, D, B]; v: value blocks
// [NBLK, B, D]. blk/cnt [H, T, NB]: block index into NBLK and number of keys (from the block start, <= B) of every
// attended block; cnt <= 0 is skipped. Tokens [t0, t1) of every head. out [H, T, G, D], lse [H, T, G] (+inf when
// nothing is attended). Requires B % 16 == 0 and D % 8 == 0.
extern "C" void infllmv2_stage2_fwd(const float* q, const float* kt, const float* v, const int64_t* blk,
                                    const int32_t* cnt, int64_t H, int64_t T, int64_t G, int64_t D, int64_t NB,
                                    int64_t B, int64_t t0, int64_t t1, float* out, float* lse) {
    std::vector<float> S(G * B), acc(G * D), m(G), l(G);
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t t = t0; t < t1; ++t) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            std::fill(m.begin(), m.end(), -INFINITY);
            std::fill(l.begin(), l.end(), 0.0f);
            const int64_t* bt = blk + (h * T + t) * NB;
            const int32_t* ct = cnt + (h * T + t) * NB;
            for (int64_t e = 0; e < NB; ++e) {
                if (ct[e] <= 0) continue;
                // The next attended block is usually far away (a random past block): prefetch it while this one
                // computes (measured ~35% faster with blocks spread over 128 MB).
                int64_t e2 = e + 1;
                while (e2 < NB && ct[e2] <= 0) ++e2;
                const int64_t b2 = e2 < NB ? bt[e2] : bt[e];
                attend_block(q + (h * T + t) * G * D, kt + bt[e] * D * B, v + bt[e] * B * D, ct[e],
                             kt + b2 * D * B, v + b2 * B * D, G, D, B, S.data(), acc.data(), m.data(), l.data());
            }
            finish(acc.data(), m.data(), l.data(), G, D, out + (h * T + t) * G * D, lse + (h * T + t) * G);
        }
    }
}

template <typename X> static inline float to_f32(X x);
template <> inline float to_f32<float>(float x) { return x; }
template <> inline float to_f32<uint16_t>(uint16_t x) {  // bfloat16 bits -> fp32
    const uint32_t bits = uint32_t(x) << 16;
    float f;
    __builtin_memcpy(&f, &bits, sizeof(f));
    return f;
}

template <typename X>
static void stage2_rows(const float* q, const X* k, const X* v, const int64_t* row0, const int32_t* cnt, int64_t H,
                        int64_t T, int64_t G, int64_t D, int64_t NB, int64_t B, int64_t t0, int64_t t1, float* out,
                        float* lse) {
    std::vector<float> S(G * B), acc(G * D), m(G), l(G), kb(D * B), vb(B * D);
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t t = t0; t < t1; ++t) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            std::fill(m.begin(), m.end(), -INFINITY);
            std::fill(l.begin(), l.end(), 0.0f);
            for (int64_t e = 0; e < NB; ++e) {
                const int64_t n = cnt[(h * T + t) * NB + e];
                if (n <= 0) continue;
                const X* kr = k + row0[(h * T + t) * NB + e] * D;
                const X* vr = v + row0[(h * T + t) * NB + e] * D;
                for (int64_t j = 0; j < n; ++j)
                    for (int64_t d = 0; d < D; ++d) {
                        kb[d * B + j] = to_f32(kr[j * D + d]);
                        vb[j * D + d] = to_f32(vr[j * D + d]);
                    }
                attend_block(q + (h * T + t) * G * D, kb.data(), vb.data(), n, kb.data(), vb.data(), G, D, B, S.data(),
                             acc.data(), m.data(), l.data());
            }
            finish(acc.data(), m.data(), l.data(), G, D, out + (h * T + t) * G * D, lse + (h * T + t) * G);
        }
    }
}

// Decode layout: keys/values read in place from the cache rows (fp32, or bf16 when bf16 != 0), each block copied
// into a small fp32 buffer (transposed keys) on the way. row0/cnt [H, T, NB]: first row (into the k/v rows) and key
// count of every attended block. Other arguments as infllmv2_stage2_fwd.
extern "C" void infllmv2_stage2_fwd_rows(const float* q, const void* k, const void* v, int64_t bf16, const int64_t* row0,
                                         const int32_t* cnt, int64_t H, int64_t T, int64_t G, int64_t D, int64_t NB,
                                         int64_t B, int64_t t0, int64_t t1, float* out, float* lse) {
    if (bf16)
        stage2_rows(q, (const uint16_t*)k, (const uint16_t*)v, row0, cnt, H, T, G, D, NB, B, t0, t1, out, lse);
    else
        stage2_rows(q, (const float*)k, (const float*)v, row0, cnt, H, T, G, D, NB, B, t0, t1, out, lse);
}
"""

_FLAGS = cpp_build.FLAGS
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _build() -> ctypes.CDLL | None:
    lib = cpp_build.build_library("infllmv2_stage2", _SOURCE, _FLAGS)
    if lib is None:
        return None
    fn = lib.infllmv2_stage2_fwd
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 8 + [ctypes.c_void_p] * 2
    fn = lib.infllmv2_stage2_fwd_rows
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 8 + [ctypes.c_void_p] * 2
    return lib


def available() -> bool:
    global _lib, _tried
    with _lock:
        if not _tried:
            _lib, _tried = _build(), True
    return _lib is not None


def supports(q: torch.Tensor, k: torch.Tensor, block_size: int) -> bool:
    """CPU tensors, head dim a multiple of 8 and block size a multiple of 16 (the kernel's tiles), a built library."""
    return (q.device.type == "cpu" and k.device.type == "cpu" and q.shape[-1] % 8 == 0 and block_size % 16 == 0
            and available())


def key_blocks(k: torch.Tensor, v: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k/v [H, S, D] (any dtype; S padded with zeros to whole blocks) -> kt [H * nblk, D, B], vb [H * nblk, B, D] fp32."""
    H, S, D = k.shape
    nblk = -(-S // block_size)
    pad = nblk * block_size - S
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)) if pad else k.float()
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)) if pad else v.float()
    kt = kf.reshape(H * nblk, block_size, D).transpose(1, 2).contiguous()
    return kt, vf.reshape(H * nblk, block_size, D).contiguous()


def _run_over_tokens(fn, args: list, H: int, T: int, G: int, D: int,
                     threads: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Call a stage-2 entry point fn(*args, t0, t1, out, lse) on token ranges split over threads (the kernel
    releases the GIL: ctypes calls do) -> out [H, T, G, D] fp32, lse [H, T, G] fp32."""
    out = torch.empty(H, T, G, D, dtype=torch.float32)
    lse = torch.empty(H, T, G, dtype=torch.float32)
    n = max(1, min(threads or torch.get_num_threads(), T))
    if n == 1:
        fn(*args, 0, T, out.data_ptr(), lse.data_ptr())
    else:
        bounds = [T * i // n for i in range(n + 1)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda i: fn(*args, bounds[i], bounds[i + 1], out.data_ptr(), lse.data_ptr()), range(n)))
    return out, lse


def stage2_forward(q: torch.Tensor, kt: torch.Tensor, vb: torch.Tensor, blk: torch.Tensor, cnt: torch.Tensor,
                   threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, T, G, D] fp32 pre-scaled; kt [NBLK, D, B] / vb [NBLK, B, D] fp32 (key_blocks); blk (int64) / cnt
    (int32) [H, T, NB] = index into NBLK and number of keys of every attended block (cnt <= 0: skipped).

    -> out [H, T, G, D] fp32, lse [H, T, G] fp32.
    """
    assert available(), "the InfLLM v2 CPU kernel is not built"
    H, T, G, D = q.shape
    B = kt.shape[2]
    q = q.contiguous().float()
    blk, cnt = blk.contiguous().long(), cnt.contiguous().int()
    assert kt.is_contiguous() and vb.is_contiguous() and kt.dtype == vb.dtype == torch.float32
    NB = blk.shape[-1]
    fn = _lib.infllmv2_stage2_fwd
    args = [q.data_ptr(), kt.data_ptr(), vb.data_ptr(), blk.data_ptr(), cnt.data_ptr(), H, T, G, D, NB, B]
    return _run_over_tokens(fn, args, H, T, G, D, threads)


def stage2_forward_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row0: torch.Tensor, cnt: torch.Tensor,
                        block_size: int, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode / few queries: keys and values read in place. q [H, T, G, D] fp32 pre-scaled; k/v: the cache rows
    (fp32 or bf16; any tensor whose memory holds [rows, D] with rows of D contiguous values, e.g. a [Hkv, L, D]
    slice of a longer cache); row0 (int64) / cnt (int32) [H, T, NB] = first row and key count of every attended
    block (cnt <= 0: skipped). -> out [H, T, G, D] fp32, lse [H, T, G] fp32.
    """
    assert available(), "the InfLLM v2 CPU kernel is not built"
    assert k.dtype == v.dtype and k.dtype in (torch.float32, torch.bfloat16), k.dtype
    H, T, G, D = q.shape
    q = q.contiguous().float()
    row0, cnt = row0.contiguous().long(), cnt.contiguous().int()
    NB = row0.shape[-1]
    fn = _lib.infllmv2_stage2_fwd_rows
    args = [q.data_ptr(), k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16), row0.data_ptr(), cnt.data_ptr(),
            H, T, G, D, NB, block_size]
    return _run_over_tokens(fn, args, H, T, G, D, threads)
