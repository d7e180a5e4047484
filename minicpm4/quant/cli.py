"""`minicpm4 quantize MODEL_DIR --method {rtn,gptq,pgptq,spgptq,ternary} -o OUT`: quantize a float folder and write
a loadable quantized folder (GPTQ layout for INT4, ours for ternary), with a progress bar and a summary: size
before/after, per-layer output reconstruction error on the calibration data, validation loss if asked."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from minicpm4.errors import UserError

METHODS = ("rtn", "gptq", "pgptq", "spgptq", "ternary")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="INT4 (RTN / GPTQ / P-GPTQ / S-P-GPTQ) or ternary weights for a model folder")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="float Hugging Face MiniCPM4 folder (or a fake-quantized "
                   "BitCPM4 release for --method ternary: packed exactly)")
    p.add_argument("--method", choices=METHODS, required=True,
                   help="rtn: round to nearest; gptq; pgptq: GPTQ without the first --prefix-tokens positions in the "
                   "Hessian (MiniCPM4's P-GPTQ); spgptq: AWQ-style smoothing + P-GPTQ; ternary: BitCPM4 ternary "
                   "(post-training; QAT is `minicpm4 train qat`)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--group-size", type=int, default=None,
                   help="input channels per scale (default 128 for INT4, 64 for ternary, or the largest of 64 / 32 that "
                   "divides the hidden and intermediate sizes when the default does not)")
    p.add_argument("--asym", action="store_true", help="INT4 with per-group zero points (default symmetric)")
    p.add_argument("--lm-head", action="store_true", help="also quantize the LM head (default: kept, as the report)")
    g = p.add_argument_group("GPTQ")
    g.add_argument("--calib", metavar="PATH", help="calibration data: token shards folder, .npy token ids, .jsonl or "
                   "text (required for gptq / pgptq / spgptq)")
    g.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default 128)")
    g.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence, BOS included")
    g.add_argument("--prefix-tokens", type=int, default=None, help="P-GPTQ's s (default 4 for pgptq/spgptq)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian damping, fraction of mean diag (default 0.01)")
    g.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    g.add_argument("--static-groups", action="store_true", help="with --act-order: groups fixed before the sweep")
    g.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--eval", metavar="PATH", help="also report validation loss / perplexity before and after on this "
                   "data (same formats as --calib; .npy token ids are windowed as the default model's val set)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="tokens of --eval used (default 65536)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype of the quantized model (scales, norms, embedding); auto computes in the fast "
                   "dtype for this CPU and writes the float tensors in the source checkpoint's dtype, an explicit "
                   "dtype is also the one written")
    p.set_defaults(func=cmd_quantize)


def default_group_size(method: str, dims: tuple[int, ...]) -> int:
    preferred = 64 if method == "ternary" else 128
    for g in (preferred, 64, 32):
        if g <= preferred and all(d % g == 0 for d in dims):
            return g
    return preferred  # reported by the divisibility check, naming the flag


def make_config(args: argparse.Namespace, dims: tuple[int, ...]):
    from minicpm4.quant import GPTQConfig, Int4WeightOnlyConfig, TernaryQATConfig

    g = args.group_size or default_group_size(args.method, dims)
    if args.method == "ternary":
        return TernaryQATConfig(step="convert", group_size=g, lm_head=args.lm_head)
    if args.method == "rtn":
        return Int4WeightOnlyConfig(group_size=g, sym=not args.asym, lm_head=args.lm_head)
    prefix = args.prefix_tokens if args.prefix_tokens is not None else (0 if args.method == "gptq" else 4)
    if args.method == "gptq" and prefix:
        raise UserError("--prefix-tokens applies to pgptq / spgptq (gptq keeps every token in the Hessian)")
    return GPTQConfig(group_size=g, sym=not args.asym, prefix_tokens=prefix, smooth=args.method == "spgptq",
                      damp_percent=args.damp, act_order=args.act_order, static_groups=args.static_groups,
                      lm_head=args.lm_head)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _eval_tokens(path: str, tokenizer, limit: int) -> np.ndarray:
    from minicpm4.quant.calibration import _token_stream

    return np.asarray(_token_stream(Path(path), tokenizer)[:limit])


def summarize_errors(layers) -> list[str]:
    """Per linear kind (q_proj, ..., down_proj): mean and worst relative output error over the layers."""
    kinds: dict[str, list[float]] = {}
    for r in layers:
        if r.name.endswith("(all tokens)") or math.isnan(r.error):
            continue
        kinds.setdefault(r.name.rpartition(".")[2], []).append(r.error)
    return [f"  {k:<10} mean {statistics.fmean(v):.4f}  worst {max(v):.4f}  ({len(v)} layers)" for k, v in kinds.items()]


def cmd_quantize(args: argparse.Namespace) -> None:
    from minicpm4.api import parse_dtype
    from minicpm4.checkpoint import checkpoint_dtype, copy_tokenizer_files, load_model, save_model
    from minicpm4.config import MiniCPMConfig
    from minicpm4.data import progress
    from minicpm4.quant import GPTQConfig, quantize_
    from minicpm4.quant.calibration import calibration_sequences
    from minicpm4.quant.format import read_quantization, with_quantize_config
    from minicpm4.tokenizer import Tokenizer
    from minicpm4.train.default_model import validation_loss

    src, out = Path(args.model_dir), Path(args.out)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (expected a Hugging Face MiniCPM4 folder)")
    if out.resolve() == src.resolve():
        raise UserError("--out must differ from MODEL_DIR (the float weights are the input)")
    src_config = with_quantize_config(MiniCPMConfig.from_json(src), src)
    config = make_config(args, (src_config.hidden_size, src_config.intermediate_size))
    if read_quantization(src_config) is not None:
        raise UserError(f"{src} is already quantized; quantize the float checkpoint")
    if isinstance(config, GPTQConfig) and not args.calib:
        raise UserError(f"--method {args.method} needs --calib PATH (token shards, .npy, .jsonl or text)")
    model = load_model(src, dtype=parse_dtype(args.dtype))
    hidden = (model.config.hidden_size, model.config.intermediate_size)
    if any(h % config.group_size for h in hidden):
        raise UserError(f"--group-size {config.group_size} must divide hidden_size {hidden[0]} and "
                        f"intermediate_size {hidden[1]}")
    tokenizer = Tokenizer.from_pretrained(src) if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else None
    eval_ids = _eval_tokens(args.eval, tokenizer, args.eval_tokens) if args.eval else None
    before = validation_loss(model, eval_ids) if eval_ids is not None else None
    calib = None
    if args.calib:
        calib = calibration_sequences(args.calib, tokenizer, model.config.bos_token_id, args.calib_samples,
                                      args.calib_len, args.seed)
    steps = model.config.num_hidden_layers * (4 if isinstance(config, GPTQConfig) else 7) + bool(args.lm_head)
    t0 = time.perf_counter()
    with progress(total=steps, desc=f"quantize {args.method}", unit="step") as bar:
        def tick(_text: str) -> None:
            bar.update(1)
        report = quantize_(model, config, calibration=calib, progress=tick)
    seconds = time.perf_counter() - t0
    # "auto" may compute in fp32 (a CPU without native bf16), but the folder is for any machine: a bf16 source
    # stays bf16 on disk (its values are bf16-exact, so nothing is lost), not twice its size.
    out = save_model(model, out, dtype=checkpoint_dtype(src) if args.dtype == "auto" else parse_dtype(args.dtype))
    copy_tokenizer_files(src, out)
    size_in, size_out = _folder_bytes(src), _folder_bytes(out)
    lines = [f"{report.method}, group size {config.group_size}: {seconds:.1f} s; wrote {out}",
             f"size: {size_in / 1024**2:.2f} MiB -> {size_out / 1024**2:.2f} MiB ({size_out / max(size_in, 1):.3f}x)"]
    if report.layers:
        lines.append("relative output error on the calibration tokens (non-prefix), per linear:")
        lines += summarize_errors(report.layers)
    if eval_ids is not None:
        after = validation_loss(model, eval_ids)
        lines.append(f"validation loss: {before:.4f} -> {after:.4f} (perplexity {math.exp(before):.2f} -> "
                     f"{math.exp(after):.2f}) on {len(eval_ids):,} tokens of {args.eval}")
    print("\n".join(lines))
