"""Paged attention on the CPU: the C++ kernel vs the PyTorch grouped-matmul path vs the reference.

MiniCPM4-0.5B heads (Hq 16, Hkv 2, D 64), one layer, random normal q/k/v, the sequences' blocks a random
permutation of the pool (as after a while of continuous batching). Cases:
  decode  S sequences x 1 query at the last position of a context of L tokens (S = 1, 8, 32; L = 512, 2048)
  prefill one chunk of 512 queries at positions 512 .. 1023 (context 1024)
Systems: kernel = paged_attention(impl="kernel") (paged_kernel.py), torch = paged_attention_torch (batched
decode gathers + dense.grouped_attention / SDPA), reference = paged_attention_reference (per sequence,
fp32). Every repeat times each system once (interleaved, so load spikes on a shared machine hit all);
the table shows medians and the ratios torch / kernel and reference / kernel from the same run.

  .venv/bin/python benchmarks/paged_attention.py                     # fp32 + bf16, 2 threads, JSON
  .venv/bin/python benchmarks/paged_attention.py --threads 1,2        # both thread counts in one JSON
  .venv/bin/python benchmarks/paged_attention.py --dtypes bfloat16 --threads 1 --block-size 64

The JSON keeps the minimum next to each median: on a shared machine (load average in the JSON) the
minimum is the better estimate of what the code costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, fmt, machine_info, median, write_results  # noqa: E402

from minicpm4.attention import paged_kernel  # noqa: E402
from minicpm4.attention.paged_attention import (paged_attention, paged_attention_reference,  # noqa: E402
                                                paged_attention_torch)

HQ, HKV, D = 16, 2, 64  # MiniCPM4-0.5B
CASES = [("decode", S, L) for L in (512, 2048) for S in (1, 8, 32)] + [("prefill", 512, 1024)]


def make_case(kind: str, n: int, L: int, B: int, dtype: torch.dtype, gen: torch.Generator):
    """-> (q, k_cache, v_cache, block_tables, query_start_loc, context_lens, positions)."""
    S, T = (n, 1) if kind == "decode" else (1, n)
    nb = -(-L // B)
    pool = S * nb + 8
    tables = torch.randperm(pool, generator=gen)[:S * nb].view(S, nb).int()
    k_cache = torch.randn(pool, HKV, B, D, generator=gen).to(dtype)
    v_cache = torch.randn(pool, HKV, B, D, generator=gen).to(dtype)
    q = torch.randn(S * T, HQ, D, generator=gen).to(dtype)
    qsl = torch.arange(S + 1, dtype=torch.int32) * T
    ctx = torch.full((S,), L, dtype=torch.int32)
    positions = torch.arange(L - T, L).repeat(S)
    return q, k_cache, v_cache, tables, qsl, ctx, positions


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", default="2", help="comma-separated thread counts (torch and kernel alike)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="median of this many runs per system")
    p.add_argument("--reference-repeats", type=int, default=3, help="the slow reference runs fewer times")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "paged_attention.json"))
    args = p.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    systems = {
        "kernel": lambda a, t: paged_attention(*a, impl="kernel", threads=t),
        "torch": lambda a, t: paged_attention_torch(*a),
        "reference": lambda a, t: paged_attention_reference(*a),
    }
    if not paged_kernel.available():
        print("the paged kernel is not built here (no C++ compiler?): timing torch and reference only")
        del systems["kernel"]
    result = {"command": command_line(), "machine": machine_info(thread_counts[0]), "threads": thread_counts,
              "block_size": args.block_size, "heads": {"Hq": HQ, "Hkv": HKV, "D": D}, "repeats": args.repeats,
              "reference_repeats": args.reference_repeats, "kernel_available": paged_kernel.available(),
              "loadavg_start": os.getloadavg(), "rows": []}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        gen = torch.Generator().manual_seed(0)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for kind, n, L in CASES:
                a = make_case(kind, n, L, args.block_size, dtype, gen)
                ref = paged_attention_reference(*a)
                row = {"threads": threads, "dtype": dtype_name, "kind": kind, "seqs": n if kind == "decode" else 1,
                       "queries": n, "context": L, "ms": {}, "min_ms": {}, "max_abs_err": {}}
                times: dict[str, list[float]] = {name: [] for name in systems}
                for name, fn in systems.items():  # warm-up + accuracy
                    row["max_abs_err"][name] = (fn(a, threads).float() - ref.float()).abs().max().item()
                for r in range(args.repeats):
                    for name, fn in systems.items():
                        if name != "reference" or r < args.reference_repeats:
                            times[name].append(timed(lambda: fn(a, threads)))
                for name in systems:
                    row["ms"][name] = median(times[name]) * 1e3
                    row["min_ms"][name] = min(times[name]) * 1e3
                if "kernel" in systems:
                    row["torch_over_kernel"] = row["ms"]["torch"] / row["ms"]["kernel"]
                    row["reference_over_kernel"] = row["ms"]["reference"] / row["ms"]["kernel"]
                result["rows"].append(row)
                print(f"{threads}t {dtype_name:8s} {kind:7s} {n:4d} x ctx {L:5d}: " +
                      "  ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items()), flush=True)
    result["loadavg_end"] = os.getloadavg()
    out = write_results(args.out, result)

    flags = result["machine"]["flags"]
    print(f"\n{result['machine']['cpu']}, avx512f {flags.get('avx512f')}, avx512_bf16 {flags.get('avx512_bf16')}, "
          f"block size {args.block_size}, median of {args.repeats} (reference {args.reference_repeats}); "
          f"load average {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}")
    print("| threads | dtype | case | kernel ms | torch ms | reference ms | torch / kernel | reference / kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        decode = r["kind"] == "decode"
        case = f"decode {r['seqs']} x {r['context']}" if decode else f"prefill {r['queries']} @ {r['context']}"
        ms = r["ms"]
        print(f"| {r['threads']} | {r['dtype']} | {case} | {fmt(ms.get('kernel'), 3)} | {fmt(ms['torch'], 3)} | "
              f"{fmt(ms['reference'], 3)} | {fmt(r.get('torch_over_kernel'))}x | "
              f"{fmt(r.get('reference_over_kernel'))}x |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
