"""Validation loss / perplexity and size of the default model under each quantization method (issue 9's table):
float vs RTN vs GPTQ vs P-GPTQ vs S-P-GPTQ (INT4, group 64: the model's hidden size 192 is not a multiple of 128)
vs ternary post-training, and ternary QAT when a `minicpm4 train qat` export is given.

    .venv/bin/python benchmarks/quant_quality.py [--qat DIR]

Calibration and evaluation use disjoint halves of the model's shipped validation tokens (val_tokens.npy):
calibration windows are drawn from the first half only, the loss is measured on the second half (windows of 256,
the default model's own validation measure). Every model is evaluated in fp32, so the rows differ only by their
weights. Writes benchmarks/results/quant_quality.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, publish  # noqa: E402

from minicpm4.checkpoint import load_model, save_model  # noqa: E402
from minicpm4.quant import GPTQConfig, Int4WeightOnlyConfig, TernaryQATConfig, quantize_  # noqa: E402
from minicpm4.quant.calibrate import gptq_layers  # noqa: E402
from minicpm4.quant.calibration import calibration_sequences  # noqa: E402
from minicpm4.quant.linear import QuantLinearBase  # noqa: E402
from minicpm4.train.default_model import validation_loss  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "minicpm4" / "assets" / "default-model"


def linear_bytes(model: torch.nn.Module, float_bytes: int) -> int:
    """Bytes of the decoder linears as stored: packed tensors as they are, float weights at `float_bytes` each
    (the float checkpoint's storage dtype, bf16)."""
    total = 0
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, QuantLinearBase):
                total += sum(t.numel() * t.element_size() for t in m.state_dict().values())
            elif isinstance(m, torch.nn.Linear):
                total += m.weight.numel() * float_bytes
    return total


def mean_error(report_layers) -> float:
    """Mean relative output error over the decoder linears (non-prefix calibration tokens)."""
    errors = [r.error for r in report_layers if not r.name.endswith("(all tokens)")]
    return float(np.mean(errors)) if errors else float("nan")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--qat", default=None, help="a ternary QAT export of the same model (minicpm4 train qat)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ternary-group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS_DIR / "quant_quality.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    tokens = np.load(folder / "val_tokens.npy")
    half = len(tokens) // 2
    eval_tokens = tokens[half:]
    probe = load_model(folder, dtype=torch.float32)
    calib = calibration_sequences(folder / "val_tokens.npy", None, probe.config.bos_token_id, args.calib_samples,
                                  args.calib_len, seed=0, exclude=(half, len(tokens)))
    g = args.group_size
    methods = {
        "float (bf16 weights)": None,
        "rtn": Int4WeightOnlyConfig(group_size=g),
        "gptq": GPTQConfig(group_size=g),
        "p-gptq (s=4)": GPTQConfig(group_size=g, prefix_tokens=4),
        "s-p-gptq": GPTQConfig(group_size=g, prefix_tokens=4, smooth=True),
        "ternary post-training": TernaryQATConfig(step="convert", group_size=args.ternary_group_size),
    }
    rows = []
    for name, config in [*methods.items(), *([("ternary QAT", "qat")] if args.qat else [])]:
        t0 = time.perf_counter()
        model = load_model(args.qat if config == "qat" else folder, dtype=torch.float32)
        error = float("nan")
        if config not in (None, "qat"):
            error = mean_error(quantize_(model, config, calibration=calib).layers)
        seconds = time.perf_counter() - t0
        if isinstance(config, Int4WeightOnlyConfig):  # RTN's errors, measured on the same walk as GPTQ's
            error = mean_error(gptq_layers(load_model(folder, dtype=torch.float32), calib, GPTQConfig(group_size=g), rtn=True))
        with tempfile.TemporaryDirectory() as tmp:
            out = save_model(model, Path(tmp) / "m", dtype=torch.bfloat16)  # floats stored as the original
            file_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        loss = validation_loss(model, eval_tokens)
        rows.append({"method": name, "val_loss": loss, "perplexity": math.exp(loss), "file_bytes": file_bytes,
                     "linear_bytes": linear_bytes(model, 2), "mean_output_error": error, "quantize_s": seconds})
        print(f"{name}: loss {loss:.4f}", file=sys.stderr)
    base = rows[0]
    lines = ["| method | val loss | perplexity | Δ loss | mean rel. output error | linears (KiB) | file (KiB) | quantize s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['val_loss']:.4f} | {fmt(r['perplexity'], 2)} | {r['val_loss'] - base['val_loss']:+.4f} | "
                     f"{fmt(r['mean_output_error'], 4)} | "
                     f"{r['linear_bytes'] / 1024:,.0f} | {r['file_bytes'] / 1024:,.0f} | {r['quantize_s']:.1f} |")
    result = {"command": command_line(argv), "machine": machine_info(args.threads), "model": str(folder),
              "eval_tokens": int(len(eval_tokens)), "calibration": {"sequences": len(calib), "seq_len": args.calib_len},
              "group_size": g, "ternary_group_size": args.ternary_group_size, "rows": rows, "table": "\n".join(lines)}
    publish(result, args.out)
    return result


if __name__ == "__main__":
    main()
