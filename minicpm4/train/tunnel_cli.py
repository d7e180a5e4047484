"""`minicpm4 tunnel`: the ModelTunnel muP learning-rate search (tunnel.py) on token shards + held-out SFT data.

    minicpm4 tunnel --data build/data/shards --sft-heldout build/data/sft/heldout.jsonl \\
        --widths 64,128,256 --lrs 2^-10..2^-3 --steps 200 --out benchmarks/results/tunnel --threads 1

Writes OUT/results.json, OUT/tunnel.md, OUT/tunnel.png and OUT/runs.jsonl; a repeated command reuses the
finished runs in runs.jsonl (same settings), so an interrupted sweep continues and a grid can be extended.
Also runnable as `python -m minicpm4.train.tunnel_cli ...` (same flags).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from minicpm4.errors import UserError, run_command


def parse_lrs(text: str, flag: str = "--lrs") -> tuple[float, ...]:
    """'2^-10..2^-3' (every integer exponent), '2^-10..2^-3:0.5' (exponent step), '2^-7', '0.01', comma-separated."""
    from minicpm4.train.tunnel import log2_grid

    out: list[float] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            if ".." in item:
                lo, _, rest = item.partition("..")
                hi, _, step = rest.partition(":")
                a, b = (float(x.strip().removeprefix("2^")) for x in (lo, hi))
                if not (lo.strip().startswith("2^") and hi.strip().startswith("2^")) or b < a:
                    raise ValueError
                out += log2_grid(a, b, float(step) if step else 1.0)
            elif item.startswith("2^"):
                out.append(2.0 ** float(item[2:]))
            else:
                out.append(float(item))
        except ValueError:
            raise UserError(f"{flag}: cannot read {item!r}; write 2^-10..2^-3, 2^-10..2^-3:0.5, 2^-7 or 0.01") from None
    if not out or any(v <= 0 for v in out):
        raise UserError(f"{flag}: needs positive learning rates, got {text!r}")
    return tuple(sorted(set(out)))


def _list(text: str, kind, flag: str) -> tuple:
    try:
        values = tuple(kind(s.strip()) for s in text.split(",") if s.strip())
    except ValueError:
        raise UserError(f"{flag}: expected a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise UserError(f"{flag}: empty list")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tunnel", help="ModelTunnel: muP learning-rate search on small proxies (muP vs standard), "
                                      "table + plot",
                       description="Sweep learning rate (and init std, batch size) at several widths under muP and "
                                   "standard parametrisation; report the LR optimum per width on validation LM loss "
                                   "and a ScalingBench-style answer loss. Results: OUT/results.json, tunnel.md, tunnel.png.")
    p.add_argument("--data", required=True, metavar="DIR", help="token-shard folder (train.bin, val.bin, meta.json)")
    p.add_argument("--sft-heldout", required=True, metavar="JSONL",
                   help="held-out chat data ({\"messages\": [user, assistant]}) for the ScalingBench-style indicator")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: the one in the "
                   "shards' meta.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="results folder")
    g = p.add_argument_group("sweep axes (comma-separated)")
    g.add_argument("--widths", default="64,128,256", help="hidden sizes, multiples of --head-dim (default 64,128,256)")
    g.add_argument("--lrs", default="2^-10..2^-3", help="learning rates (muP base LR): 2^-10..2^-3, "
                   "2^-10..2^-3:0.5, 2^-7, 0.01 (default 2^-10..2^-3)")
    g.add_argument("--parametrizations", default="mup,standard", help="mup and/or standard (default both)")
    g.add_argument("--init-scales", default="0.1", help="init std(s), initializer_range (default 0.1)")
    g.add_argument("--batch-sizes", default="8", help="sequences per step (default 8)")
    g.add_argument("--seeds", default="0", help="seeds; curves average over them (default 0)")
    g = p.add_argument_group("proxies and training")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--depth", type=int, default=2, help="decoder layers (default 2)")
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--dim-model-base", type=int, default=64, help="muP base width: width_mult = width / this")
    g.add_argument("--warmup-fraction", type=float, default=0.1)
    g.add_argument("--decay-fraction", type=float, default=0.2)
    g = p.add_argument_group("evaluation and run")
    g.add_argument("--val-windows", type=int, default=64, help="val-split windows for the LM loss (default 64)")
    g.add_argument("--sb-conversations", type=int, default=256, help="held-out conversations scored (default 256)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--rerun", action="store_true", help="ignore finished runs in OUT/runs.jsonl")
    p.set_defaults(func=cmd_tunnel, program="minicpm4 tunnel")


def tunnel_command(args: argparse.Namespace, sweep) -> str:
    """The full, explicit command line of this invocation, defaults spelled out (for the table header); with
    the process's niceness when it runs under `nice`."""
    parts = ["--data", args.data, "--sft-heldout", args.sft_heldout]
    if args.tokenizer:
        parts += ["--tokenizer", args.tokenizer]
    parts += ["--widths", ",".join(map(str, sweep.widths)), "--lrs", args.lrs,
              "--parametrizations", ",".join(sweep.parametrizations),
              "--init-scales", ",".join(f"{v:g}" for v in sweep.init_scales),
              "--batch-sizes", ",".join(map(str, sweep.batch_sizes)), "--seeds", ",".join(map(str, sweep.seeds)),
              "--steps", str(sweep.steps), "--seq-len", str(sweep.seq_len), "--depth", str(sweep.depth),
              "--head-dim", str(sweep.head_dim), "--dim-model-base", str(sweep.dim_model_base),
              "--warmup-fraction", f"{sweep.warmup_fraction:g}", "--decay-fraction", f"{sweep.decay_fraction:g}",
              "--val-windows", str(sweep.val_windows), "--sb-conversations", str(sweep.sb_conversations),
              "--out", args.out]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.device:
        parts += ["--device", args.device]
    nice = os.nice(0)
    return ("" if nice <= 0 else f"nice -n {nice} ") + args.program + " " + shlex.join(parts)


def cmd_tunnel(args: argparse.Namespace) -> None:
    import torch

    from minicpm4.tokenizer import Tokenizer
    from minicpm4.train.cli import _tokenizer_dir
    from minicpm4.train.data import TokenWindows, read_meta
    from minicpm4.train.sft_data import read_jsonl
    from minicpm4.train.tunnel import SweepConfig, TunnelData, run_sweep, scalingbench_set

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sweep = SweepConfig(
        widths=_list(args.widths, int, "--widths"), lrs=parse_lrs(args.lrs),
        parametrizations=_list(args.parametrizations, str, "--parametrizations"),
        init_scales=_list(args.init_scales, float, "--init-scales"),
        batch_sizes=_list(args.batch_sizes, int, "--batch-sizes"), seeds=_list(args.seeds, int, "--seeds"),
        depth=args.depth, head_dim=args.head_dim, dim_model_base=args.dim_model_base, steps=args.steps,
        seq_len=args.seq_len, warmup_fraction=args.warmup_fraction, decay_fraction=args.decay_fraction,
        val_windows=args.val_windows, sb_conversations=args.sb_conversations, device=args.device)
    sweep.validate()

    meta = read_meta(args.data)
    tok = meta.get("tokenizer")
    candidates = [Path(args.data)] + ([Path(tok), Path(args.data) / tok] if isinstance(tok, str) else [])
    tokenizer_dir = _tokenizer_dir(args, *candidates)
    if tokenizer_dir is None:
        raise UserError(f"--data {args.data}: no tokenizer found (meta.json names none that exists); pass --tokenizer")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    train = TokenWindows.from_folder(args.data, "train", sweep.seq_len)
    val = TokenWindows.from_folder(args.data, "val", sweep.seq_len)
    if len(val) == 0:
        raise UserError(f"--data {args.data}: the val split has no window of {sweep.seq_len + 1} tokens")
    sb = scalingbench_set(read_jsonl(args.sft_heldout), tokenizer, sweep.sb_seq_len, sweep.sb_conversations,
                          score_im_end=sweep.sb_score_im_end)
    top = max(int(row[0].max()) for row in sb.rows)
    if top >= meta["vocab_size"]:
        raise UserError(f"--sft-heldout: token id {top} is outside the shards' vocab_size {meta['vocab_size']} "
                        "(tokenizer and shards do not match)")
    eos = meta.get("eos_token_id", 2)
    data = TunnelData(train, val, sb, meta["vocab_size"], meta.get("bos_token_id", 1), eos,
                      source={"data": str(args.data), "sft_heldout": str(args.sft_heldout),
                              "tokenizer": str(tokenizer_dir), "sb_rows": len(sb), "sb_targets": sb.stats.trained_tokens})
    print(f"tunnel: {len(sweep.points())} runs ({len(sweep.parametrizations)} parametrisations x {len(sweep.widths)} "
          f"widths x {len(sweep.lrs)} LRs x {len(sweep.init_scales)} init x {len(sweep.batch_sizes)} batch x "
          f"{len(sweep.seeds)} seeds), {sweep.steps} steps each; indicator: {sb.stats.conversations} conversations, "
          f"{sb.stats.trained_tokens} answer tokens", file=sys.stderr)
    report = run_sweep(sweep, data, args.out, command=tunnel_command(args, sweep), reuse=not args.rerun,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(args.out)
    print((out / "tunnel.md").read_text(encoding="utf-8").split("## Full grid")[0].rstrip())
    print(f"\nwrote {out / 'results.json'}, {out / 'tunnel.md'}, {out / 'tunnel.png'} "
          f"({report.wall_seconds / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    """`python -m minicpm4.train.tunnel_cli FLAGS` = `minicpm4 tunnel FLAGS`."""
    parser = argparse.ArgumentParser(prog="minicpm4")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["tunnel", *(sys.argv[1:] if argv is None else argv)])
    args.program = "python -m minicpm4.train.tunnel_cli"
    return run_command(args.func, args, "minicpm4 tunnel")


if __name__ == "__main__":
    sys.exit(main())
