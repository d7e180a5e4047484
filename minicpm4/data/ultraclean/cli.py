"""`minicpm4 data ultraclean train | score | filter`: the UltraClean fastText classifier on JSONL documents
({"text": ...}, other fields kept). `pipeline` runs it as a datatrove pipeline (pipeline_cli.py); `verify` and
`iterate` are the annealing verification and the UltraClean loop (verify_cli.py).

    minicpm4 data ultraclean train --positives seeds.jsonl --pool raw.jsonl --out quality.bin
    minicpm4 data ultraclean score --model quality.bin --input raw.jsonl --out scored.jsonl     # adds "quality"
    minicpm4 data ultraclean filter --model quality.bin --input raw.jsonl --out kept.jsonl [--threshold 0.5]

Negatives are drawn at random from --pool, as many as there are positives (balanced, MINICPM4.md §8.1).
Tokenizer: --tokenizer DIR (default: the bundled default model's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minicpm4.errors import UserError


def register_step(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("ultraclean", help="UltraClean quality filtering: train | score | filter | pipeline | verify | iterate",
                         description=__doc__.split("\n\n")[0])
    inner = p.add_subparsers(dest="ultraclean_command", metavar="{train,score,filter,pipeline,verify,iterate}")
    inner.required = True
    t = inner.add_parser("train", help="train on positives vs balanced random negatives from the raw pool")
    t.add_argument("--positives", required=True, metavar="JSONL")
    t.add_argument("--pool", required=True, metavar="JSONL", help="the raw pool negatives are sampled from")
    t.add_argument("--out", required=True, metavar="FILE", help="the fastText model (.bin)")
    add_fasttext_options(t)
    t.set_defaults(func=cmd_train)
    for name, help_ in (("score", "add each document's quality score"), ("filter", "keep documents scoring >= threshold")):
        s = inner.add_parser(name, help=help_)
        s.add_argument("--model", required=True, metavar="FILE")
        s.add_argument("--input", required=True, metavar="JSONL")
        s.add_argument("--out", required=True, metavar="JSONL")
        s.add_argument("--threshold", type=float, default=0.5)
        s.add_argument("--field", default="quality", help="name of the score field written")
        s.set_defaults(func=cmd_score if name == "score" else cmd_filter)
    for sp in (t, *[inner.choices[n] for n in ("score", "filter")]):
        sp.add_argument("--tokenizer", default=None, metavar="DIR", help="default: the bundled default model's")

    from minicpm4.data.ultraclean.pipeline_cli import register_pipeline

    register_pipeline(inner)  # data ultraclean pipeline: the same classifier as a datatrove pipeline

    from minicpm4.data.ultraclean.verify_cli import register_verify

    register_verify(inner)  # data ultraclean verify | iterate: annealing verification and the UltraClean loop


def add_fasttext_options(p: argparse.ArgumentParser) -> None:
    """fastText's training settings, defaulting to the report's (FastTextConfig)."""
    from minicpm4.data.ultraclean.classifier import FastTextConfig

    d = FastTextConfig()
    for name, value in (("dim", d.dim), ("lr", d.lr), ("word-ngrams", d.word_ngrams), ("min-count", d.min_count),
                        ("epoch", d.epoch), ("seed", d.seed), ("threads", d.threads), ("bucket", d.bucket)):
        p.add_argument(f"--{name}", type=type(value), default=value)


def fasttext_config(a: argparse.Namespace):
    from minicpm4.data.ultraclean.classifier import FastTextConfig

    return FastTextConfig(dim=a.dim, lr=a.lr, word_ngrams=a.word_ngrams, min_count=a.min_count, epoch=a.epoch,
                          threads=a.threads, seed=a.seed, bucket=a.bucket)


def read_documents(path: str | Path) -> list[dict]:
    from minicpm4.io import jsonl_records

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    docs = []
    for lineno, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{lineno}: expected an object with a string field 'text'")
        docs.append(record)
    if not docs:
        raise UserError(f"{path}: holds no documents")
    return docs


def _tokenizer(a: argparse.Namespace):
    from minicpm4.api import DEFAULT_MODEL_DIR
    from minicpm4.tokenizer import Tokenizer

    folder = Path(a.tokenizer) if a.tokenizer else DEFAULT_MODEL_DIR
    if not folder.is_dir():
        raise UserError(f"--tokenizer {folder}: not a folder")
    return Tokenizer.from_pretrained(folder)


def cmd_train(a: argparse.Namespace) -> None:
    from minicpm4.data.ultraclean.classifier import QualityClassifier, balanced_negatives

    positives = [d["text"] for d in read_documents(a.positives)]
    pool = [d["text"] for d in read_documents(a.pool)]
    negatives = balanced_negatives(pool, len(positives), a.seed, exclude=set(positives))
    cfg = fasttext_config(a)
    t0 = time.perf_counter()
    clf = QualityClassifier.train(positives, negatives, _tokenizer(a), cfg)
    clf.save(a.out)
    print(f"trained on {len(positives)} positives + {len(negatives)} negatives in {time.perf_counter() - t0:.1f}s "
          f"-> {a.out}")


def _scored(a: argparse.Namespace) -> tuple[list[dict], list[float]]:
    from minicpm4.data.ultraclean.classifier import QualityClassifier

    if not Path(a.model).is_file():
        raise UserError(f"--model {a.model}: no such file")
    if not 0.0 <= a.threshold <= 1.0:
        raise UserError(f"--threshold: must be in [0, 1], got {a.threshold}")
    clf = QualityClassifier.load(a.model, _tokenizer(a))
    docs = read_documents(a.input)
    t0 = time.perf_counter()
    scores = clf.scores(d["text"] for d in docs)
    dt = time.perf_counter() - t0
    print(f"scored {len(docs)} documents in {dt:.2f}s ({len(docs) / max(dt, 1e-9):,.0f} docs/s, "
          f"preprocessing + tokenising included)", file=sys.stderr)
    return docs, scores


def _write(path: str | Path, docs: list[dict]) -> None:
    from minicpm4.io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))


def cmd_score(a: argparse.Namespace) -> None:
    docs, scores = _scored(a)
    _write(a.out, [{**d, a.field: round(s, 6)} for d, s in zip(docs, scores)])


def cmd_filter(a: argparse.Namespace) -> None:
    from minicpm4.data.ultraclean.classifier import keep

    docs, scores = _scored(a)
    kept = [d for d, k in zip(docs, keep(scores, a.threshold)) if k]
    _write(a.out, kept)
    print(f"kept {len(kept)} of {len(docs)} documents (score >= {a.threshold})")
