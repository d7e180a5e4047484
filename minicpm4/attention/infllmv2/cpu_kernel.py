"""Optional CPU kernel for the InfLLM v2 stage-2 forward: per-token block lists, no gather copies.

Why: in plain PyTorch every token's selected blocks must be gathered into a copy before a batched
matmul with only G = 16 rows (blocksparse.py); on the 2-core dev box that copy plus small-matmul
inefficiency cost ~2x against dense SDPA's per-FLOP speed. This kernel walks each token's block list
in place with a FlashAttention-style online softmax (the CUDA kernel's layout: the G heads of one
token are the rows of a tile), in fp32, and returns (out, lse) exactly like blocksparse_forward.

It is a small C++ source compiled on first use with the system C++ compiler into
~/.cache/minicpm4/ (keyed by a hash of source, flags and CPU flags) and loaded with ctypes: no
PyTorch headers, so it builds in ~2 s. Threads: the token range is split over torch.get_num_threads()
Python threads (ctypes releases the GIL). When no compiler is found or the build fails, `available()`
is False and callers use the PyTorch path; tests compare both against the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

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

// q [H, T, G, D] (pre-scaled), k/v [H * S, D] fp32 rows; off/cnt [H, T, NB]: first key row (into all H * S rows)
// and key count of each attended block (cnt <= 0: skip). Tokens [t0, t1). out [H, T, G, D], lse [H, T, G] (+inf if nothing attended).
extern "C" void infllmv2_stage2_fwd(const float* q, const float* k, const float* v, const int64_t* off,
                                    const int32_t* cnt, int64_t H, int64_t T, int64_t G, int64_t D, int64_t NB,
                                    int64_t bmax, int64_t t0, int64_t t1, float* out, float* lse) {
    const int64_t bp = (bmax + 7) / 8 * 8;
    std::vector<float> S(G * bp), acc(G * D), m(G), l(G);
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t t = t0; t < t1; ++t) {
            const float* qt = q + (h * T + t) * G * D;
            std::fill(acc.begin(), acc.end(), 0.0f);
            std::fill(m.begin(), m.end(), -INFINITY);
            std::fill(l.begin(), l.end(), 0.0f);
            for (int64_t e = 0; e < NB; ++e) {
                const int64_t n = cnt[(h * T + t) * NB + e];
                if (n <= 0) continue;
                const float* kb = k + off[(h * T + t) * NB + e] * D;  // off: row in the flattened [H * S] keys
                const float* vb = v + off[(h * T + t) * NB + e] * D;
                // S[g][j] = q_g . k_j : tiles of 4 heads x 2 keys, dot products along D.
                int64_t g = 0;
                for (; g + 4 <= G; g += 4) {
                    const float *q0 = qt + g * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
                    int64_t j = 0;
                    for (; j + 2 <= n; j += 2) {
                        const float *k0 = kb + j * D, *k1 = k0 + D;
                        v8 a00 = bc(0), a01 = bc(0), a10 = bc(0), a11 = bc(0), a20 = bc(0), a21 = bc(0), a30 = bc(0), a31 = bc(0);
                        for (int64_t d = 0; d < D; d += 8) {
                            v8 x0 = ld(k0 + d), x1 = ld(k1 + d), y;
                            y = ld(q0 + d); a00 += y * x0; a01 += y * x1;
                            y = ld(q1 + d); a10 += y * x0; a11 += y * x1;
                            y = ld(q2 + d); a20 += y * x0; a21 += y * x1;
                            y = ld(q3 + d); a30 += y * x0; a31 += y * x1;
                        }
                        float* s = S.data() + g * bp + j;
                        s[0] = hsum(a00); s[1] = hsum(a01); s[bp] = hsum(a10); s[bp + 1] = hsum(a11);
                        s[2 * bp] = hsum(a20); s[2 * bp + 1] = hsum(a21); s[3 * bp] = hsum(a30); s[3 * bp + 1] = hsum(a31);
                    }
                    for (; j < n; ++j)
                        for (int64_t i = 0; i < 4; ++i) {
                            v8 a = bc(0);
                            for (int64_t d = 0; d < D; d += 8) a += ld(qt + (g + i) * D + d) * ld(kb + j * D + d);
                            S[(g + i) * bp + j] = hsum(a);
                        }
                }
                for (; g < G; ++g)
                    for (int64_t j = 0; j < n; ++j) {
                        v8 a = bc(0);
                        for (int64_t d = 0; d < D; d += 8) a += ld(qt + g * D + d) * ld(kb + j * D + d);
                        S[g * bp + j] = hsum(a);
                    }
                // Online softmax: new running max, rescale, P = exp(S - m) (zero beyond n).
                for (g = 0; g < G; ++g) {
                    float* s = S.data() + g * bp;
                    float mx = m[g];
                    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
                    if (mx > m[g]) {
                        const float r = std::exp(m[g] - mx);  // m = -inf -> 0
                        l[g] *= r;
                        for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= r;
                        m[g] = mx;
                    }
                    v8 sum = bc(0);
                    for (int64_t j = 0; j < bp; j += 8) {
                        v8 p = vexp(ld(s + j) - bc(mx));
                        for (int64_t i = 0; i < 8; ++i) if (j + i >= n) p[i] = 0.0f;
                        st(s + j, p);
                        sum += p;
                    }
                    l[g] += hsum(sum);
                }
                // acc[g] += sum_j P[g][j] v_j : tiles of 4 heads x 16 dims (8 if D % 16 != 0).
                g = 0;
                for (; g + 4 <= G; g += 4) {
                    const float *p0 = S.data() + g * bp, *p1 = p0 + bp, *p2 = p1 + bp, *p3 = p2 + bp;
                    int64_t d = 0;
                    for (; d + 16 <= D; d += 16) {
                        float* a = acc.data() + g * D + d;
                        v8 c00 = ld(a), c01 = ld(a + 8), c10 = ld(a + D), c11 = ld(a + D + 8);
                        v8 c20 = ld(a + 2 * D), c21 = ld(a + 2 * D + 8), c30 = ld(a + 3 * D), c31 = ld(a + 3 * D + 8);
                        for (int64_t j = 0; j < n; ++j) {
                            v8 x0 = ld(vb + j * D + d), x1 = ld(vb + j * D + d + 8), y;
                            y = bc(p0[j]); c00 += y * x0; c01 += y * x1;
                            y = bc(p1[j]); c10 += y * x0; c11 += y * x1;
                            y = bc(p2[j]); c20 += y * x0; c21 += y * x1;
                            y = bc(p3[j]); c30 += y * x0; c31 += y * x1;
                        }
                        st(a, c00); st(a + 8, c01); st(a + D, c10); st(a + D + 8, c11);
                        st(a + 2 * D, c20); st(a + 2 * D + 8, c21); st(a + 3 * D, c30); st(a + 3 * D + 8, c31);
                    }
                    for (; d < D; d += 8)
                        for (int64_t i = 0; i < 4; ++i) {
                            v8 c = ld(acc.data() + (g + i) * D + d);
                            for (int64_t j = 0; j < n; ++j) c += bc(S[(g + i) * bp + j]) * ld(vb + j * D + d);
                            st(acc.data() + (g + i) * D + d, c);
                        }
                }
                for (; g < G; ++g)
                    for (int64_t d = 0; d < D; d += 8) {
                        v8 c = ld(acc.data() + g * D + d);
                        for (int64_t j = 0; j < n; ++j) c += bc(S[g * bp + j]) * ld(vb + j * D + d);
                        st(acc.data() + g * D + d, c);
                    }
            }
            float* o = out + (h * T + t) * G * D;
            for (int64_t g = 0; g < G; ++g) {
                const float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;
                for (int64_t d = 0; d < D; ++d) o[g * D + d] = acc[g * D + d] * inv;
                lse[(h * T + t) * G + g] = l[g] > 0 ? m[g] + std::log(l[g]) : INFINITY;
            }
        }
    }
}
"""

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL | None:
    if os.environ.get("MINICPM4_NO_CPU_KERNEL"):
        return None
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
    if cxx is None or platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return None
    key = hashlib.sha256("\n".join([_SOURCE, " ".join(_FLAGS), cxx, _cpu_signature()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minicpm4"
    so = cache / f"infllmv2_stage2_{key}.so"
    if not so.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, tmp_so = Path(tmp) / "k.cpp", Path(tmp) / "k.so"
                src.write_text(_SOURCE)
                subprocess.run([cxx, *_FLAGS, str(src), "-o", str(tmp_so)], check=True, capture_output=True, timeout=300)
                os.replace(tmp_so, so)  # atomic: concurrent builders never load a half-written file
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(so))
    except OSError:
        return None
    fn = lib.infllmv2_stage2_fwd
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 8 + [ctypes.c_void_p] * 2
    return lib


def available() -> bool:
    global _lib, _tried
    with _lock:
        if not _tried:
            _lib, _tried = _build(), True
    return _lib is not None


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """CPU tensors, head dim a multiple of 8 (the kernel's vector width), and a built library."""
    return q.device.type == "cpu" and k.device.type == "cpu" and q.shape[-1] % 8 == 0 and available()


def stage2_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, off: torch.Tensor, cnt: torch.Tensor,
                   block_size: int, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, T, G, D] fp32 pre-scaled; k/v [H, S, D] fp32; off (int64) / cnt (int32) [H, T, NB] = first row
    (into the flattened H * S key rows) and number of keys of every attended block; cnt <= 0 is skipped.

    -> out [H, T, G, D] fp32, lse [H, T, G] fp32.
    """
    assert available(), "the InfLLM v2 CPU kernel is not built"
    H, T, G, D = q.shape
    q, k, v = (x.contiguous().float() for x in (q, k, v))
    off, cnt = off.contiguous().long(), cnt.contiguous().int()
    NB = off.shape[-1]
    out = torch.empty(H, T, G, D, dtype=torch.float32)
    lse = torch.empty(H, T, G, dtype=torch.float32)
    fn = _lib.infllmv2_stage2_fwd
    args = [q.data_ptr(), k.data_ptr(), v.data_ptr(), off.data_ptr(), cnt.data_ptr(), H, T, G, D, NB, block_size]
    n = max(1, min(threads or torch.get_num_threads(), T))
    if n == 1:
        fn(*args, 0, T, out.data_ptr(), lse.data_ptr())
    else:
        bounds = [T * i // n for i in range(n + 1)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda i: fn(*args, bounds[i], bounds[i + 1], out.data_ptr(), lse.data_ptr()), range(n)))
    return out, lse
