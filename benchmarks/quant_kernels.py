"""Packed INT4 / ternary GEMV speed (quant/kernels.py) on the MiniCPM4-0.5B shapes, and whole-model decode
through FastDecoder: bf16 vs INT4 vs ternary weights, LM head float or packed (issue 9, parts 2 and 4).

    .venv/bin/python benchmarks/quant_kernels.py                       # GEMVs at M = 1, 16; M sweep; decode
    .venv/bin/python benchmarks/quant_kernels.py --skip-decode --repeats 5

GEMVs (bf16 activations, --threads threads, y = x W^T for each layer shape and the 73,448-row head):
  bf16 kernel   FastDecoder's dense C++ GEMV (engine/fast_kernel.py ff_linear) on the bf16 weight
  int4 ours     the packed kernel (ff_qlinear: activation quantization + vpdpbusd), RTN group 128
  int4pack      PyTorch's _weight_int4pack_mm_for_cpu (bf16 activations), the same codes, group 128
  ternary ours  the packed kernel, group 64
Each system cycles through enough copies of the weight to read >= 96 MB per round (3x the 32 MB L3), so the
GB/s are DRAM reads as in a decode step, not L3 hits; GB/s = the format's bytes (codes + scales) / time.
The M sweep (gate|up shape, M = 1 .. 256) sets kernels.MAX_ROWS. Decode: a random 0.5B-shaped model
(build_model(minicpm4-0.5b, seed 0), bf16, tied head), quantized with quantize_ (RTN INT4 group 128 symmetric;
ternary group 64), greedy single-stream decode through LLMEngine (paged KV, FastDecoder's kernel path): median
ms per decode step after a --prompt-len prompt, --new-tokens steps; systems interleaved per repeat; medians of
the repeats (the box is shared). The kernel's own counters give the GEMV share per token.
Writes benchmarks/results/quant_kernels.json.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, median, write_results  # noqa: E402

from minicpm4.config import preset  # noqa: E402
from minicpm4.engine import EngineConfig, LLMEngine, SamplingParams, fast_kernel  # noqa: E402
from minicpm4.model import build_model  # noqa: E402
from minicpm4.quant import Int4WeightOnlyConfig, TernaryQATConfig, int4, kernels, quantize_, ternary  # noqa: E402

SHAPES = {"qkv": (1280, 1024), "o_proj": (1024, 1024), "gate_up": (8192, 1024), "down": (1024, 4096),
          "lm_head": (73448, 1024)}
ROUND_BYTES = 96e6
VARIANTS = {
    "bf16": None,
    "int4 (head bf16)": Int4WeightOnlyConfig(group_size=128),
    "int4 (head int4)": Int4WeightOnlyConfig(group_size=128, lm_head=True),
    "ternary (head bf16)": TernaryQATConfig(step="convert", group_size=64),
    "ternary (head ternary)": TernaryQATConfig(step="convert", group_size=64, lm_head=True),
}


def _time(fn, repeats: int, inner: int) -> float:
    """Median seconds of one call (each sample averages `inner` calls)."""
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner)
    return median(samples)


def _cycler(fns: list):
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return call


def _int4pack(codes, scales, zeros):
    """PyTorch's CPU int4 layout (as Int4Linear builds it); rows padded to its multiple of 16 (the head's 73,448)."""
    pad = -codes.shape[0] % 16
    if pad:
        codes, scales, zeros = (torch.cat([t, t[:pad]]) for t in (codes, scales, zeros))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    sz = torch.stack([scales.t(), (scales * (8 - zeros.float())).t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def gemv_systems(N: int, K: int, M: int, threads: int, handle) -> dict:
    """name -> (callable cycling over weight copies, bytes per call)."""
    lib = fast_kernel.library()
    g = torch.Generator().manual_seed(N + K)
    W = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(M, K, generator=g).bfloat16()
    y16 = torch.empty(M, N, dtype=torch.bfloat16)
    out = {}

    def copies(nbytes):
        return max(1, min(256, math.ceil(ROUND_BYTES / nbytes)))

    wb = W.bfloat16()
    ws = [wb.clone() for _ in range(copies(wb.nbytes))]
    out["bf16 kernel"] = (_cycler([lambda w=w: lib.ff_linear(handle.handle, x.data_ptr(), w.data_ptr(), y16.data_ptr(),
                                                             M, N, K, 1) for w in ws]), wb.nbytes)
    codes, scales, zeros = int4.rtn_quantize(W, 128)
    p = kernels.pack_int4(codes, scales, zeros, 128)
    ps = [kernels.pack_int4(codes, scales, zeros, 128) for _ in range(copies(p.nbytes()))]
    th = int(threads > 1)
    out["int4 ours"] = (_cycler([lambda d=ctypes.byref(q.desc()): lib.ff_qlinear(d, x.data_ptr(), 1, M, y16.data_ptr(),
                                                                                  1, th, kernels.CHUNK_KB)
                                 for q in ps]), p.nbytes())
    packed, sz = _int4pack(codes, scales, zeros)
    nb = packed.nbytes + sz.nbytes
    pk = [(packed.clone(), sz.clone()) for _ in range(copies(nb))]
    out["int4pack"] = (_cycler([lambda a=a, b=b: torch.ops.aten._weight_int4pack_mm_for_cpu(x, a, 128, b)
                                for a, b in pk]), nb)
    tc, tsc = ternary.ternarize(W, 64)
    t = kernels.pack_ternary(tc, tsc, 64)
    tsl = [kernels.pack_ternary(tc, tsc, 64) for _ in range(copies(t.nbytes()))]
    out["ternary ours"] = (_cycler([lambda d=ctypes.byref(q.desc()): lib.ff_qlinear(d, x.data_ptr(), 1, M, y16.data_ptr(),
                                                                                     1, th, kernels.CHUNK_KB)
                                    for q in tsl]), t.nbytes())
    out["_keep"] = (ws, ps, pk, tsl)
    return out


def bench_gemvs(Ms: list[int], threads: int, repeats: int, handle) -> list[dict]:
    rows = []
    for M in Ms:
        for name, (N, K) in SHAPES.items():
            systems = gemv_systems(N, K, M, threads, handle)
            keep = systems.pop("_keep")
            inner = max(1, int(2e8 // (N * K * (1 + M // 4))))
            times = {k: [] for k in systems}
            for _ in range(repeats):  # interleaved
                for k, (fn, _) in systems.items():
                    times[k].append(_time(fn, 3, inner))
            for k, (fn, nbytes) in systems.items():
                s = median(times[k])
                rows.append({"M": M, "shape": name, "N": N, "K": K, "system": k, "ms": s * 1e3,
                             "GB_s": nbytes / s / 1e9, "weight_MB": nbytes / 1e6})
            del keep, systems
            gc.collect()
    return rows


def bench_m_sweep(Ms: list[int], threads: int, repeats: int) -> list[dict]:
    N, K = SHAPES["gate_up"]
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g) * 0.02
    codes, scales, zeros = int4.rtn_quantize(W, 128)
    p = kernels.pack_int4(codes, scales, zeros, 128)
    packed, sz = _int4pack(codes, scales, zeros)
    wb = W.bfloat16()
    rows = []
    for M in Ms:
        x = torch.randn(M, K, generator=g).bfloat16()
        fns = {"int4 ours": lambda: kernels.linear(x, p, threads=threads),
               "int4pack": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz),
               "bf16 F.linear": lambda: F.linear(x, wb)}
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                times[k].append(_time(f, 3, max(1, 32 // M)))
        rows += [{"M": M, "system": k, "ms": median(v) * 1e3} for k, v in times.items()]
    return rows


def bench_decode(prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Single-stream greedy decode through LLMEngine (FastDecoder kernel path, paged attention): ms per decode step
    (the prefill step excluded), and the kernel's own per-class counters for one pass (ms per token)."""
    base = build_model(preset("minicpm4-0.5b"), seed=0, dtype=torch.bfloat16).eval()
    prompt = torch.randint(3, 70000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engines = {}
    for name, config in VARIANTS.items():
        model = base if config is None else copy.deepcopy(base)
        if config is not None:
            quantize_(model, config)
        cfg = EngineConfig(max_model_len=prompt_len + new_tokens + 8, kv_cache_tokens=4 * (prompt_len + new_tokens))
        engines[name] = LLMEngine(model, config=cfg)
        assert engines[name].runner.fast.kernel is not None, f"{name}: FastDecoder did not take the kernel path"
        gc.collect()

    def run(engine, profile=False) -> list[float]:
        kernel = engine.runner.fast.kernel
        engine.add_request(prompt, params, request_id="r")
        engine.step()  # the prefill (and first token)
        if profile:
            kernel.lib.ff_profile(kernel.handle, 1, None)
        steps = []
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        if profile:
            out = (ctypes.c_int64 * 6)()
            kernel.lib.ff_profile(kernel.handle, 0, out)
            return [v / len(steps) / 1e6 for v in out]
        return steps

    per = {k: [] for k in engines}
    for name, engine in engines.items():
        run(engine)  # warm-up
    for _ in range(repeats):  # interleaved
        for name, engine in engines.items():
            per[name].append(median(run(engine)))
    result = {}
    for name, engine in engines.items():
        prof = run(engine, profile=True)
        ms = median(per[name]) * 1e3
        result[name] = {"ms_per_token": ms, "tok_s": 1e3 / ms, "ms_min": min(per[name]) * 1e3,
                        "kernel_ms_per_token": dict(zip(["elementwise", "qkv", "o_proj", "gate_up", "down", "lm_head"],
                                                        prof))}
    return result


def table(gemvs: list[dict], sweep: list[dict], decode: dict | None) -> str:
    lines = ["GEMV (bf16 activations): ms | GB/s"]
    systems = list(dict.fromkeys(r["system"] for r in gemvs))
    lines.append(f"{'M':>3} {'shape':<8} " + " ".join(f"{s:>20}" for s in systems))
    for M in dict.fromkeys(r["M"] for r in gemvs):
        for shape in SHAPES:
            cells = {r["system"]: r for r in gemvs if r["M"] == M and r["shape"] == shape}
            lines.append(f"{M:>3} {shape:<8} " + " ".join(
                f"{fmt(cells[s]['ms'], 3):>11} {fmt(cells[s]['GB_s']):>7} " for s in systems))
    if sweep:
        lines.append("\ngate_up 1024->8192, M sweep (ms): " + ", ".join(dict.fromkeys(r["system"] for r in sweep)))
        for M in dict.fromkeys(r["M"] for r in sweep):
            lines.append(f"  M={M:<4} " + "  ".join(f"{r['system']} {fmt(r['ms'], 3)}" for r in sweep if r["M"] == M))
    if decode:
        lines.append("\nwhole-model decode (0.5B shapes, LLMEngine + FastDecoder kernel path): ms/token  tok/s  "
                     "| kernel GEMV ms/token: qkv o gate_up down head")
        for k, v in decode.items():
            g = v["kernel_ms_per_token"]
            lines.append(f"  {k:<24} {fmt(v['ms_per_token'], 2):>8} {fmt(v['tok_s']):>8}  | " + " ".join(
                fmt(g[c], 2) for c in ("qkv", "o_proj", "gate_up", "down", "lm_head")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16], help="GEMV row counts M")
    ap.add_argument("--sweep", type=int, nargs="*", default=[1, 4, 16, 64, 128, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--out", default=str(RESULTS_DIR / "quant_kernels.json"))
    args = ap.parse_args(argv)
    assert kernels.available(), "the packed kernel did not build on this machine (needs AVX512-VNNI)"
    torch.set_num_threads(args.threads)
    fast_kernel.start_pool(args.threads)
    handle = fast_kernel.KernelModel(hidden=1024, intermediate=4096, heads=16, kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                                     max_tokens=max(args.tokens), eps=1e-5, residual_scale=1.0,
                                     cos=torch.zeros(1, 64), sin=torch.zeros(1, 64), layers=[], threads=args.threads)
    gemvs = bench_gemvs(args.tokens, args.threads, args.repeats, handle)
    sweep = bench_m_sweep(args.sweep, args.threads, args.repeats) if args.sweep else []
    decode = None if args.skip_decode else bench_decode(args.prompt_len, args.new_tokens, args.repeats)
    result = {"command": command_line(argv), "machine": machine_info(args.threads), "gemv": gemvs,
              "m_sweep": sweep, "decode": decode, "table": table(gemvs, sweep, decode)}
    print(result["table"])
    print("wrote", write_results(args.out, result))


if __name__ == "__main__":
    main()
