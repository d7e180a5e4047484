"""The UltraClean classifier: fastText supervised training on positives vs balanced random negatives from the
raw pool, scoring, and filtering at a threshold (MINICPM4.md §8.1: dim 256, lr 0.1, wordNgrams 3, minCount 5,
3 epochs, threshold 0.5). Uses `fasttext-numpy2` (the `fasttext` wheels crash in predict() under numpy 2).

A document's score is the classifier's probability of the positive label; `filter` keeps score >= threshold.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from minicpm4.data.ultraclean.preprocess import fasttext_words
from minicpm4.errors import MissingDependency

POSITIVE, NEGATIVE = "__label__hq", "__label__lq"


@dataclass(frozen=True)
class FastTextConfig:
    dim: int = 256
    lr: float = 0.1
    word_ngrams: int = 3
    min_count: int = 5
    epoch: int = 3
    threads: int = 2
    seed: int = 0
    # hash buckets for the word n-grams: fastText's default, which the report does not change. The model file is
    # about bucket x dim x 4 bytes (2.06 GB at the defaults) and every pipeline task loads it; 200,000 buckets
    # give a ~200 MB file at the price of more n-gram collisions
    bucket: int = 2_000_000


def _fasttext():
    try:
        import fasttext
    except ImportError as e:
        raise MissingDependency("the UltraClean classifier", "fasttext-numpy2", "data") from e
    return fasttext


def balanced_negatives(pool: Sequence[str], count: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """`count` documents drawn at random from the raw pool (fewer if it is smaller), skipping positives."""
    candidates = [d for d in pool if d not in exclude]
    return random.Random(seed).sample(candidates, min(count, len(candidates)))


class QualityClassifier:
    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def train(cls, positives: Sequence[str], negatives: Sequence[str], tokenizer,
              cfg: FastTextConfig = FastTextConfig()) -> "QualityClassifier":
        if not positives or not negatives:
            raise ValueError("training needs positives and negatives (got "
                             f"{len(positives)} and {len(negatives)})")
        lines = [f"{POSITIVE} {fasttext_words(d, tokenizer)}" for d in positives] + \
                [f"{NEGATIVE} {fasttext_words(d, tokenizer)}" for d in negatives]
        random.Random(cfg.seed).shuffle(lines)
        fd, path = tempfile.mkstemp(suffix=".txt", prefix="ultraclean-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            model = _fasttext().train_supervised(input=path, dim=cfg.dim, lr=cfg.lr, wordNgrams=cfg.word_ngrams,
                                                 minCount=cfg.min_count, epoch=cfg.epoch, thread=cfg.threads,
                                                 seed=cfg.seed, bucket=cfg.bucket, verbose=0)
        finally:
            os.unlink(path)
        return cls(model, tokenizer)

    @classmethod
    def load(cls, path: str | Path, tokenizer) -> "QualityClassifier":
        return cls(_fasttext().load_model(str(path)), tokenizer)

    def save(self, path: str | Path) -> None:
        from minicpm4.io import atomic_path

        with atomic_path(path) as tmp:
            self.model.save_model(str(tmp))

    def scores(self, texts: Iterable[str]) -> list[float]:
        words = [fasttext_words(t, self.tokenizer) for t in texts]
        if not words:
            return []
        labels, probs = self.model.predict(words, k=2)
        return [float(dict(zip(ls, ps)).get(POSITIVE, 0.0)) for ls, ps in zip(labels, probs)]


def keep(scores: Sequence[float], threshold: float = 0.5) -> list[bool]:
    return [s >= threshold for s in scores]
