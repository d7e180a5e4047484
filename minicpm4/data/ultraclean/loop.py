"""The UltraClean loop of MINICPM4.md §8.1, with verification at every step:

  1. verify each candidate seed set; the sets with a significant gain become the positives;
  2. negatives are drawn at random from the raw pool, as many as positives (balanced);
  3. train the fastText classifier, filter the pool at the threshold, and verify the filtered output the same
     way (and, as the yardstick, the unfiltered pool at equal tokens);
  4. iterate: the next round trains on what the current classifier labels (its highest-scoring pool documents
     plus the verified seeds as positives, pool documents it rejects as negatives);
  5. keep only classifiers that are stable under verification: the filtered output verifies, and its gain does
     not fall below the previous kept round's by more than the seed noise.
Each comparison costs one annealing per seed per arm (verify.py); the default arm is shared by all of them.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from minicpm4.data.ultraclean.classifier import FastTextConfig, QualityClassifier, balanced_negatives, keep
from minicpm4.data.ultraclean.verify import Comparison, Verifier


@dataclass(frozen=True)
class LoopConfig:
    rounds: int = 2
    threshold: float = 0.5
    fasttext: FastTextConfig = FastTextConfig()
    max_positives: int = 2000  # pool documents the current classifier labels positive, for the next round
    negatives_per_positive: float = 1.0  # the positive/negative ratio the report tunes between rounds
    seed: int = 0


@dataclass
class RoundReport:
    round: int
    positives: int
    negatives: int
    kept: int  # pool documents at or above the threshold
    pool: int
    agreement: float | None  # Jaccard overlap of the kept set with the previous round's (None in round 1)
    comparison: Comparison | None  # None when the classifier kept nothing
    stable: bool
    classifier: str

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["comparison"] = None if self.comparison is None else self.comparison.to_dict()
        return d


@dataclass
class LoopReport:
    seeds: list[Comparison]
    unfiltered: Comparison | None = None
    rounds: list[RoundReport] = field(default_factory=list)
    chosen_round: int | None = None  # the last stable classifier

    @property
    def comparisons(self) -> list[Comparison]:
        rounds = [r.comparison for r in self.rounds if r.comparison is not None]
        return self.seeds + ([self.unfiltered] if self.unfiltered else []) + rounds

    def to_dict(self) -> dict:
        return {"seeds": [c.to_dict() for c in self.seeds],
                "unfiltered": None if self.unfiltered is None else self.unfiltered.to_dict(),
                "rounds": [r.to_dict() for r in self.rounds], "chosen_round": self.chosen_round}


def is_stable(current: Comparison, previous: Comparison | None, significance: float) -> bool:
    """Verified, and (after the first kept round) not worse than the previous kept round beyond the noise."""
    if not current.verified:
        return False
    if previous is None:
        return True
    now, before = current.metrics[current.primary], previous.metrics[previous.primary]
    noise = math.sqrt(now.stderr ** 2 + before.stderr ** 2)
    return now.gain >= before.gain - significance * noise


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(len(a | b), 1)


def run_loop(verifier: Verifier, encode: Callable[[list[str]], np.ndarray], seed_sets: dict[str, list[str]],
             pool: Sequence[str], tokenizer, cfg: LoopConfig, work_dir: str | Path,
             log: Callable[[str], None] = print) -> LoopReport:
    """encode(texts) -> the token stream of those documents ([BOS] doc [EOS] ...), as the model reads them."""
    work = Path(work_dir)
    seeds = []
    for name, texts in seed_sets.items():
        seeds.append(verifier.compare(name, encode(texts), documents=len(texts)))
        log(f"seed set {name}: gain {_gain(seeds[-1])} -> {'verified' if seeds[-1].verified else 'not verified'}")
    report = LoopReport(seeds)
    verified = [c.name for c in seeds if c.verified]
    seed_positives = [t for name in verified for t in seed_sets[name]]
    if not seed_positives:
        log("no seed set verified: nothing to train a classifier on")
        return report
    report.unfiltered = verifier.compare("pool", encode(list(pool)), documents=len(pool))
    log(f"unfiltered pool: gain {_gain(report.unfiltered)}")

    positives = seed_positives
    negatives = balanced_negatives(pool, round(len(positives) * cfg.negatives_per_positive), cfg.seed,
                                   exclude=set(positives))
    previous_kept: set[int] | None = None
    last_stable: Comparison | None = None
    for r in range(1, cfg.rounds + 1):
        ft = dataclasses.replace(cfg.fasttext, seed=cfg.fasttext.seed + r)
        clf = QualityClassifier.train(positives, negatives, tokenizer, ft)
        path = work / f"round{r}" / "classifier.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        clf.save(path)
        scores = clf.scores(pool)
        if max(scores) - min(scores) < 0.05:  # fastText makes one update per document: few documents, no learning
            log(f"round {r}: warning: every pool score is within [{min(scores):.3f}, {max(scores):.3f}]: the classifier "
                "barely trained (more seed documents or more epochs)")
        kept_idx = {i for i, k in enumerate(keep(scores, cfg.threshold)) if k}
        kept = [pool[i] for i in sorted(kept_idx)]
        comparison = verifier.compare(f"filtered-r{r}", encode(kept), documents=len(kept)) if kept else None
        stable = comparison is not None and is_stable(comparison, last_stable, verifier.cfg.significance)
        agreement = None if previous_kept is None else _jaccard(kept_idx, previous_kept)
        report.rounds.append(RoundReport(r, len(positives), len(negatives), len(kept), len(pool), agreement,
                                         comparison, stable, str(path)))
        log(f"round {r}: {len(positives)} positives, {len(negatives)} negatives -> kept {len(kept)}/{len(pool)}"
            + (f", gain {_gain(comparison)}" if comparison else "") + (" (stable)" if stable else " (not stable)"))
        if stable:
            report.chosen_round, last_stable = r, comparison
        previous_kept = kept_idx
        # next round: the current classifier labels the training data
        ranked = sorted(kept_idx, key=lambda i: -scores[i])[: cfg.max_positives]
        positives = seed_positives + [pool[i] for i in ranked]
        rejected = [pool[i] for i in range(len(pool)) if i not in kept_idx]
        want = round(len(positives) * cfg.negatives_per_positive)
        negatives = random.Random(cfg.seed + r).sample(rejected, min(want, len(rejected))) if rejected else negatives
    return report


def _gain(c: Comparison) -> str:
    m = c.metrics[c.primary]
    return f"{m.gain:+.4f} ± {m.stderr:.4f} ({c.primary})"
