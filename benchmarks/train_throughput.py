"""Training throughput (tokens/s, MFU) of the real training loop on this machine.

A ~10M-parameter MiniCPM4-shaped model (stages.model_10m: hidden 256, 8 layers, 4 q / 1 kv heads,
vocab 8192, tied) at seq 512 on random packed documents, through trainer.train() (AdamW with muP groups,
WSD, clipping, document mask), in fp32 and bf16 autocast, with and without the MTP head and torch.compile.
tokens/s excludes the first step (warm-up / compilation) and checkpointing; MFU is against the matmul
peak measured in the same run for the same dtype (metrics.measure_peak_flops, 2048^3 matmuls).

    .venv/bin/python benchmarks/train_throughput.py                 # writes benchmarks/results/train_throughput.json
    .venv/bin/python benchmarks/train_throughput.py --threads 1 --steps 4 --cases fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from minicpm4.train.data import SyntheticTokens
from minicpm4.train.metrics import flops_per_token, measure_peak_flops
from minicpm4.train.stages import model_10m
from minicpm4.train.trainer import TrainConfig, train

CASES = {
    "fp32": dict(dtype="float32", mtp_weight=0.0),
    "bf16": dict(dtype="bfloat16", mtp_weight=0.0),
    "fp32+mtp": dict(dtype="float32", mtp_weight=0.3),
    "bf16+mtp": dict(dtype="bfloat16", mtp_weight=0.3),
    "fp32+compile": dict(dtype="float32", mtp_weight=0.0, compile=True),
    "bf16+compile": dict(dtype="bfloat16", mtp_weight=0.0, compile=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per case (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = model_10m(vocab_size=8192)
    data = SyntheticTokens(config.vocab_size, args.seq_len, num_tokens=args.batch_size * args.seq_len * (args.steps + 1) + 1)
    peaks = {"float32": measure_peak_flops(torch.float32), "bfloat16": measure_peak_flops(torch.bfloat16)}
    params = sum(p.numel() for p in __import__("minicpm4.model", fromlist=["build_model"]).build_model(config).parameters())
    print(f"model: {params / 1e6:.2f}M parameters; threads {torch.get_num_threads()}; "
          f"matmul peak fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(out_dir=tmp, steps=args.steps, micro_batch_size=args.batch_size, seq_len=args.seq_len,
                              warmup_steps=1, progress=False, parallel="none", **CASES[name])
            cfg.peak_flops = peaks[cfg.dtype]  # the cases name their dtype explicitly
            start = time.perf_counter()
            result = train(config, cfg, data, resume=False)
            wall = time.perf_counter() - start
        row = {"case": name, "tokens_per_s": round(result.tokens_per_s, 1), "mfu": round(result.mfu, 4),
               "achieved_gflops": round(result.tokens_per_s * flops_per_token(config, args.seq_len, cfg.mtp_weight > 0) / 1e9, 1),
               "first_loss": round(result.losses[0], 4), "wall_s": round(wall, 1)}
        rows.append(row)
        print(f"{name:14s} {row['tokens_per_s']:9,.0f} tokens/s  MFU {100 * row['mfu']:5.1f}%  "
              f"({row['achieved_gflops']:.0f} GFLOP/s; {wall:.0f} s wall incl. warm-up and checkpoint)")
    out = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": os.getloadavg()[0],
           "model": {"parameters": params, "hidden": 256, "layers": 8, "heads": "4q/1kv", "vocab": 8192},
           "batch": {"micro_batch_size": args.batch_size, "seq_len": args.seq_len},
           "peak_flops": peaks, "flops_per_token": flops_per_token(config, args.seq_len), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
