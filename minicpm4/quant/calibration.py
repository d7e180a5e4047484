"""Calibration sequences for GPTQ: token windows from the project's corpus shards or any token/text file.

Every sequence starts with BOS, then a window of the source, as prompts start at inference: the first positions
are where MiniCPM4's outlier activations sit (MINICPM4.md §4.5), which P-GPTQ leaves out of the Hessian, so
calibration must contain them where inference has them.

Sources (by what the path is):
  folder with meta.json   token shards of `minicpm4 data shards` (windows from the train split)
  .npy                    a 1-D array of token ids (e.g. a model's shipped val_tokens.npy)
  .jsonl                  one JSON object per line; its "text" field (or "messages" rendered with the chat template)
  anything else           UTF-8 text
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minicpm4.io import jsonl_records
from minicpm4.tokenizer import Tokenizer


def _token_stream(path: Path, tokenizer: Tokenizer | None) -> np.ndarray:
    if path.is_dir():
        from minicpm4.data.shards import TokenShards

        return np.asarray(TokenShards.open(path).train)
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if tokenizer is None:
        raise ValueError(f"calibration file {path}: a text/JSONL source needs the model's tokenizer")
    if path.suffix != ".jsonl":
        return np.asarray(tokenizer.encode(path.read_text(encoding="utf-8"), add_bos=False), dtype=np.int64)
    ids: list[int] = []
    for n, row in jsonl_records(path):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            ids += tokenizer.encode(row["text"], add_bos=False)
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            ids += tokenizer.encode_chat(row["messages"], add_generation_prompt=False)
        else:
            raise ValueError(f"{path}:{n}: expected an object with a \"text\" string or a \"messages\" list")
    return np.asarray(ids, dtype=np.int64)


def calibration_sequences(source: str | Path, tokenizer: Tokenizer | None, bos_token_id: int | None,
                          num_sequences: int = 128, seq_len: int = 256, seed: int = 0,
                          exclude: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """`num_sequences` windows of `seq_len` tokens (BOS included when the model has one), at random offsets
    (fixed seed). exclude: a (start, end) token range never sampled (e.g. the half of a file used to evaluate)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"calibration source {path} does not exist")
    if num_sequences <= 0 or seq_len < 2:
        raise ValueError(f"need num_sequences > 0 and seq_len >= 2, got {num_sequences}, {seq_len}")
    stream = _token_stream(path, tokenizer)
    body = seq_len - (bos_token_id is not None)
    starts = np.arange(0, max(len(stream) - body, 0) + 1)
    if exclude is not None:
        lo, hi = exclude
        starts = starts[(starts + body <= lo) | (starts >= hi)]
    if len(stream) < body or not len(starts):
        raise ValueError(f"calibration source {path} has {len(stream)} usable tokens; need at least {body} per sequence")
    rng = np.random.default_rng(seed)
    picks = rng.choice(starts, size=num_sequences, replace=len(starts) < num_sequences)
    out = []
    for s in sorted(int(p) for p in picks):
        window = torch.from_numpy(np.asarray(stream[s:s + body], dtype=np.int64))
        out.append(window if bos_token_id is None else torch.cat([torch.tensor([bos_token_id]), window]))
    return out
