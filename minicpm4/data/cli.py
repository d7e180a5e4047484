"""`minicpm4 data build-corpus | shards | build-sft`, `minicpm4 tokenizer train` and `minicpm4 frspec-index`: thin
wrappers over corpus.build_corpus, shards.write_shards, sft_synth.build_sft, tokenizer_train.train_tokenizer and
frspec.build_frspec_index.
Defaults are the paths `make corpus` uses (build/data/...), relative to the current folder."""

from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path("build/data")


def _add_source_options(p: argparse.ArgumentParser) -> None:
    from minicpm4.data.sources import SourcePaths

    d = SourcePaths()
    g = p.add_argument_group("where the Debian packages put their files (defaults: Debian's paths)")
    g.add_argument("--dictd-dir", type=Path, default=d.dictd_dir, help="dict-* databases (*.dict.dz, *.index)")
    g.add_argument("--wordnet-dir", type=Path, default=d.wordnet_dir, help="wordnet-base data.* and index.*")
    g.add_argument("--fortunes-dir", type=Path, default=d.fortunes_dir, help="fortune files")
    g.add_argument("--bible-text", type=Path, default=None,
                   help="a dump of `bible -f Gen1:1-Rev22:21` (default: run the `bible` program)")


def _paths(args: argparse.Namespace):
    from minicpm4.data.sources import SourcePaths

    return SourcePaths(args.dictd_dir, args.wordnet_dir, args.fortunes_dir, args.bible_text)


def _names(value: str | None, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    if value is None:
        return allowed
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"{flag}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}")
    return names


def cmd_build_corpus(args: argparse.Namespace) -> None:
    from minicpm4.data.corpus import CorpusConfig, build_corpus
    from minicpm4.data.sources import SOURCES

    config = CorpusConfig(out_dir=args.out, sources=_names(args.sources, tuple(SOURCES), "--sources"),
                          val_fraction=args.val_fraction, min_chars=args.min_chars, paths=_paths(args))
    stats = build_corpus(config, show_progress=not args.quiet)
    print(f"{'source':<10}{'read':>9}{'exact dup':>11}{'near dup':>10}{'filtered':>10}{'train docs':>12}"
          f"{'val docs':>10}{'MB':>8}")
    for name, s in stats["sources"].items():
        mb = sum(s["bytes"].values()) / 1e6
        print(f"{name:<10}{s['read']:>9}{s['exact_duplicates']:>11}{s['near_duplicates']:>10}"
              f"{s['too_short'] + s['low_letter_ratio']:>10}{s['documents']['train']:>12}{s['documents']['val']:>10}"
              f"{mb:>8.2f}")
    total = stats["total"]
    print(f"total: {sum(total['documents'].values())} documents, {sum(total['bytes'].values()) / 1e6:.2f} MB "
          f"(train {total['bytes']['train'] / 1e6:.2f} MB, val {total['bytes']['val'] / 1e6:.2f} MB) in "
          f"{stats['seconds']} s -> {args.out}")


def cmd_shards(args: argparse.Namespace) -> None:
    from minicpm4.data.shards import write_shards

    meta = write_shards(args.corpus, args.tokenizer, args.out, show_progress=not args.quiet)
    n = meta["num_tokens"]
    print(f"{n['train']:,} train + {n['val']:,} val tokens ({meta['dtype']}, vocab {meta['vocab_size']}) "
          f"from {sum(meta['num_documents'].values()):,} documents in {meta['seconds']} s -> {args.out}")


def cmd_build_sft(args: argparse.Namespace) -> None:
    from minicpm4.data.sft_synth import TASKS, SFTConfig, build_sft

    config = SFTConfig(out_dir=args.out, heldout_fraction=args.heldout_fraction,
                       max_train_per_task=args.max_train_per_task, max_heldout_per_task=args.max_heldout_per_task,
                       corpus_dir=args.corpus, tokenizer_dir=args.tokenizer, max_tokens=args.max_tokens,
                       tasks=_names(args.tasks, TASKS, "--tasks"), paths=_paths(args))
    stats = build_sft(config)
    for split, rows in stats["rows"].items():
        print(f"{split}: {sum(rows.values())} rows ({', '.join(f'{t} {n}' for t, n in rows.items())})")
    print(f"in {stats['seconds']} s -> {args.out}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from minicpm4.data.tokenizer_train import train_tokenizer
    from minicpm4.tokenizer import Tokenizer

    out = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                          show_progress=not args.quiet)
    tok = Tokenizer.from_pretrained(out)  # prove the folder loads
    print(f"vocab {tok.vocab_size}, bos {tok.bos_token_id}, eos {tok.eos_token_id} ({tok.eos_token}) -> {out}")


def _int_list(value: str, flag: str, least: int) -> tuple[int, ...]:
    from minicpm4.errors import UserError

    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {value}: expected comma-separated integers, e.g. 8192,16384,32768") from None
    if not values or min(values) < least:
        raise UserError(f"{flag} {value}: expected integers >= {least}")
    return values


def cmd_frspec_index(args: argparse.Namespace) -> None:
    from minicpm4.data.frspec import FRSpecIndexConfig, build_frspec_index, print_summary
    from minicpm4.errors import UserError

    if args.model is not None and not args.model.is_dir():
        raise UserError(f"--model {args.model}: not a folder")
    for path in args.corpus:
        if not path.exists():
            raise UserError(f"--corpus {path}: no such file or folder")
    if args.max_lines < 0:
        raise UserError(f"--max-lines {args.max_lines}: expected 0 (everything) or a positive count")
    eos = None if args.eos_ids is None else _int_list(args.eos_ids, "--eos-ids", 0)
    config = FRSpecIndexConfig(sources=tuple(args.corpus), out_dir=args.out, model_dir=args.model,
                               sizes=_int_list(args.sizes, "--sizes", 1), max_lines=args.max_lines or None,
                               split=args.split, add_bos=args.add_bos, eos_ids=eos, show_progress=not args.quiet)
    print_summary(build_frspec_index(config))


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build the offline corpus, token shards and SFT data")
    steps = data.add_subparsers(dest="data_command", metavar="STEP")
    steps.required = True

    from minicpm4.data.ultraclean.cli import register_step as register_ultraclean

    register_ultraclean(steps)  # data ultraclean train | score | filter

    from minicpm4.data.synth.cli import register_step as register_synth

    register_synth(steps)  # data synth --track ... (UltraChat v2 tracks) | data synth review-apply

    from minicpm4.data.pool import register_step as register_pool

    register_pool(steps)  # data pool: the raw mixed-quality pool from Debian files

    p = steps.add_parser("build-corpus", help="clean, deduplicate and split the Debian text packages")
    p.add_argument("--out", type=Path, default=DATA / "corpus", help="output folder (default: %(default)s)")
    p.add_argument("--sources", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in val (default: %(default)s)")
    p.add_argument("--min-chars", type=int, default=20, help="drop shorter documents (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_source_options(p)
    p.set_defaults(func=cmd_build_corpus)

    p = steps.add_parser("shards", help="tokenize the corpus into memory-mapped train.bin / val.bin")
    p.add_argument("--corpus", type=Path, default=DATA / "corpus", help="corpus folder (default: %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=DATA / "tokenizer", help="tokenizer folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DATA / "shards", help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_shards)

    p = steps.add_parser("build-sft", help="synthesise chat SFT data with a held-out split by word/verse")
    p.add_argument("--out", type=Path, default=DATA / "sft", help="output folder (default: %(default)s)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="corpus folder: keep only held-out rows whose answer document is in its train split")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder: measure chat lengths and drop rows over --max-tokens")
    p.add_argument("--max-tokens", type=int, default=512, help="(with --tokenizer) default: %(default)s")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="share of keys held out (default: %(default)s)")
    p.add_argument("--max-train-per-task", type=int, default=20_000, help="default: %(default)s")
    p.add_argument("--max-heldout-per-task", type=int, default=1_000, help="default: %(default)s")
    p.add_argument("--tasks", default=None, help="comma-separated subset (default: all)")
    _add_source_options(p)
    p.set_defaults(func=cmd_build_sft)

    tok = sub.add_parser("tokenizer", help="train a tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="STEP")
    tsub.required = True
    p = tsub.add_parser("train", help="byte-level BPE with MiniCPM4's special tokens and ChatML, as HF files")
    p.add_argument("--corpus", type=Path, default=DATA / "corpus", help="corpus folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DATA / "tokenizer", help="output folder (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="default: %(default)s")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tokenizer_train)

    from minicpm4.data.frspec import DEFAULT_MAX_LINES, DEFAULT_SIZES

    p = sub.add_parser("frspec-index", help="FR-Spec: rank token ids by corpus frequency, write freq_N.pt (CPM.cu) "
                       "and frspec.json")
    p.add_argument("--model", "-m", type=Path, metavar="DIR", default=None,
                   help="model folder whose tokenizer and vocab size count (default: the bundled default model)")
    p.add_argument("--corpus", type=Path, action="append", required=True, metavar="PATH",
                   help="repeatable: a text file (one line = one text), a .jsonl with a \"text\" field, or a corpus "
                   "folder from `minicpm4 data build-corpus`")
    p.add_argument("--split", choices=["train", "val"], default="train", help="split of a corpus folder "
                   "(default: %(default)s)")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help="comma-separated index sizes N; sizes above the vocab size are clamped to it "
                   "(default: %(default)s, CPM.cu's)")
    p.add_argument("--max-lines", type=int, default=DEFAULT_MAX_LINES,
                   help="texts read over all sources; 0 = all (default: %(default)s, as CPM.cu over wikitext-103)")
    p.add_argument("--add-bos", action="store_true", help="count a BOS per text (CPM.cu's HF encode does)")
    p.add_argument("--eos-ids", default=None, metavar="IDS",
                   help="comma-separated ids forced into every index (default: config.json eos_token_id + the "
                   "tokenizer's eos_token)")
    p.add_argument("--out", type=Path, default=DATA / "frspec", help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_frspec_index)
