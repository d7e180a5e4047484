"""Build-on-first-use for the small C++ CPU kernels (infllmv2/cpu_kernel.py, paged_kernel.py).

Each kernel is one C++ source string with `extern "C"` entry points and no PyTorch headers, so it
builds with the system compiler in seconds. The shared object lands in ~/.cache/minicpm4/ (or
$XDG_CACHE_HOME/minicpm4), named by a hash of the source, the flags, the compiler and the CPU's
feature flags: a different CPU (-march=native) or an edited source builds a new file, an unchanged
one loads the cached file. Every failure (no compiler, compile error, unsupported machine, the
switch MINICPM4_NO_CPU_KERNEL set) returns None, and the caller falls back to its PyTorch path.
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
from typing import Callable

# -march=native: the host's ISA (AVX-512 where it exists, AVX2 elsewhere); the sources pick their
# widest tiles with #ifdef __AVX512F__ and stay correct without it. No -ffast-math: the kernels
# rely on IEEE infinities for masking.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC"]
DISABLE_ENV = "MINICPM4_NO_CPU_KERNEL"  # set (to anything) to force every PyTorch fallback


def cpu_signature() -> str:
    """The CPU's feature-flag line (part of the cache key: a -march=native build only runs where it was built)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def find_compiler() -> str | None:
    """$CXX (default g++), else c++, else clang++; None when there is none or the machine is not x86-64/arm64."""
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return None
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minicpm4"


def build_library(name: str, source: str, flags: list[str] | None = None) -> ctypes.CDLL | None:
    """Compile `source` (once per source/flags/compiler/CPU) into cache_dir()/{name}_{hash}.so and load it.

    None when disabled, when there is no compiler, or when the build or the load fails. The caller sets
    the entry points' argtypes. Concurrent builders are safe: each compiles in its own temp folder and
    renames atomically, so nobody loads a half-written file.
    """
    if os.environ.get(DISABLE_ENV):
        return None
    cxx = find_compiler()
    if cxx is None:
        return None
    flags = FLAGS if flags is None else flags
    key = hashlib.sha256("\n".join([source, " ".join(flags), cxx, cpu_signature()]).encode()).hexdigest()[:16]
    cache = cache_dir()
    so = cache / f"{name}_{key}.so"
    if not so.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, tmp_so = Path(tmp) / "k.cpp", Path(tmp) / "k.so"
                src.write_text(source)
                subprocess.run([cxx, *flags, str(src), "-o", str(tmp_so)], check=True, capture_output=True, timeout=300)
                os.replace(tmp_so, so)
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        return ctypes.CDLL(str(so))
    except OSError:
        return None


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def run_parallel(fn: Callable[[int], None], n: int, wait: bool = True) -> None:
    """fn(0) .. fn(n - 1) concurrently: fn(0) in the calling thread, the rest on a persistent pool (a kernel
    call releases the GIL; a pool per call would cost ~100 us of thread start-up per layer and step).

    wait=False returns as soon as fn(0) does, without waiting for the pool threads: for kernels whose every
    caller returns only once all the work is done (work taken from a shared counter), so that a pool thread the
    OS schedules late (a loaded machine: milliseconds) costs nothing; it finds no work left and returns.
    """
    global _pool, _pool_size
    if n <= 1:
        fn(0)
        return
    with _pool_lock:
        if _pool is None or _pool_size < n - 1:
            _pool_size = max(n - 1, os.cpu_count() or 1)
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="minicpm4-kernel")
        pool = _pool
    futures = [pool.submit(fn, i) for i in range(1, n)]
    fn(0)
    if wait:
        for f in futures:
            f.result()
