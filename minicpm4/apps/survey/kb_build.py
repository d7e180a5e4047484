"""`minicpm4 survey build-kb`: the shipped knowledge base, offline, from the corpus's dictionaries.

The report's knowledge base is 2.7M arXiv abstracts; ours must be built without a network, so its "papers" are
the longest entries of FOLDOC (computing, GFDL-1.1+) and the Jargon File 4.4.7 (public domain), as Debian's
dict-foldoc / dict-jargon install them (minicpm4.data.sources reads them). Title: the headword; abstract: the
entry's text without the headword lines and FOLDOC's "<category>" tags, cut at a sentence end to at most
`abstract_chars`; id: "foldoc-<slug>" / "jargon-<slug>", unique.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from minicpm4.data.sources import SourcePaths, dictd_entries
from minicpm4.io import write_text_atomic

_TAG = re.compile(r"^\s*<[^<>\n]{1,80}>\s*")
_DATE = re.compile(r"\s*\(\d{4}-\d{2}-\d{2}\)\s*$")


@dataclass(frozen=True)
class KbSource:
    name: str  # a dictd database
    count: int  # entries taken, longest first
    min_chars: int = 200


DEFAULT_SOURCES = (KbSource("foldoc", 1200), KbSource("jargon", 400))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "entry"


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    return head[: end + 1] if end > limit // 3 else head.rsplit(" ", 1)[0] + " …"


def entry_paper(headword_line: str, text: str, abstract_chars: int | None = None) -> tuple[str, str]:
    """(title, abstract) of a cleaned dictd entry (headword lines, a blank line, the body); the abstract is
    cut to abstract_chars when given."""
    parts = text.split("\n\n", 1)
    title = parts[0].split("\n", 1)[0].strip() or headword_line
    body = parts[1] if len(parts) > 1 else ""
    paragraphs = [_TAG.sub("", p).strip() for p in body.split("\n\n")]
    abstract = _DATE.sub("", " ".join(" ".join(p.split()) for p in paragraphs if p))
    return title, abstract if abstract_chars is None else _cut(abstract, abstract_chars)


def build_kb(out: str | Path, paths: SourcePaths | None = None, sources=DEFAULT_SOURCES,
             abstract_chars: int = 500) -> int:
    paths = paths or SourcePaths()
    records, ids = [], set()
    for src in sources:
        entries = []
        for headword, text in dictd_entries(src.name, paths):
            title, abstract = entry_paper(headword, text)
            if len(abstract) >= src.min_chars:
                entries.append((len(text), title, _cut(abstract, abstract_chars)))
        entries.sort(key=lambda e: (-e[0], e[1]))
        for _, title, abstract in entries[: src.count]:
            base = pid = f"{src.name}-{slug(title)}"
            n = 2
            while pid in ids:
                pid, n = f"{base}-{n}", n + 1
            ids.add(pid)
            records.append({"id": pid, "title": title, "abstract": abstract})
    records.sort(key=lambda r: r["id"])
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)
