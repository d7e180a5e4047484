"""Near-duplicate removal for synthesized samples: MinHash signatures of word shingles, an LSH index of what was
kept so far (datasketch), and the first text of each cluster kept.

Synthesis repeats itself (the same seed question rephrased, the same answer regenerated); exact hashing misses a
one-word change, MinHash over 5-word shingles does not. Text is normalised first (lowercase, punctuation
stripped, whitespace collapsed) so formatting alone never makes two texts different.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from minicpm4.errors import MissingDependency

_PUNCTUATION = re.compile(r"[^\w\s]")
# The LSH index only proposes candidates; each is then confirmed by its estimated Jaccard. Its banding is tuned
# for recall: with the default equal weights and threshold 0.8, 128 permutations give 9 bands of 13 rows, which
# misses 60% of pairs at Jaccard 0.8 and 37% at 0.84 (one word changed in 60); weighting false negatives 0.9
# gives 14 bands of 9 rows: 13% and 4% missed, and the extra candidates cost one signature comparison each.
LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative)


def _datasketch():
    try:
        import datasketch
    except ImportError:
        raise MissingDependency("near-duplicate removal", "datasketch", "data") from None
    return datasketch


def normalise(text: str) -> list[str]:
    """The words MinHash sees: lowercased, punctuation removed ("don't" -> "dont"), split on whitespace."""
    return _PUNCTUATION.sub("", text.lower()).split()


def shingles(text: str, n: int) -> set[str]:
    """The set of n-word shingles of the normalised text; a text shorter than n words is one shingle (so short
    texts still compare, exactly), and an empty one has none."""
    words = normalise(text)
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class NearDuplicateFilter:
    """Streaming filter: `add` keeps a text unless it nearly duplicates one kept before (estimated Jaccard of
    their shingle sets >= threshold)."""

    threshold: float = 0.8
    num_perm: int = 128
    shingle_words: int = 5
    seed: int = 1
    _lsh: object = field(init=False, repr=False)
    _signatures: dict = field(init=False, repr=False)  # key -> MinHash of a kept text
    _empty: object = field(init=False, repr=False)  # the MinHash of no shingles, copied for each text

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"NearDuplicateFilter: threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2 or self.shingle_words < 1:
            raise ValueError(f"NearDuplicateFilter: num_perm must be >= 2 and shingle_words >= 1 "
                             f"(got {self.num_perm}, {self.shingle_words})")
        ds = _datasketch()
        self._lsh = ds.MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, weights=LSH_WEIGHTS)
        self._signatures = {}
        # copying one empty MinHash draws its random permutations once, not per text (they depend only on
        # num_perm and seed) and keeps whatever hashing scheme this datasketch version uses
        self._empty = ds.MinHash(num_perm=self.num_perm, seed=self.seed)

    def __len__(self) -> int:
        return len(self._signatures)

    def _signature(self, text: str):
        m = self._empty.copy()
        m.update_batch([s.encode("utf-8") for s in shingles(text, self.shingle_words)])
        return m

    def _duplicates(self, signature) -> bool:
        return any(self._signatures[key].jaccard(signature) >= self.threshold for key in self._lsh.query(signature))

    def is_duplicate(self, text: str) -> bool:
        """Whether text nearly duplicates a text already added."""
        return self._duplicates(self._signature(text))

    def add(self, key: str, text: str) -> bool:
        """Add text under key and return True, unless it is a near duplicate: then add nothing, return False."""
        if key in self._signatures:
            raise ValueError(f"NearDuplicateFilter: key {key!r} was already added")
        signature = self._signature(text)
        if self._duplicates(signature):
            return False
        self._lsh.insert(key, signature)
        self._signatures[key] = signature
        return True


def near_duplicate_mask(texts: Sequence[str], **kw) -> list[bool]:
    """mask[i] is True when texts[i] should be dropped: it nearly duplicates an earlier kept text (the first of
    each cluster is kept). Keyword arguments configure NearDuplicateFilter."""
    kept = NearDuplicateFilter(**kw)
    return [not kept.add(str(i), text) for i, text in enumerate(texts)]
