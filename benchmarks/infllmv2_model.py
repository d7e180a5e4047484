"""Whole-model prefill and decode with InfLLM v2 sparse attention vs dense, same weights, same run.

A MiniCPM4-0.5B-shaped model (minicpm4_05b(): hidden 1024, 16 q / 2 kv heads (G = 8), head_dim 64,
vocab 73448) with random weights, optionally fewer layers (--layers) to keep CPU runs tractable:
each layer costs what it costs in the 24-layer model, and fewer layers only give the fixed
embedding / LM-head work a larger share, so a few-layer ratio slightly understates the 24-layer one.
Sparse settings: the README defaults (topk 64, window 2048, block 64, dense_len 8192) unless
--sparse-variant / --dense-len say otherwise.

    .venv/bin/python benchmarks/infllmv2_model.py --context 32768 --layers 2 --chunk 2048 --threads 1
    .venv/bin/python benchmarks/infllmv2_model.py --context 32768 --synthetic-cache --threads 1   # decode only, 24 layers

Prefill is chunked (--chunk tokens per call, as an engine would do it) through the readable
generate.prefill(); decode steps go through generate.decode_one_token(). With --synthetic-cache the
prefill is skipped and the KV cache is filled with random keys/values (decode speed does not depend
on their values); the sparse run's first decode step then includes the one-off compression of the
whole cache (reported separately as bootstrap). Timings are medians over --repeats runs (prefill)
and over all decode steps after the first (decode); dense and sparse runs alternate so machine noise
hits both. Writes JSON to benchmarks/results/infllmv2_model.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from minicpm4.attention import make_backend
from minicpm4.attention.dense import DenseAttention
from minicpm4.config import minicpm4_05b
from minicpm4.generate import decode_one_token, prefill
from minicpm4.kv_cache import StaticKVCache
from minicpm4.model import build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fill_synthetic(cache: StaticKVCache, length: int, generator: torch.Generator) -> None:
    for k, v in zip(cache.k, cache.v):
        k[:, :, :length] = torch.randn(k[:, :, :length].shape, generator=generator).to(k.dtype)
        v[:, :, :length] = torch.randn(v[:, :, :length].shape, generator=generator).to(v.dtype)


def run_once(model, backend, ids: torch.Tensor, args: argparse.Namespace, seed: int) -> dict:
    model.set_attention_backend(backend)
    n = ids.shape[1]
    cache = StaticKVCache.for_model(model, 1, n + args.decode_steps + 1)
    out: dict = {}
    with torch.inference_mode():
        if args.synthetic_cache:
            fill_synthetic(cache, n, torch.Generator().manual_seed(seed))
            token = ids[:, -1]
        else:
            start = time.perf_counter()
            logits = prefill(model, ids, torch.tensor([n]), cache, chunk_size=args.chunk)
            out["prefill_s"] = time.perf_counter() - start
            token = logits.argmax(-1)
        steps = []
        for i in range(args.decode_steps):
            start = time.perf_counter()
            logits = decode_one_token(model, token, torch.tensor([n + i]), cache)
            steps.append(time.perf_counter() - start)
            token = logits.argmax(-1)
    out["decode_first_s"] = steps[0]
    out["decode_steps_s"] = steps[1:]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=32768, help="prompt length in tokens")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (0.5B: 24)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk size")
    p.add_argument("--decode-steps", type=int, default=9, help="decode steps per run (the first is reported apart)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--synthetic-cache", action="store_true", help="skip prefill; random K/V (decode only)")
    p.add_argument("--sparse-variant", default=None)
    p.add_argument("--dense-len", type=int, default=None, help="override sparse_config.dense_len")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice). On a shared machine 1 avoids OpenMP threads "
                   "spinning against other processes, which inflates small ops 10-100x")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "infllmv2_model.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = minicpm4_05b(num_hidden_layers=args.layers, max_position_embeddings=max(32768, args.context + args.decode_steps + 1))
    overrides = {} if args.dense_len is None else {"dense_len": args.dense_len}
    sparse_cfg = cfg.with_sparse(True, variant=args.sparse_variant, **overrides)
    model = build_model(cfg, dtype=DTYPES[args.dtype], seed=0).eval()
    backends = {"dense": DenseAttention(), "sparse": make_backend(sparse_cfg)}
    ids = torch.randint(4, cfg.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(1))

    runs: dict[str, list[dict]] = {"dense": [], "sparse": []}
    for r in range(args.repeats):
        for name, backend in backends.items():
            res = run_once(model, backend, ids, args, seed=r)
            runs[name].append(res)
            msg = f"repeat {r} {name:6s}"
            if "prefill_s" in res:
                msg += f" prefill {res['prefill_s']:.2f} s"
            msg += f" decode {1000 * statistics.median(res['decode_steps_s']):.1f} ms/token (first {1000 * res['decode_first_s']:.1f} ms)"
            print(msg, flush=True)

    summary: dict = {}
    for name, rs in runs.items():
        s = {"decode_ms_per_token": 1000 * statistics.median([t for r in rs for t in r["decode_steps_s"]]),
             "decode_first_step_ms": 1000 * statistics.median([r["decode_first_s"] for r in rs])}
        if not args.synthetic_cache:
            s["prefill_s"] = statistics.median([r["prefill_s"] for r in rs])
            s["prefill_tokens_per_s"] = args.context / s["prefill_s"]
        summary[name] = s
    summary["decode_speedup"] = summary["dense"]["decode_ms_per_token"] / summary["sparse"]["decode_ms_per_token"]
    if not args.synthetic_cache:
        summary["prefill_speedup"] = summary["dense"]["prefill_s"] / summary["sparse"]["prefill_s"]

    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "model": f"minicpm4_05b shapes, {args.layers} layers, random weights, {args.dtype}",
        "sparse_config": sparse_cfg.sparse_config.to_dict(),
        "settings": repr(backends["sparse"].settings) if hasattr(backends["sparse"], "settings") else None,
        "args": vars(args),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "summary": summary,
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
