"""FR-Spec frequency index: the N most frequent token ids of a corpus, the draft's reduced vocabulary.

FR-Spec (MINICPM4.md §4.4) drafts over a frequency-ranked subset V_high of the vocabulary: the draft's LM
head becomes W_LM[V_high] ([N, hidden]) and its top-k indices are mapped back through the id list before
the next embedding lookup. The target still verifies over the full vocabulary, so greedy output does not
change; a better V_high only raises acceptance. This module builds that id list:

    tokenize texts with the model's own tokenizer -> count ids ([V] int64) -> rank by count -> keep the
    top N with every EOS id forced in (the draft must be able to propose "stop") -> write the id list.

Files (`minicpm4 frspec-index --out DIR` writes all of them together, atomically):

    freq_{N}.pt   CPM.cu's format, read by `--frspec-path DIR --frspec-vocab-size N`: `torch.save` of a plain
                  Python list of N ints (what scripts/fr_spec/gen_fr_index.py writes); CPM.cu reads it with
                  `torch.tensor(torch.load(f, weights_only=True), dtype=torch.int32)` and copies exactly N ids.
    frspec.json   ours: every size's ids plus what made them (corpus, tokenizer, vocab size, EOS ids, token
                  counts) and its coverage = share of the counted tokens that fall inside the top N.

Order of an index: descending count, ties by the smaller id (torch's stable sort), so one corpus always gives
the same bytes. A forced EOS id sits where its count ranks it: inside the top N it stays put, and when it is
rarer than every kept id it comes last, which is where CPM.cu appends it. Ids never seen in the corpus fill
the tail (by id) only when N exceeds the distinct ids seen; CPM.cu refuses to save such an index.

Deliberate differences from gen_fr_index.py: no BOS by default (HF `encode` there prepends one to every line,
so BOS ranks near the top and is drafted for nothing; `add_bos=True` restores it), every EOS id of config.json
is forced (CPM.cu forces the tokenizer's eos_token only), and ties are broken by id, not by first sighting.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from minicpm4.data import progress
from minicpm4.io import atomic_paths, jsonl_records

FORMAT = "minicpm4.frspec"
FORMAT_VERSION = 1
JSON_NAME = "frspec.json"
# CPM.cu's gen_fr_index.py defaults: sizes 8192/16384/32768 over 1,000,000 lines of wikitext-103; MiniCPM4
# ships freq_32768.pt (≈44.6% of its 73,448 ids).
DEFAULT_SIZES = (8192, 16384, 32768)
DEFAULT_MAX_LINES = 1_000_000
_FREQ_FILE = re.compile(r"^freq_(\d+)\.pt$")


def cpmcu_name(n: int) -> str:
    return f"freq_{n}.pt"


@dataclass
class FRSpecIndexConfig:
    """What `build_frspec_index` reads and writes. A wrong value fails with the field's name."""

    sources: tuple[Path, ...]  # text files (one line = one text), .jsonl with a "text" field, corpus folders
    out_dir: Path
    model_dir: Path | None = None  # None: the bundled default model (its tokenizer and vocab size)
    sizes: tuple[int, ...] = DEFAULT_SIZES  # sizes above the vocab size are clamped to it (with a note)
    max_lines: int | None = DEFAULT_MAX_LINES  # texts read over all sources together; None = all
    split: str = "train"  # which split of a corpus folder (minicpm4/data/corpus.py)
    add_bos: bool = False  # count a BOS per text, as CPM.cu's HF `encode` does
    allow_special: bool = True  # text that spells "<|im_end|>" is that token, as in HF `encode`
    eos_ids: tuple[int, ...] | None = None  # forced in; None = config.json eos_token_id + the tokenizer's eos
    batch_size: int = 1024  # texts per encode_batch call (parallel in the Rust tokenizer)
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.sources = tuple(Path(s) for s in self.sources)
        self.out_dir = Path(self.out_dir)
        self.model_dir = None if self.model_dir is None else Path(self.model_dir)
        self.sizes = tuple(self.sizes)
        if not self.sources:
            raise ValueError("sources: give at least one text file, .jsonl file or corpus folder")
        if not self.sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.sizes):
            raise ValueError(f"sizes: expected positive integers, got {self.sizes!r}")
        if self.max_lines is not None and (not isinstance(self.max_lines, int) or self.max_lines < 1):
            raise ValueError(f"max_lines: expected a positive integer or None, got {self.max_lines!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size!r}")
        if self.split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {self.split!r}")
        if self.eos_ids is not None:
            self.eos_ids = tuple(int(e) for e in self.eos_ids)


@dataclass
class FRSpecIndex:
    """One index: ids [N] int32 in rank order, their corpus counts [N] int64, and the share of tokens covered."""

    ids: torch.Tensor
    counts: torch.Tensor
    coverage: float

    @property
    def n(self) -> int:
        return int(self.ids.numel())


# ---- counting and ranking --------------------------------------------------------------------------

def _batch_encoder(tokenizer: Any, allow_special: bool) -> Callable[[list[str]], list[list[int]]] | None:
    """encode_batch on minicpm4.tokenizer.Tokenizer's `tokenizers` backend (parallel, in Rust), or None for
    a tokenizer without one. It must equal Tokenizer.encode(add_bos=False); count_token_ids checks a batch."""
    backend = getattr(tokenizer, "_backend", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    if not allow_special:  # a private copy: flipping the flag on the shared backend is not thread-safe
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(backend.to_str())
        backend.encode_special_tokens = True
    return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def count_token_ids(texts: Iterable[str], tokenizer: Any, vocab_size: int, *, add_bos: bool = False,
                    allow_special: bool = True, batch_size: int = 1024, show_progress: bool = False) -> torch.Tensor:
    """How often each id occurs when every text is encoded alone: int64 [vocab_size].
    Equals summing Counter(tokenizer.encode(t, add_bos=add_bos, allow_special=allow_special)) over texts."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    fast = _batch_encoder(tokenizer, allow_special)
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise ValueError("add_bos: the tokenizer names no bos_token")
    checked = False
    it = iter(texts)
    with progress(desc="frspec count", unit="text", disable=not show_progress) as bar:
        while batch := list(islice(it, batch_size)):
            if fast is None:
                encoded = [tokenizer.encode(t, add_bos=False, allow_special=allow_special) for t in batch]
            else:
                encoded = fast(batch)
                if not checked:
                    want = tokenizer.encode(batch[0], add_bos=False, allow_special=allow_special)
                    assert encoded[0] == want, "encode_batch differs from Tokenizer.encode: the counts would be wrong"
                    checked = True
            flat = torch.tensor([i for ids in encoded for i in ids], dtype=torch.int64)
            if flat.numel() and int(flat.max()) >= vocab_size:
                raise ValueError(f"vocab_size: the tokenizer produced id {int(flat.max())}, outside [0, {vocab_size})")
            counts += torch.bincount(flat, minlength=vocab_size)
            if bos is not None:
                counts[bos] += len(batch)
            bar.update(len(batch))
    return counts


def rank_ids(counts: torch.Tensor) -> torch.Tensor:
    """Every id by descending count, ties by the smaller id: int64 [V]. A stable sort keeps equal counts in
    index order, which is what makes the index reproducible (Counter order in CPM.cu depends on the text)."""
    return torch.sort(counts, descending=True, stable=True).indices


def frequency_index(counts: torch.Tensor, n: int, eos_ids: Sequence[int] = ()) -> torch.Tensor:
    """The n most frequent ids with every id of eos_ids forced in: int32 [n] in rank order.

    The forced ids take the places of the tail of the ranking; each then sits where its count ranks it, so an
    EOS rarer than every kept id comes last (see the module docstring)."""
    if counts.dim() != 1:
        raise ValueError(f"counts: expected a 1-D tensor [vocab_size], got shape {tuple(counts.shape)}")
    vocab_size = counts.numel()
    eos = sorted({int(e) for e in eos_ids})
    if bad := [e for e in eos if not 0 <= e < vocab_size]:
        raise ValueError(f"eos_ids: {bad} outside the vocabulary [0, {vocab_size})")
    if not max(1, len(eos)) <= n <= vocab_size:
        raise ValueError(f"n: must be between {max(1, len(eos))} (the number of EOS ids, at least 1) and the "
                         f"vocab size {vocab_size}, got {n}")
    order = rank_ids(counts)
    forced = torch.zeros(vocab_size, dtype=torch.bool)
    forced[eos] = True
    chosen = forced.clone()
    chosen[order[~forced[order]][: n - len(eos)]] = True
    return order[chosen[order]].to(torch.int32)


def build_index(counts: torch.Tensor, n: int, eos_ids: Sequence[int] = ()) -> FRSpecIndex:
    ids = frequency_index(counts, n, eos_ids)
    top = counts[ids.long()]
    total = int(counts.sum())
    return FRSpecIndex(ids, top, float(top.sum()) / total if total else 0.0)


# ---- text sources ----------------------------------------------------------------------------------

def _texts_of(path: Path, split: str) -> Iterator[str]:
    if path.is_dir():
        from minicpm4.data.corpus import iter_corpus

        yield from (doc.text for doc in iter_corpus(path, split))
    elif path.suffix == ".jsonl":
        for lineno, row in jsonl_records(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string \"text\" field")
            yield row["text"]
    elif path.is_file():
        with open(path, encoding="utf-8") as f:
            yield from (line.rstrip("\r\n") for line in f)  # one line = one text, without its line break
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")


def iter_texts(sources: Sequence[str | Path], max_lines: int | None = None, split: str = "train") -> Iterator[str]:
    """The texts of each source in turn, at most max_lines over all of them (CPM.cu: 1M lines of wikitext)."""
    texts = chain.from_iterable(_texts_of(Path(s), split) for s in sources)
    return texts if max_lines is None else islice(texts, max_lines)


# ---- files -----------------------------------------------------------------------------------------

def _check_ids(ids: Any, where: str, n: int | None) -> torch.Tensor:
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: not a list of token ids: {e}") from None
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{where}: expected a 1-D list of integer token ids, got {t.dtype} of shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{where}: negative token id {int(t.min())}")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{where}: token ids repeat")
    if n is not None and t.numel() != n:
        raise ValueError(f"{where}: holds {t.numel()} ids, expected n = {n}")
    return t


def _write_cpmcu(path: Path, ids: torch.Tensor) -> None:
    # A plain list of ints, as gen_fr_index.py saves it: torch.load(weights_only=True) reads it anywhere.
    with open(path, "wb") as f:
        torch.save([int(i) for i in ids], f)


def save_cpmcu_index(ids: torch.Tensor | Sequence[int], path: str | Path) -> Path:
    """Write one CPM.cu `freq_{N}.pt` (atomically)."""
    path = Path(path)
    ids = _check_ids(ids, str(path), None)
    with atomic_paths({0: path}) as temps:
        _write_cpmcu(temps[0], ids)
    return path


def frspec_record(indexes: Sequence[FRSpecIndex], **meta: Any) -> dict:
    """Our frspec.json: the metadata, then one entry per size (ids and their counts in rank order)."""
    return {"format": FORMAT, "version": FORMAT_VERSION, **meta,
            "order": "descending count, ties by the smaller id; forced EOS ids where their count ranks them",
            "indexes": [{"n": ix.n, "coverage": round(ix.coverage, 6), "ids": ix.ids.tolist(),
                         "counts": ix.counts.tolist()} for ix in indexes]}


def write_frspec_files(out_dir: str | Path, indexes: Sequence[FRSpecIndex], **meta: Any) -> list[Path]:
    """freq_{N}.pt for each index plus frspec.json (with meta), all renamed into place together."""
    out = Path(out_dir)
    targets = {ix.n: out / cpmcu_name(ix.n) for ix in indexes}
    targets[0] = out / JSON_NAME  # n >= 1, so key 0 is free for the JSON
    record = frspec_record(indexes, **meta)
    with atomic_paths(targets) as temps:
        for ix in indexes:
            _write_cpmcu(temps[ix.n], ix.ids)
        temps[0].write_text(json.dumps(record) + "\n", encoding="utf-8")
    return list(targets.values())


def _load_pt(path: Path, n: int | None) -> torch.Tensor:
    try:
        with open(path, "rb") as f:
            data = torch.load(f, weights_only=True)
    except Exception as e:  # OSError, RuntimeError, pickle.UnpicklingError (not a torch.save, or not weights-only)
        raise ValueError(f"cannot read {path}: {e}") from None
    return _check_ids(data, str(path), n)


def _load_json(path: Path, n: int | None) -> torch.Tensor:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("indexes"), list):
        raise ValueError(f"{path}: not a {FORMAT} file (written by `minicpm4 frspec-index`)")
    entries = {int(e["n"]): e for e in record["indexes"]}
    if not entries:
        raise ValueError(f"{path}: holds no index")
    if n is not None and n not in entries:
        raise ValueError(f"n: {path} has no index of size {n}; it has {sorted(entries)}")
    return _check_ids(entries[max(entries) if n is None else n]["ids"], str(path), n)


def load_frspec_index(path: str | Path, n: int | None = None) -> torch.Tensor:
    """Token ids [N] int64 from a freq_{N}.pt, our frspec.json, or a folder holding either.
    In a folder, n picks freq_{n}.pt (else frspec.json's size-n index); n=None takes the largest."""
    path = Path(path)
    if path.is_dir():
        sizes = {int(m[1]): path / m[0] for p in path.iterdir() if (m := _FREQ_FILE.match(p.name))}
        if n is None and sizes:
            return _load_pt(sizes[max(sizes)], None)
        if n is not None and n in sizes:
            return _load_pt(sizes[n], n)
        if (path / JSON_NAME).is_file():
            return _load_json(path / JSON_NAME, n)
        if sizes:
            raise ValueError(f"n: {path} has no {cpmcu_name(n)}; it has sizes {sorted(sizes)}")
        raise FileNotFoundError(f"{path}: no freq_N.pt or {JSON_NAME} (write them with `minicpm4 frspec-index`)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return _load_json(path, n) if path.suffix == ".json" else _load_pt(path, n)


# ---- the whole job ---------------------------------------------------------------------------------

def resolve_model_dir(model_dir: Path | None) -> Path:
    """The folder whose tokenizer counts: the given one, else the bundled default model (else the bundled
    MiniCPM4-0.5B tokenizer assets, as the CLI's other commands fall back)."""
    if model_dir is not None:
        return model_dir
    from minicpm4.api import BUNDLED_TOKENIZER_DIR, DEFAULT_MODEL_DIR, has_default_model

    return DEFAULT_MODEL_DIR if has_default_model() else BUNDLED_TOKENIZER_DIR


def resolve_sizes(sizes: Sequence[int], vocab_size: int) -> tuple[list[int], list[str]]:
    """Sorted unique sizes with any above vocab_size clamped to it (an index of every id), plus a note each."""
    notes = [f"size {n} > vocab size {vocab_size}: using {vocab_size} (the whole vocabulary)"
             for n in sizes if n > vocab_size]
    return sorted({min(n, vocab_size) for n in sizes}), notes


def build_frspec_index(config: FRSpecIndexConfig) -> dict:
    """Count the sources' tokens, build one index per size, write freq_{N}.pt + frspec.json to out_dir.
    Returns the metadata written, with each size's coverage (no ids) and the notes on clamped sizes."""
    from minicpm4.config import MiniCPMConfig
    from minicpm4.tokenizer import Tokenizer

    model_dir = resolve_model_dir(config.model_dir)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    if (model_dir / "config.json").is_file():  # the draft head has the model's vocab, which may pad the tokenizer's
        model_config = MiniCPMConfig.from_json(model_dir)
        vocab_size, config_eos = model_config.vocab_size, model_config.eos_token_ids
    else:
        vocab_size, config_eos = tokenizer.vocab_size, []
    if config.eos_ids is not None:
        eos_ids = sorted(set(config.eos_ids))
    else:
        eos_ids = sorted(set(config_eos) | ({tokenizer.eos_token_id} - {None}))
    sizes, notes = resolve_sizes(config.sizes, vocab_size)

    texts = _Counted(iter_texts(config.sources, config.max_lines, config.split))
    counts = count_token_ids(texts, tokenizer, vocab_size, add_bos=config.add_bos,
                             allow_special=config.allow_special, batch_size=config.batch_size,
                             show_progress=config.show_progress)
    indexes = [build_index(counts, n, eos_ids) for n in sizes]
    distinct = int((counts > 0).sum())
    notes += [f"size {n} > {distinct} distinct ids seen: the last {n - distinct} ids never occur (ordered by id)"
              for n in sizes if n > distinct]
    meta = {"tokenizer": str(model_dir), "vocab_size": vocab_size, "eos_ids": eos_ids,
            "add_bos": config.add_bos, "allow_special": config.allow_special,
            "corpus": [str(s) for s in config.sources], "split": config.split, "max_lines": config.max_lines,
            "num_texts": texts.n, "num_tokens": int(counts.sum()), "distinct_tokens": distinct}
    paths = write_frspec_files(config.out_dir, indexes, **meta)
    return {**meta, "sizes": {ix.n: ix.coverage for ix in indexes}, "notes": notes, "paths": [str(p) for p in paths]}


@dataclass
class _Counted:
    """Wrap an iterator and count what passed through (texts read, for the metadata)."""

    it: Iterator[str]
    n: int = field(default=0)

    def __iter__(self) -> Iterator[str]:
        for x in self.it:
            self.n += 1
            yield x


def print_summary(summary: dict, file: Any = None) -> None:
    """Coverage per size on file (default: sys.stdout at call time), the notes on stderr."""
    file = file or sys.stdout
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"{summary['num_texts']:,} texts, {summary['num_tokens']:,} tokens, {summary['distinct_tokens']:,} distinct "
          f"ids of {summary['vocab_size']:,} (EOS forced in: {summary['eos_ids']})", file=file)
    for n, coverage in summary["sizes"].items():
        print(f"  N = {n:>6,} ({n / summary['vocab_size']:6.1%} of the vocab): covers {coverage:7.2%} of tokens",
              file=file)
    print(f"-> {Path(summary['paths'][0]).parent}", file=file)
