"""One attention layer, InfLLM v2 sparse vs dense SDPA, prefill and decode, on the CPU.

MiniCPM4-8B head layout: one KV group of 16 query heads, head dim 128 (the 8B has 2 KV heads; one
group is the unit of work). Random normal q/k/v. Sparse = the default HF budget (top-64 incl. sink +
a separate 32-block window = 96 blocks of 64 tokens), exact normaliser unless --lse coarse.

  prefill  dense: F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) over L tokens.
           sparse: compress C1 (+C2) + select_blocks (stage 1 + top-k) + sparse_attention (stage 2).
  decode   one query at position L-1 over L cached keys. dense: the faster of SDPA and the project's
           decode path (dense.grouped_attention); sparse: select_blocks + sparse_attention, with C1
           already cached (the backend extends it incrementally: one new kernel every 16 tokens).

Every ratio is dense / sparse from the same run. Short lengths take the median of --repeats runs;
lengths >= --single-run-from run once (the 128K dense prefill takes tens of minutes on 2 cores).
Random inputs are the worst case for stage 2's per-token gathers: neighbouring queries pick unrelated
blocks, so nothing is shared within a query block except the window.

  .venv/bin/python benchmarks/infllmv2_layer.py                       # 8K .. 128K, dtype as "auto", JSON + PNG
  .venv/bin/python benchmarks/infllmv2_layer.py --lengths 8192,16384 --dtype float32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minicpm4.api import default_dtype  # noqa: E402
from minicpm4.attention.dense import grouped_attention  # noqa: E402
from minicpm4.attention.infllmv2 import cpu_kernel  # noqa: E402
from minicpm4.attention.infllmv2.blocksparse import attended_blocks  # noqa: E402
from minicpm4.attention.infllmv2.compress import compress_keys  # noqa: E402
from minicpm4.attention.infllmv2.selection import select_blocks  # noqa: E402
from minicpm4.attention.infllmv2.settings import settings_from_config  # noqa: E402
from minicpm4.attention.infllmv2.sparse_attention import sparse_attention  # noqa: E402
from minicpm4.config import SparseConfig  # noqa: E402

HQ, HKV, D = 16, 1, 128


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def sparse_prefill(q, k, v, s, impl):
    pos = torch.arange(q.shape[1])
    t = {}
    c, t["compress"] = timed(lambda: (compress_keys(k, s.kernel_size, s.kernel_stride),
                                      compress_keys(k, s.coarse_kernel_size, s.coarse_kernel_stride) if s.lse == "coarse" else None))
    split: dict[str, float] = {}
    idx, sel = timed(lambda: select_blocks(q, c[0], c[1], pos, k.shape[1], s, timings=split))
    t["stage1"], t["topk"] = split["scores"], split["topk"]
    t["select_other"] = sel - split["scores"] - split["topk"]
    _, t["stage2"] = timed(lambda: sparse_attention(q, k, v, pos, idx, s, impl=impl))
    t["total"] = sum(t.values())
    t["attended_keys"] = attended_keys(idx, pos, s)  # not a time: the work actually done by stage 2
    return t


def attended_keys(idx: torch.Tensor, pos: torch.Tensor, s) -> float:
    """Sum over queries (and KV groups) of the keys stage 2 attends: the sparse work, vs L(L+1)/2 dense."""
    total = 0
    for t0 in range(0, pos.shape[0], 8192):
        p = pos[t0:t0 + 8192]
        lists = attended_blocks(p, idx[:, t0:t0 + 8192], s)
        cnt = torch.where(lists >= 0, (p[None, :, None] + 1 - lists * s.block_size).clamp(0, s.block_size), 0)
        total += int(cnt.sum())
    return float(total / idx.shape[0])


def sparse_decode(q1, k, v, c, s, impl):
    L = k.shape[1]
    pos = torch.tensor([L - 1])
    t = {}
    split: dict[str, float] = {}
    idx, sel = timed(lambda: select_blocks(q1, c[0], c[1], pos, L, s, timings=split))
    t["stage1"], t["topk"] = split["scores"], split["topk"]
    t["select_other"] = sel - split["scores"] - split["topk"]
    _, t["stage2"] = timed(lambda: sparse_attention(q1, k, v, pos, idx, s, impl=impl))
    t["total"] = sum(t.values())
    return t


def dense_decode(q1, k, v):
    sdpa = timed(lambda: F.scaled_dot_product_attention(q1[None], k[None], v[None], enable_gqa=True))[1]
    mask = torch.ones(1, 1, k.shape[1], dtype=torch.bool)
    grouped = timed(lambda: grouped_attention(q1[None], k[None], v[None], mask))[1]
    return {"sdpa": sdpa, "grouped_matmul": grouped, "best": min(sdpa, grouped)}


def run_length(L: int, args, s, gen) -> dict:
    dt = getattr(torch, args.dtype)
    q = torch.randn(HQ, L, D, generator=gen).to(dt)
    k = torch.randn(HKV, L, D, generator=gen).to(dt)
    v = torch.randn(HKV, L, D, generator=gen).to(dt)
    reps = args.repeats if L < args.single_run_from else 1
    row: dict = {"length": L, "repeats": reps}
    if "prefill" in args.modes:
        for impl in args.impls:
            if impl == "torch" and L > args.torch_impl_max:
                continue
            runs = []
            for r in range(reps):
                runs.append(sparse_prefill(q, k, v, s, impl))
                log(f"L={L} prefill sparse[{impl}] run {r + 1}/{reps}: "
                    + ", ".join(f"{a} {b:.2f}s" for a, b in runs[-1].items() if a != "attended_keys"))
            row[f"prefill_sparse_{impl}"] = median_of(runs)
        dense = []
        for r in range(reps):
            log(f"L={L} prefill dense SDPA run {r + 1}/{reps} ...")
            dense.append(timed(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True))[1])
            log(f"L={L} prefill dense SDPA: {dense[-1]:.2f}s")
        row["prefill_dense_sdpa"] = statistics.median(dense)
        best = args.impls[0]
        row["prefill_ratio"] = row["prefill_dense_sdpa"] / row[f"prefill_sparse_{best}"]["total"]
        row["prefill_work_ratio"] = (L * (L + 1) / 2) / row[f"prefill_sparse_{best}"]["attended_keys"]
        log(f"L={L} PREFILL dense/sparse = {row['prefill_ratio']:.2f}x (attended-key ratio {row['prefill_work_ratio']:.2f}x)")
    if "decode" in args.modes:
        q1 = q[:, -1:].contiguous()
        c = (compress_keys(k, s.kernel_size, s.kernel_stride),
             compress_keys(k, s.coarse_kernel_size, s.coarse_kernel_stride) if s.lse == "coarse" else None)
        n = args.decode_repeats
        for impl in args.impls:
            sparse_decode(q1, k, v, c, s, impl)  # warm-up (kernel build, allocator)
            row[f"decode_sparse_{impl}"] = median_of([sparse_decode(q1, k, v, c, s, impl) for _ in range(n)])
        dense_decode(q1, k, v)
        runs = [dense_decode(q1, k, v) for _ in range(n)]
        row["decode_dense"] = median_of(runs)
        row["decode_ratio"] = row["decode_dense"]["best"] / row[f"decode_sparse_{args.impls[0]}"]["total"]
        log(f"L={L} DECODE dense {row['decode_dense']['best'] * 1e3:.1f} ms (sdpa {row['decode_dense']['sdpa'] * 1e3:.1f}, "
            f"grouped {row['decode_dense']['grouped_matmul'] * 1e3:.1f}) / sparse "
            f"{row[f'decode_sparse_{args.impls[0]}']['total'] * 1e3:.1f} ms = {row['decode_ratio']:.2f}x")
    return row


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    impl = result["impls"][0]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, mode in zip(axes[:2], ("prefill", "decode")):
        rs = [r for r in rows if f"{mode}_ratio" in r]
        if not rs:
            continue
        Ls = [r["length"] for r in rs]
        dense = [r["prefill_dense_sdpa"] if mode == "prefill" else r["decode_dense"]["best"] for r in rs]
        sparse = [r[f"{mode}_sparse_{impl}"]["total"] for r in rs]
        ax.loglog(Ls, dense, "o-", label="dense SDPA" if mode == "prefill" else "dense (best of SDPA / grouped matmul)")
        ax.loglog(Ls, sparse, "s-", label=f"InfLLM v2 sparse ({impl})")
        for L, d, sp in zip(Ls, dense, sparse):
            ax.annotate(f"{d / sp:.1f}x", (L, sp), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("seconds per layer (one KV group)")
        ax.set_title(f"{mode}: dense / sparse")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    rs = [r for r in rows if f"prefill_sparse_{impl}" in r]
    parts = ["compress", "stage1", "topk", "select_other", "stage2"]  # (attended_keys is work, not time)
    bottom = [0.0] * len(rs)
    for part in parts:
        vals = [r[f"prefill_sparse_{impl}"][part] / r[f"prefill_sparse_{impl}"]["total"] for r in rs]
        ax.bar([str(r["length"] // 1024) + "K" for r in rs], vals, bottom=bottom, label=part)
        bottom = [b + x for b, x in zip(bottom, vals)]
    ax.set_title("sparse prefill: where the time goes")
    ax.set_ylabel("fraction of sparse time")
    ax.legend(fontsize=8)
    fig.suptitle(f"InfLLM v2 layer, 16 q heads / 1 KV head, d=128, {result['dtype']}, {result['threads']} threads, {result['machine']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    p.add_argument("--modes", default="prefill,decode")
    # default: what dtype="auto" runs here (bf16 where the CPU computes it natively, fp32 where it is emulated)
    p.add_argument("--dtype", default=str(default_dtype("cpu")).removeprefix("torch."), choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3, help="median of this many runs below --single-run-from")
    p.add_argument("--single-run-from", type=int, default=32768)
    p.add_argument("--decode-repeats", type=int, default=7)
    p.add_argument("--impls", default="auto", help="stage-2 implementations, first = the one the ratio uses (auto,kernel,torch)")
    p.add_argument("--torch-impl-max", type=int, default=16384, help="longest length to also time the torch stage 2")
    p.add_argument("--variant", default="hf")
    p.add_argument("--lse", default="exact", choices=["exact", "coarse"])
    p.add_argument("--out", default="benchmarks/results/infllmv2_layer.json")
    args = p.parse_args()
    args.modes = args.modes.split(",")
    args.impls = args.impls.split(",")
    torch.set_num_threads(args.threads)
    s = settings_from_config(SparseConfig(), args.variant, args.lse)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {
        "command": "python " + " ".join(sys.argv), "machine": f"{cpu}, {os.cpu_count()} cores", "threads": args.threads,
        "torch": torch.__version__, "dtype": args.dtype, "settings": repr(s), "impls": args.impls,
        "cpu_kernel_available": cpu_kernel.available(), "loadavg_start": os.getloadavg(), "rows": [],
    }
    log(f"settings {s}; threads {args.threads}; CPU kernel {'built' if result['cpu_kernel_available'] else 'unavailable'}")
    gen = torch.Generator().manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for L in (int(x) for x in args.lengths.split(",")):
        result["rows"].append(run_length(L, args, s, gen))
        result["loadavg_end"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=1))  # after every length: a long run leaves partial results
    png = out.with_suffix(".png")
    if plot(result, png):
        log(f"wrote {out} and {png}")
    else:
        log(f"wrote {out} (no matplotlib: no plot)")
    print("\n| L | prefill dense s | prefill sparse s | ratio | stage1 | topk | stage2 | decode dense ms | decode sparse ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    impl = args.impls[0]
    for r in result["rows"]:
        ps, ds = r.get(f"prefill_sparse_{impl}"), r.get(f"decode_sparse_{impl}")
        pre = (f"{r['prefill_dense_sdpa']:.1f} | {ps['total']:.1f} | {r['prefill_ratio']:.2f}x | {ps['stage1']:.1f} | "
               f"{ps['topk']:.1f} | {ps['stage2']:.1f}") if ps else "- | - | - | - | - | -"
        dec = (f"{r['decode_dense']['best'] * 1e3:.1f} | {ds['total'] * 1e3:.1f} | {r['decode_ratio']:.2f}x") if ds else "- | - | -"
        print(f"| {r['length']} | {pre} | {dec} |")


if __name__ == "__main__":
    main()
