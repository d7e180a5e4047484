"""`minicpm4 data synth`: UltraChat v2-style SFT synthesis (MINICPM4.md §8.3) against any OpenAI-compatible chat
endpoint, or a model folder run in this process.

    minicpm4 serve --port 8000 &
    minicpm4 data synth --track knowledge,reasoning --base-url http://127.0.0.1:8000/v1 --out synth.jsonl
    minicpm4 data synth --track all --model DIR --limit 20 --out synth.jsonl --kept-only sft.jsonl
    minicpm4 data synth review-apply --out synth.jsonl --kept-only sft.jsonl

Tracks: knowledge | reasoning | instruction | longctx | tool (comma-separated, or all). Output: FILE.jsonl holds
every record, kept and rejected (with the reason), which is what makes a rerun resume; --kept-only also writes
the kept ones alone, the file `minicpm4 train sft` reads. Beside it: FILE.stats.json (per track generated /
kept / rejected by reason, records/s) and FILE.review.jsonl (the human review queue: fill in "decision", then
`review-apply`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from minicpm4.data.synth.records import TRACKS
from minicpm4.errors import UserError

NO_MODEL = ("no model to ask: start one with `minicpm4 serve` and pass --base-url http://127.0.0.1:8000/v1 "
            "(or any OpenAI-compatible endpoint), or pass --model DIR to run a model in this process")


@dataclass
class TrackOptions:
    kb: Path | None = None  # knowledge, instruction and longctx seeds; None: the shipped survey KB
    code: bool = True
    length_range: tuple[int, int] = (1024, 3072)
    max_constraints: int = 3
    tools: Path | None = None
    tool_seeds: Path | None = None


def parse_tracks(value: str) -> list[str]:
    names = list(TRACKS) if value.strip() == "all" else [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKS]
    if unknown or not names:
        raise UserError(f"--track {value}: unknown {', '.join(unknown) or '(empty)'}; choose from "
                        f"{', '.join(TRACKS)} or all")
    return list(dict.fromkeys(names))


def parse_length_range(value: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"--length-range {value}: expected MIN,MAX, e.g. 1024,3072") from None
    if not 0 < lo <= hi:
        raise UserError(f"--length-range {value}: expected 0 < MIN <= MAX")
    return lo, hi


def build_tracks(names: list[str], ctx, options: TrackOptions) -> list:
    """The named tracks over their shipped (or given) seeds; data and sandbox problems surface here, before any
    model is loaded."""
    from minicpm4.data.synth import tracks_instruction, tracks_knowledge, tracks_longctx, tracks_reasoning, tracks_tool

    kb = {"kb_path": options.kb} if options.kb is not None else {}
    tools = {k: v for k, v in (("tools_path", options.tools), ("seeds_path", options.tool_seeds)) if v is not None}
    make = {
        "knowledge": lambda: tracks_knowledge.KnowledgeTrack(ctx, tracks_knowledge.KnowledgeConfig(**kb)),
        "reasoning": lambda: tracks_reasoning.ReasoningTrack(ctx, tracks_reasoning.ReasoningConfig(code=options.code)),
        "instruction": lambda: tracks_instruction.InstructionTrack(ctx, tracks_instruction.InstructionConfig(
            **kb, max_constraints=options.max_constraints)),
        "longctx": lambda: tracks_longctx.LongContextTrack(ctx, tracks_longctx.LongContextConfig(
            **kb, length_range=options.length_range)),
        "tool": lambda: tracks_tool.ToolTrack(ctx, tracks_tool.ToolConfig(**tools)),
    }
    return [make[n]() for n in names]


def register_step(steps: argparse._SubParsersAction) -> None:
    from minicpm4.apps.backend_cli import add_backend_options

    p = steps.add_parser("synth", help="UltraChat v2-style SFT synthesis: knowledge | reasoning | instruction | "
                         "longctx | tool, verified, resumable", description=__doc__.split("\n\n")[0],
                         epilog="Run `minicpm4 data synth review-apply --help` for the review merge.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--track", metavar="TRACKS", help=f"comma-separated: {', '.join(TRACKS)}, or all (required)")
    p.add_argument("--out", type=Path, metavar="FILE.jsonl", help="every record, kept and rejected; an existing "
                   "file is resumed (required)")
    p.add_argument("--kept-only", type=Path, metavar="FILE", default=None,
                   help="also write the kept records alone (the SFT set) when the run ends")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="seed items per track (default: all)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight (default: %(default)s)")
    p.add_argument("--samples", type=int, default=4, help="instruction track: outputs sampled per instruction "
                   "(default: %(default)s)")
    p.add_argument("--max-constraints", type=int, default=3, metavar="K",
                   help="instruction track: constraints layered 1..K (default: %(default)s)")
    p.add_argument("--length-range", default="1024,3072", metavar="MIN,MAX",
                   help="longctx track: context length drawn uniformly in this range, in model tokens with --model, "
                   "else chars/4 (default: %(default)s, for the bundled model; the report uses 8192,65536)")
    p.add_argument("--no-code", action="store_true", help="reasoning track: math only (no sandbox needed)")
    p.add_argument("--kb", type=Path, default=None, metavar="JSONL",
                   help="knowledge base {id, title, abstract} for knowledge / instruction / longctx "
                   "(default: the shipped survey KB)")
    p.add_argument("--tools", type=Path, default=None, metavar="JSON", help="tool track: OpenAI function tools "
                   "(default: minicpm4/assets/synth/tools.json)")
    p.add_argument("--tool-seeds", type=Path, default=None, metavar="JSONL",
                   help="tool track: {id, query, tools} seeds (default: minicpm4/assets/synth/tool-seeds.jsonl)")
    p.add_argument("--review-fraction", type=float, default=0.05,
                   help="share of kept records sampled into FILE.review.jsonl, besides every borderline one "
                   "(default: %(default)s)")
    p.add_argument("--dedup-threshold", type=float, default=0.8, help="MinHash Jaccard at which a kept record is a "
                   "near duplicate (default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=0, help="seed-item order and per-item draws (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend_options(p, temperature=0.7, top_p=0.95, max_tokens=512)
    for action in p._actions:  # synthesis never falls back to the bundled model: say so where --model is listed
        if action.dest == "model":
            action.help = "a MiniCPM4 folder run in this process (e.g. minicpm4/assets/default-model); else --base-url"
    p.set_defaults(func=cmd_synth)

    inner = p.add_subparsers(dest="synth_command", metavar="{review-apply}")
    r = inner.add_parser("review-apply", help="merge the review file's accept/reject decisions into the output")
    r.add_argument("--out", type=Path, required=True, metavar="FILE.jsonl", help="the synthesis output")
    r.add_argument("--review", type=Path, default=None, metavar="FILE", help="default: FILE.review.jsonl")
    r.add_argument("--kept-only", type=Path, default=None, metavar="FILE", help="rewrite the kept-only export too")
    r.set_defaults(func=cmd_review_apply)


def cmd_synth(args: argparse.Namespace) -> None:
    from minicpm4.apps.backend_cli import make_backend, sampling_from_args
    from minicpm4.apps.chat_backend import EndpointBackend
    from minicpm4.data.synth.runner import RunConfig, measure_lengths, run_synthesis
    from minicpm4.data.synth.track import TrackContext

    if not args.track:
        raise UserError(f"--track: required ({', '.join(TRACKS)}, or all)")
    if args.out is None:
        raise UserError("--out: required (the JSONL file the records go to)")
    names = parse_tracks(args.track)
    sampling = sampling_from_args(args)
    if args.samples < 1:
        raise UserError(f"--samples: must be >= 1, got {args.samples}")
    if "instruction" in names and args.samples > 1 and sampling.temperature == 0:
        raise UserError("--temperature 0: the instruction track samples --samples outputs per instruction and "
                        "needs a temperature > 0 (or --samples 1)")
    if not args.base_url and not args.model:
        raise UserError(NO_MODEL)
    config = RunConfig(out=args.out, limit=args.limit, concurrency=args.concurrency,
                       review_fraction=args.review_fraction, review_seed=args.data_seed,
                       dedup_threshold=args.dedup_threshold, show_progress=not args.no_progress,
                       kept_only=args.kept_only)
    ctx = TrackContext(data_seed=args.data_seed, samples=args.samples)
    options = TrackOptions(kb=args.kb, code=not args.no_code, length_range=parse_length_range(args.length_range),
                           max_constraints=args.max_constraints, tools=args.tools, tool_seeds=args.tool_seeds)
    tracks = build_tracks(names, ctx, options)
    backend = make_backend(args)
    if isinstance(backend, EndpointBackend):
        backend.concurrency = args.concurrency
    measure_lengths(ctx, backend)
    print_summary(run_synthesis(tracks, backend, sampling, config))


def print_summary(stats: dict) -> None:
    print(f"{'track':<12}{'new':>6}{'kept':>6}{'rejected':>10}{'resumed':>9}{'rec/s':>8}  top rejection reasons")
    for name, s in stats["tracks"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in list(s["rejected_by_reason"].items())[:3])
        rate = f"{s['records_per_s']:.2f}" if s["records_per_s"] else "-"
        print(f"{name:<12}{s['generated']:>6}{s['kept']:>6}{s['rejected']:>10}{s['already_done']:>9}{rate:>8}  {reasons}")
    from minicpm4.data.synth.review import review_path
    from minicpm4.data.synth.runner import stats_path

    out = Path(stats["out"])
    print(f"{stats['records']} records in {stats['seconds']:.1f} s -> {out} (stats {stats_path(out)}, review queue "
          f"{review_path(out)})" + (f"; {stats['kept_exported']} kept -> --kept-only" if "kept_exported" in stats else ""))


def cmd_review_apply(args: argparse.Namespace) -> None:
    from minicpm4.data.synth.review import apply_review

    counts = apply_review(args.out, args.review, args.kept_only)
    print(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()) + f" -> {args.out}")
