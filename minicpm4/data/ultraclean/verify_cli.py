"""`minicpm4 data ultraclean verify | iterate`: efficient verification (verify.py) and the UltraClean loop (loop.py).

    minicpm4 data ultraclean verify --stable runs/stable --default-data build/data/shards \\
        --candidate man=man.jsonl --candidate changelog=changelog.jsonl \\
        --eval-text knowledge=knowledge_val.jsonl --heldout build/data/sft/heldout.jsonl --out runs/verify
    minicpm4 data ultraclean iterate --stable runs/stable --default-data build/data/shards \\
        --seed-set manuals=html.jsonl --seed-set changelogs=changelog.jsonl --pool build/data/pool/pool.jsonl \\
        --eval-text knowledge=knowledge_val.jsonl --rounds 2 --out runs/ultraclean-loop

--stable is a trainer run (or one checkpoint) still in its stable phase, e.g. `minicpm4 train pretrain ... --decay 0`.
The default mix is the train split of --default-data; its val split is always evaluated (loss/default_val).
Every arm is cached under --out/arms, so a rerun resumes and reuses the default arm.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from minicpm4.errors import UserError


def register_verify(inner: argparse._SubParsersAction) -> None:
    from minicpm4.data.ultraclean.verify import AnnealConfig

    d = AnnealConfig()
    v = inner.add_parser("verify", help="anneal on candidate + default mix vs default mix alone, from a stable checkpoint")
    v.add_argument("--candidate", action="append", required=True, metavar="NAME=JSONL|SHARDS",
                   help="repeatable; a token-shard folder: its train split (for candidates too big to re-tokenise)")
    it = inner.add_parser("iterate", help="the UltraClean loop: verify seeds, train, filter, verify, relabel, repeat")
    it.add_argument("--seed-set", action="append", required=True, metavar="NAME=JSONL", help="repeatable")
    it.add_argument("--pool", required=True, metavar="JSONL", help="the raw pool to filter (and draw negatives from)")
    it.add_argument("--rounds", type=int, default=2)
    it.add_argument("--threshold", type=float, default=0.5)
    it.add_argument("--max-pool-docs", type=int, default=None, help="use the first N pool documents")
    g = it.add_argument_group("fastText (defaults: the report's; small seed sets need more --epoch, e.g. 25)")
    from minicpm4.data.ultraclean.cli import add_fasttext_options

    add_fasttext_options(g)
    for p in (v, it):
        p.add_argument("--stable", required=True, metavar="RUN_OR_CHECKPOINT")
        p.add_argument("--default-data", required=True, metavar="SHARDS", help="token shards: train.bin = default mix")
        p.add_argument("--eval-text", action="append", default=[], metavar="NAME=JSONL|SHARDS",
                       help="held-out text for a validation loss (repeatable; a shards folder: its val split)")
        p.add_argument("--heldout", default=None, metavar="SFT_JSONL", help="held-out QA rows for the answer NLL")
        p.add_argument("--heldout-task", default="definition", help="the rows' task (default: %(default)s)")
        p.add_argument("--primary", default="", help="metric that decides 'verified' (default: the first eval text)")
        p.add_argument("--tokenizer", default=None, metavar="DIR", help="default: the one the shards were built with")
        p.add_argument("--steps", type=int, default=d.steps, help="annealing steps per arm")
        p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated")
        p.add_argument("--candidate-fraction", type=float, default=d.candidate_fraction)
        p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
        p.add_argument("--min-gain", type=float, default=d.min_gain)
        p.add_argument("--keep-checkpoints", action="store_true")
        p.add_argument("--out", required=True, metavar="DIR")
    v.set_defaults(func=cmd_verify)
    it.set_defaults(func=cmd_iterate)


def _named(specs: list[str], flag: str) -> dict[str, Path]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag} {spec!r}: expected NAME=PATH")
        if name in out:
            raise UserError(f"{flag}: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


def _texts(path: Path) -> list[str]:
    from minicpm4.data.ultraclean.cli import read_documents

    return [d["text"] for d in read_documents(path)]


class _Setup:
    """What both commands share: the stable checkpoint, the encoder, the default mix, the evaluations."""

    def __init__(self, a: argparse.Namespace) -> None:
        from minicpm4.data.shards import DocumentEncoder
        from minicpm4.data.ultraclean.verify import AnnealConfig, EvalSets, StableCheckpoint, Verifier
        from minicpm4.train.chat_eval import read_heldout
        from minicpm4.train.data import open_tokens, read_meta

        try:
            seeds = tuple(int(s) for s in a.seeds.split(",") if s.strip())
        except ValueError:
            raise UserError(f"--seeds {a.seeds!r}: expected comma-separated integers") from None
        cfg = AnnealConfig(steps=a.steps, candidate_fraction=a.candidate_fraction, seeds=seeds,
                           eval_tokens=a.eval_tokens, min_gain=a.min_gain, keep_checkpoints=a.keep_checkpoints)
        stable = StableCheckpoint.open(a.stable)
        try:
            meta = read_meta(a.default_data)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--default-data: {e}") from None
        tokenizer_dir = a.tokenizer or meta.get("tokenizer")
        if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
            raise UserError(f"--tokenizer: give the tokenizer folder (the shards name {tokenizer_dir!r})")
        self.encoder = DocumentEncoder(tokenizer_dir)
        if self.encoder.tokenizer.vocab_size > stable.model_config.vocab_size:
            raise UserError(f"--tokenizer {tokenizer_dir}: {self.encoder.tokenizer.vocab_size} ids, the model has "
                            f"{stable.model_config.vocab_size}")
        losses = {name: self._eval_tokens(path) for name, path in _named(a.eval_text, "--eval-text").items()}
        losses["default_val"] = np.asarray(open_tokens(a.default_data, "val"))
        answers = read_heldout(a.heldout, task=a.heldout_task) if a.heldout else []
        if a.heldout and not answers:
            raise UserError(f"--heldout {a.heldout}: no rows of task {a.heldout_task!r}")
        evals = EvalSets(losses, answers, self.encoder.tokenizer, a.primary)
        self.out = Path(a.out)
        self.verifier = Verifier(stable, np.asarray(open_tokens(a.default_data, "train")), evals, cfg, self.out,
                                 self.encoder.bos)

    def _eval_tokens(self, path: Path) -> np.ndarray:
        from minicpm4.train.data import open_tokens

        return np.asarray(open_tokens(path, "val")) if path.is_dir() else self.encode(_texts(path))

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)[0].astype(np.int64)

    def write(self, report: dict, comparisons) -> None:
        from minicpm4.data.ultraclean.verify import markdown_table
        from minicpm4.io import write_text_atomic

        names = self.verifier.evals.metric_names
        report = {**report, "anneal": self.verifier.cfg.__dict__, "stable": str(self.verifier.stable.path),
                  "stable_step": self.verifier.stable.state.step, "primary": self.verifier.evals.primary}
        write_text_atomic(self.out / "report.json", json.dumps(report, indent=1, default=list) + "\n")
        table = markdown_table(comparisons, names)
        write_text_atomic(self.out / "report.md", table)
        print(table + f"\n-> {self.out / 'report.json'}, {self.out / 'report.md'}")


def cmd_verify(a: argparse.Namespace) -> None:
    setup = _Setup(a)
    comparisons = []
    from minicpm4.train.data import open_tokens, read_meta

    for name, path in _named(a.candidate, "--candidate").items():
        if path.is_dir():
            documents = int(read_meta(path).get("num_documents", {}).get("train", 0))
            comparisons.append(setup.verifier.compare(name, np.asarray(open_tokens(path, "train")), documents))
        else:
            texts = _texts(path)
            comparisons.append(setup.verifier.compare(name, setup.encode(texts), documents=len(texts)))
    setup.write({"comparisons": [c.to_dict() for c in comparisons]}, comparisons)


def cmd_iterate(a: argparse.Namespace) -> None:
    from minicpm4.data.ultraclean.cli import fasttext_config
    from minicpm4.data.ultraclean.loop import LoopConfig, run_loop

    if a.rounds < 1:
        raise UserError(f"--rounds: must be >= 1, got {a.rounds}")
    if not 0.0 <= a.threshold <= 1.0:
        raise UserError(f"--threshold: must be in [0, 1], got {a.threshold}")
    setup = _Setup(a)
    seed_sets = {name: _texts(path) for name, path in _named(a.seed_set, "--seed-set").items()}
    pool = _texts(Path(a.pool))[: a.max_pool_docs]
    report = run_loop(setup.verifier, setup.encode, seed_sets, pool, setup.encoder.tokenizer,
                      LoopConfig(rounds=a.rounds, threshold=a.threshold, fasttext=fasttext_config(a)), setup.out)
    setup.write(report.to_dict(), report.comparisons)
