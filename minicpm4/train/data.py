"""Packed pretraining batches from token shards, with deterministic, resumable sampling.

Shard format (written by minicpm4.data): a folder with train.bin / val.bin, flat numpy arrays of token
ids (dtype from meta.json "dtype"), documents stored back to back as [BOS] tokens [EOS], and meta.json
{"dtype", "vocab_size", "bos_token_id", "eos_token_id", "num_tokens", ...}.

Packing: the token stream is cut into windows of seq_len + 1 tokens at stride seq_len (window w covers
tokens[w*T : w*T + T + 1]); inputs are its first T tokens, labels the last T. Document boundaries fall
anywhere in a window; the segment ids (a new one at each BOS) let the trainer mask attention per document.

Sampling: the whole data position is ONE integer, the number of samples consumed so far (`samples`).
Sample g is window permutation_{epoch}[g mod n] with epoch = g // n and the permutation seeded by
(seed, epoch): no state but the counter, so a resumed run, or one on a different world size with the same
global batch, reads exactly the same windows. Within a step, the global batch is the samples
[samples, samples + B*A*W) and micro-batch m of rank r takes the contiguous block at (m*W + r)*B, so ranks
read disjoint windows and the step's set of samples does not depend on how it is split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from minicpm4.attention.document_mask import segment_ids_from_bos


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64; IGNORE_INDEX where no loss
    segment_ids: torch.Tensor | None = None  # [B, T]; None: one document per row (plain causal attention)

    def to(self, device: torch.device | str) -> Batch:
        seg = None if self.segment_ids is None else self.segment_ids.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), seg)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


class PackedDataset(Protocol):
    seq_len: int

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> Batch: ...


# ---- shard files ---------------------------------------------------------------------------------

def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no meta.json (expected a token-shard folder with train.bin, val.bin, meta.json)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key in ("dtype", "vocab_size"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def open_tokens(folder: str | Path, split: str = "train") -> np.ndarray:
    """The split's token ids as a read-only 1-D memmap. (minicpm4.data.shards.TokenShards reads the same
    files; this tiny reader keeps training independent of it.)"""
    folder = Path(folder)
    meta = read_meta(folder)
    path = folder / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size == 0:  # np.memmap cannot map an empty file (e.g. a corpus without a val split)
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ---- sampling ------------------------------------------------------------------------------------

class EpochSampler:
    """Global sample counter g -> item index: a fresh seeded permutation of the n items every epoch.
    (Holds one permutation in memory: fine to ~10^8 windows; beyond that use a blockwise shuffle.)"""

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_items < 1:
            raise ValueError("the dataset has no complete sample: add data or lower --seq-len")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self._perm = lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def __call__(self, g: int) -> int:
        epoch, i = divmod(g, self.num_items)
        return int(self._perm(epoch)[i]) if self.shuffle else i


def micro_batch_indices(samples: int, micro: int, rank: int, world_size: int, micro_batch_size: int) -> range:
    """Global sample counters of micro-batch `micro` on `rank` in the step starting at `samples` (module doc)."""
    start = samples + (micro * world_size + rank) * micro_batch_size
    return range(start, start + micro_batch_size)


# ---- pretraining windows -------------------------------------------------------------------------

class TokenWindows:
    """Fixed windows of seq_len + 1 tokens over one token array (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, bos_token_id: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens, self.seq_len, self.bos_token_id = tokens, seq_len, bos_token_id

    @classmethod
    def from_folder(cls, folder: str | Path, split: str, seq_len: int) -> TokenWindows:
        meta = read_meta(folder)
        return cls(open_tokens(folder, split), seq_len, meta.get("bos_token_id"))

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: Sequence[int]) -> Batch:
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[w * T: w * T + T + 1], dtype=np.int64) for w in indices])
        ids = torch.from_numpy(rows)  # [B, T+1]
        inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        seg = None if self.bos_token_id is None else segment_ids_from_bos(inputs, self.bos_token_id)
        return Batch(inputs, labels, seg)


class SyntheticTokens(TokenWindows):
    """Random documents for benchmarks and smoke tests (no data folder): ids in [3, vocab), BOS=1, EOS=2."""

    def __init__(self, vocab_size: int, seq_len: int, num_tokens: int = 1 << 20, seed: int = 0, doc_len: int = 700) -> None:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(3, vocab_size, size=num_tokens, dtype=np.int64)
        tokens[::doc_len] = 1
        tokens[doc_len - 1::doc_len] = 2
        super().__init__(tokens, seq_len, bos_token_id=1)


class MixtureWindows:
    """Windows of several token streams mixed at fixed fractions: the annealing mixes of UltraClean verification
    (30% candidate + 70% default mix, MINICPM4.md §8.1).

    Item k of the mixture is a window of stream j for k in stream j's block of round(fraction_j * length) items;
    within a block, stream j's windows follow a seeded permutation, cycled when the block is longer than the
    stream (a small candidate set is repeated rather than under-weighted). The trainer's sampler then shuffles the
    items, so any span of samples holds each stream at its fraction up to sampling noise (`fraction_of` counts it).
    """

    def __init__(self, streams: Sequence[TokenWindows], fractions: Sequence[float], length: int | None = None,
                 seed: int = 0) -> None:
        if len(streams) != len(fractions) or not streams:
            raise ValueError("give one fraction per stream")
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
        seq_lens = {s.seq_len for s in streams}
        if len(seq_lens) != 1:
            raise ValueError(f"every stream must be packed at one seq_len, got {sorted(seq_lens)}")
        for j, (s, f) in enumerate(zip(streams, fractions)):
            if f > 0 and len(s) == 0:
                raise ValueError(f"stream {j} has no complete window of {s.seq_len + 1} tokens")
        self.seq_len = seq_lens.pop()
        self.streams, self.fractions = list(streams), list(fractions)
        # default length: every window of the largest-fraction stream once per epoch
        main = max(range(len(streams)), key=lambda j: fractions[j])
        self.length = length or max(1, round(len(streams[main]) / fractions[main]))
        counts = [round(f * self.length) for f in fractions]
        counts[main] += self.length - sum(counts)
        self.block_starts = np.cumsum([0] + counts)
        self._perms = [np.random.default_rng([seed, j]).permutation(len(s)) if len(s) else np.zeros(0, np.int64)
                       for j, s in enumerate(streams)]

    def __len__(self) -> int:
        return self.length

    def locate(self, item: int) -> tuple[int, int]:
        """Item -> (stream, window index in that stream)."""
        j = int(np.searchsorted(self.block_starts, item, side="right") - 1)
        k = item - int(self.block_starts[j])
        perm = self._perms[j]
        return j, int(perm[k % len(perm)])

    def batch(self, indices: Sequence[int]) -> Batch:
        parts = [self.locate(i) for i in indices]
        rows = [self.streams[j].batch([w]) for j, w in parts]
        seg = None if any(r.segment_ids is None for r in rows) else torch.cat([r.segment_ids for r in rows])
        return Batch(torch.cat([r.input_ids for r in rows]), torch.cat([r.labels for r in rows]), seg)

    def fraction_of(self, stream: int, items: Sequence[int]) -> float:
        """The share of `items` (e.g. the samples a run consumed) that come from `stream`."""
        return sum(self.locate(i)[0] == stream for i in items) / max(len(items), 1)
