"""The survey writer's knowledge base: a JSONL of papers {id, title, abstract} and a search over it.

Two indexes behind one `search(queries, k)`: BM25 with `bm25s` (the offline default; English stopwords, no
stemming), or `faiss` inner product over normalised embeddings from an OpenAI-compatible /v1/embeddings
endpoint the user names (MiniCPM4-Survey used MiniCPM-Embedding-Light + Faiss over 2.7M arXiv abstracts,
MINICPM4.md §9.1). Several queries are searched separately and their hits interleaved by rank, duplicates
removed, so every query contributes its best documents.

A bad file is one clear error naming the file, the line and the field; ids must be unique and usable as
BibTeX keys (letters, digits, and - _ : .).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from minicpm4.errors import MissingDependency, UserError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:.\-]*$")


@dataclass(frozen=True)
class Paper:
    id: str
    title: str
    abstract: str


def load_kb(path: str | Path) -> list[Paper]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--kb {path}: no such file")
    papers: list[Paper] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected an object {{id, title, abstract}}")
            for key in ("id", "title", "abstract"):
                if not isinstance(record.get(key), str) or not record[key].strip():
                    raise UserError(f"{path}:{lineno}: field '{key}' must be a non-empty string")
            pid = record["id"]
            if not _ID.match(pid):
                raise UserError(f"{path}:{lineno}: id {pid!r} is not a usable citation key "
                                "(letters, digits, - _ : . only)")
            if pid in seen:
                raise UserError(f"{path}:{lineno}: id {pid!r} repeats line {seen[pid]}")
            seen[pid] = lineno
            papers.append(Paper(pid, record["title"].strip(), record["abstract"].strip()))
    if not papers:
        raise UserError(f"{path}: holds no papers")
    return papers


class Index(Protocol):
    papers: list[Paper]

    def search_one(self, query: str, k: int) -> list[int]: ...


def search(index: Index, queries: Sequence[str], k: int = 5) -> list[Paper]:
    """Up to k papers per query, interleaved by rank across queries, each paper once."""
    per_query = [index.search_one(q, k) for q in queries if q.strip()]
    out, seen = [], set()
    for rank in range(k):
        for hits in per_query:
            if rank < len(hits) and hits[rank] not in seen:
                seen.add(hits[rank])
                out.append(index.papers[hits[rank]])
    return out


def _text(p: Paper) -> str:
    return f"{p.title}. {p.abstract}"


class Bm25Index:
    def __init__(self, papers: list[Paper]) -> None:
        try:
            import bm25s
        except ImportError as e:
            raise MissingDependency("the survey knowledge base", "bm25s", "apps") from e
        self.papers = papers
        self._bm25s = bm25s
        self._model = bm25s.BM25()
        self._model.index(bm25s.tokenize([_text(p) for p in papers], stopwords="en", show_progress=False),
                          show_progress=False)

    def search_one(self, query: str, k: int) -> list[int]:
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:  # only stopwords / nothing indexable
            return []
        ids, scores = self._model.retrieve(tokens, k=min(k, len(self.papers)), show_progress=False)
        return [int(i) for i, s in zip(ids[0], scores[0]) if s > 0]


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> np.ndarray: ...


class EndpointEmbedder:
    """POST {base_url}/embeddings (OpenAI format) in batches; returns float32 rows."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, batch: int = 64,
                 timeout: float = 120.0) -> None:
        self.url, self.model, self.api_key, self.batch, self.timeout = base_url.rstrip("/"), model, api_key, batch, timeout

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        for start in range(0, len(texts), self.batch):
            body = json.dumps({"model": self.model, "input": texts[start:start + self.batch]}).encode()
            headers = {"Content-Type": "application/json"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            req = urllib.request.Request(self.url + "/embeddings", data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read())["data"]
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                raise UserError(f"{self.url}/embeddings: no embeddings ({e})") from e
            rows += [d["embedding"] for d in sorted(data, key=lambda d: d.get("index", 0))]
        return np.asarray(rows, dtype=np.float32)


class FaissIndex:
    """Cosine similarity (inner product of L2-normalised embeddings) with an exact faiss IndexFlatIP."""

    def __init__(self, papers: list[Paper], embedder: Embedder) -> None:
        try:
            import faiss
        except ImportError as e:
            raise MissingDependency("--index faiss", "faiss-cpu", "apps") from e
        self.papers, self.embedder = papers, embedder
        vectors = self._normalised(embedder.embed([_text(p) for p in papers]))
        self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(vectors)

    @staticmethod
    def _normalised(v: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(v, dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def search_one(self, query: str, k: int) -> list[int]:
        _, ids = self._index.search(self._normalised(self.embedder.embed([query])), min(k, len(self.papers)))
        return [int(i) for i in ids[0] if i >= 0]
