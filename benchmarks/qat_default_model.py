"""BitCPM4 ternary QAT on the bundled default model: validation loss of the bf16 original vs post-training ternary
vs QAT ternary, plus a float control trained with the identical stage (same data, steps, LR schedule; no quantizer).

    .venv/bin/python benchmarks/qat_default_model.py          # needs `make corpus`-style shards in build/data/shards

Data: the corpus the model was pretrained on (`minicpm4 data build-corpus` + `minicpm4 data shards` with the
model's own tokenizer). Budget: 2x the decay-phase tokens of the model's pretraining (MINICPM4.md §5), from its
recipe (Makefile `default-model`: decay over the last 60 steps of 16 x 256 tokens = 245,760 tokens), so 491,520
QAT tokens = 120 steps of 16 x 256. The model folder is an HF folder, not a run here, so --tokens is passed.
Every loss is `validation_loss` (tests/test_default_model.py's measure) over the shipped val_tokens.npy (65,536
tokens of the corpus validation split, windows of 256); the original is also measured in fp32 so that every
ternary row differs from a float row only by its weights. The float control matters: the shipped model ends with
SFT, so any further training on corpus text lowers its corpus loss; QAT vs the control is the ternary cost.
Training runs resume (rerun the script after a kill). Writes benchmarks/results/qat_default_model.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, machine_info, publish  # noqa: E402

from minicpm4.checkpoint import load_model  # noqa: E402
from minicpm4.quant import TernaryQATConfig, quantize_  # noqa: E402
from minicpm4.train.default_model import VAL_TOKENS_FILE, validation_loss  # noqa: E402
from minicpm4.train.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "minicpm4" / "assets" / "default-model"
SOURCE_DECAY_TOKENS = 60 * 16 * 256  # the default model's pretrain decay (Makefile, model card)


def stage_command(args: argparse.Namespace, group_size: int, out: Path) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "minicpm4"), "train", "qat", "--init", str(args.model),
            "--data", str(args.data), "--out", str(out), "--group-size", str(group_size), "--tokens", str(args.tokens),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--save-every", "20",
            "--no-progress"]


def run_stage(cmd: list[str], out: Path, threads: int) -> None:
    """Run (or resume, or skip when finished) one training run."""
    if (out / "final" / "config.json").is_file():
        return
    resume = ["--resume"] if (out / "checkpoints" / "latest").is_file() else []
    print("$", shlex.join(cmd + resume), file=sys.stderr)
    subprocess.run(cmd + resume, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=ROOT / "build" / "data" / "shards")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "qat-default", help="run folders (qat/, control/)")
    p.add_argument("--tokens", type=int, default=2 * SOURCE_DECAY_TOKENS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64, help="hidden 192 is not a multiple of 128")
    p.add_argument("--no-control", action="store_true", help="skip the float control run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS_DIR / "qat_default_model.json"))
    args = p.parse_args(argv)
    if not (args.data / "meta.json").is_file():
        sys.exit(f"{args.data}: no token shards; build them with `minicpm4 data build-corpus --out build/data/corpus` "
                 f"and `minicpm4 data shards --corpus build/data/corpus --tokenizer {args.model} --out {args.data}`")
    torch.set_num_threads(args.threads)
    runs = {"qat": (args.group_size, args.runs / "qat")}
    if not args.no_control:
        runs["control"] = (0, args.runs / "control")
    commands = {}
    for name, (g, out) in runs.items():
        cmd = stage_command(args, g, out)
        commands[name] = shlex.join([".venv/bin/minicpm4", *cmd[1:]]).replace(str(ROOT) + "/", "")
        run_stage(cmd, out, args.threads)

    tokens = np.load(args.model / VAL_TOKENS_FILE)
    rows = []

    def row(name: str, model, **extra) -> None:
        loss = validation_loss(model, tokens)
        rows.append({"model": name, "val_loss": loss, "perplexity": math.exp(loss), **extra})
        print(f"{name}: {loss:.4f}", file=sys.stderr)

    row("original (bf16, as shipped)", load_model(args.model))
    row("original (fp32)", load_model(args.model, dtype=torch.float32))
    ptq = load_model(args.model, dtype=torch.float32)
    quantize_(ptq, TernaryQATConfig(step="convert", group_size=args.group_size))
    row(f"ternary post-training (g{args.group_size})", ptq)
    for name, (g, out) in runs.items():
        records = read_metrics(out / "metrics.jsonl")
        steps = [r for r in records if "loss" in r]
        label = f"ternary QAT (g{g})" if g else "float control (same stage, no quantizer)"
        per_step = steps[0]["tokens"]  # tokens after the first step
        row(label, load_model(out / "final"), steps=len(steps), tokens=steps[-1]["tokens"],
            final_train_loss=steps[-1]["loss"], run_val_loss=last(records, "val_loss"),
            step_seconds=sum(per_step / r["tokens_per_s"] for r in steps),  # the optimizer steps' own time
            run=str(out), command=commands[name])
        if not g:  # post-training ternary of the equally trained float model: the like-for-like baseline for QAT
            control_ptq = load_model(out / "final", dtype=torch.float32)
            quantize_(control_ptq, TernaryQATConfig(step="convert", group_size=args.group_size))
            row(f"float control, then ternary post-training (g{args.group_size})", control_ptq)

    base = rows[1]["val_loss"]
    lines = ["| model | val loss | perplexity | Δ vs original fp32 |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['val_loss']:.4f} | {r['perplexity']:.1f} | {r['val_loss'] - base:+.4f} |"
              for r in rows]
    quant = json.loads((args.runs / "qat" / "final" / "config.json").read_text())["quantization_config"]
    result = {"command": command_line(argv), "machine": machine_info(args.threads), "model": str(args.model),
              "data": str(args.data), "val_tokens": int(len(tokens)), "val_seq_len": 256,
              "source_decay_tokens": SOURCE_DECAY_TOKENS, "qat_tokens": args.tokens, "group_size": args.group_size,
              "quantization_config": quant, "rows": rows, "table": "\n".join(lines)}
    publish(result, args.out)
    return result


if __name__ == "__main__":
    main()
