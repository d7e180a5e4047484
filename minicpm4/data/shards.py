"""Token shards: the corpus tokenized into flat, memory-mapped arrays for pretraining.

A shard folder holds (minicpm4/train/data.py reads the same files; change both or neither):

    train.bin, val.bin   token ids back to back, no header, dtype meta["dtype"]: np.memmap(path, dtype)
    meta.json            {"dtype": "uint16" | "uint32", "vocab_size", "bos_token_id", "eos_token_id",
                          "num_tokens": {"train", "val"}, "num_documents": {"train", "val"},
                          "tokenizer": the folder as given, "corpus": the folder as given,
                          "sources": {name: {"documents": {"train", "val"}, "tokens": {"train", "val"}}}}

Every document is stored as [BOS] + tokens + [EOS], so packing is reading a contiguous window; a
trainer may reset attention at each BOS. The EOS here is "</s>" (id 2 with our tokenizer), the end of a
document, not the chat end-of-turn "<|im_end|>". Text that spells a special token ("<|im_start|>") is
encoded as plain text: pretraining data must not forge chat-control tokens.

The writer streams: one batch of documents is in memory at a time, as numpy arrays, and the .bin files
are renamed into place only when complete; meta.json is written last, so a folder whose meta.json
matches its .bin sizes is complete (TokenShards.open checks that).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from minicpm4.data import progress
from minicpm4.data.corpus import SPLITS, iter_corpus
from minicpm4.data.sources import Document
from minicpm4.io import atomic_paths, write_text_atomic
from minicpm4.tokenizer import Tokenizer

DOC_EOS = "</s>"


@dataclass
class TokenShards:
    folder: Path
    meta: dict
    train: np.ndarray  # np.memmap, read-only, 1-D
    val: np.ndarray

    @classmethod
    def open(cls, folder: str | Path) -> TokenShards:
        folder = Path(folder)
        path = folder / "meta.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no meta.json (build shards with `minicpm4 data shards`)")
        meta = json.loads(path.read_text(encoding="utf-8"))
        for key in ("dtype", "vocab_size", "bos_token_id", "eos_token_id", "num_tokens"):
            if key not in meta:
                raise ValueError(f"{path}: missing key {key!r}")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"{path}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for split in SPLITS:
            bin_path = folder / f"{split}.bin"
            if not bin_path.is_file():
                raise FileNotFoundError(f"{bin_path}: no such file")
            expected = int(meta["num_tokens"][split])
            if bin_path.stat().st_size != expected * dtype.itemsize:
                raise ValueError(f"{bin_path}: {bin_path.stat().st_size} bytes, but meta.json num_tokens.{split} = "
                                 f"{expected} {dtype} tokens (an interrupted write? rebuild the shards)")
            # np.memmap cannot map an empty file; an empty split is a plain empty array
            arrays[split] = np.memmap(bin_path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
        return cls(folder, meta, arrays["train"], arrays["val"])


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _batches(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class DocumentEncoder:
    """Documents -> one flat id array, each stored as [BOS] + tokens + [EOS], encoded in parallel batches by the
    tokenizer's Rust backend exactly as Tokenizer.encode would (checked on the first document)."""

    def __init__(self, tokenizer_dir: str | Path) -> None:
        from tokenizers import Tokenizer as Backend

        tok = Tokenizer.from_pretrained(tokenizer_dir)  # validates the folder and gives the ids the model uses
        self.tokenizer = tok
        self.backend = Backend.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.backend.encode_special_tokens = True
        self.bos, self.eos = tok.bos_token_id, tok.token_to_id(DOC_EOS)
        if self.bos is None or self.eos is None:
            raise ValueError(f"{tokenizer_dir}: needs a bos_token and a {DOC_EOS!r} token")
        self.dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
        self._checked = False

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all documents back to back, each document's length in ids including BOS and EOS)."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        if encodings and not self._checked:
            want = self.tokenizer.encode(texts[0], add_bos=False, allow_special=False)
            assert encodings[0].ids == want, "batch encoding differs from Tokenizer.encode: the shards would be wrong"
            self._checked = True
        lengths = np.array([len(e.ids) + 2 for e in encodings], dtype=np.int64)
        ids = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for enc, n in zip(encodings, lengths):
            ids[pos], ids[pos + 1 : pos + n - 1], ids[pos + n - 1] = self.bos, enc.ids, self.eos
            pos += n
        return ids, lengths


def write_shards(corpus_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, batch_size: int = 1024,
                 show_progress: bool = True) -> dict:
    """Tokenize corpus_dir/{train,val}.jsonl into out_dir/{train,val}.bin + meta.json; return the meta."""
    start = time.perf_counter()
    encoder = DocumentEncoder(tokenizer_dir)
    tok, bos, eos, dtype = encoder.tokenizer, encoder.bos, encoder.eos, encoder.dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_tokens, num_docs, sources = {}, {}, {}
    with atomic_paths({split: out / f"{split}.bin" for split in SPLITS}) as temps:
        for split in SPLITS:
            n_tok = n_doc = 0
            total = _count_lines(Path(corpus_dir) / f"{split}.jsonl")
            with temps[split].open("wb") as f, progress(total=total, desc=f"shards {split}", unit="doc",
                                                        disable=not show_progress) as bar:
                for batch in _batches(iter_corpus(corpus_dir, split), batch_size):
                    ids, lengths = encoder.encode([d.text for d in batch])
                    for doc, n in zip(batch, lengths):
                        counts = sources.setdefault(doc.source, {"documents": dict.fromkeys(SPLITS, 0),
                                                                 "tokens": dict.fromkeys(SPLITS, 0)})
                        counts["documents"][split] += 1
                        counts["tokens"][split] += int(n)
                    f.write(ids.tobytes())
                    n_tok += len(ids)
                    n_doc += len(batch)
                    bar.update(len(batch))
            num_tokens[split], num_docs[split] = n_tok, n_doc
    meta = {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "tokenizer": str(tokenizer_dir),
        "corpus": str(corpus_dir),
        "sources": dict(sorted(sources.items())),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_text_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta
