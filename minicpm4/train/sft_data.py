"""SFT data: OpenAI-style chat JSONL -> ChatML token ids with an assistant-only loss mask, packed.

Input: one JSON object per line, {"messages": [{"role": "system"|"user"|"assistant"|..., "content": str}, ...]}.

The loss-mask rule (tested in tests/test_train.py):
  ids = tokenizer.encode_chat(messages, add_generation_prompt=False)   (BOS + ChatML, MINICPM4.md §2.5)
  For each assistant message k:
      start = len(encode_chat(messages[:k], add_generation_prompt=True))   -> just after "<|im_start|>assistant\n"
      end   = encode_chat(messages[:k+1], add_generation_prompt=False)     -> ends with "<|im_end|>", "▁", "\n"
      trained tokens: ids[start : position of the last <|im_end|> in `end`] inclusive
  i.e. the assistant's content tokens and its closing <|im_end|> (so the model learns to stop), never the
  "<|im_start|>assistant\n" header, the "\n" after <|im_end|>, BOS, or any system/user/tool token.
  Both encodings must be prefixes of `ids` (ChatML puts a special token at every message boundary, so the
  tokenizer cannot merge across it); if a tokenizer merges the header's "\n" into the content, training
  starts at the first differing token (that token carries content) and the prefix check still guards `end`.
A token at position t is a training target iff its flag is set: in the shifted layout, labels[t] = ids[t+1]
when flag[t+1], else IGNORE_INDEX.

Packing: conversations are concatenated in file order into rows of seq_len + 1 tokens (next-fit: a
conversation that does not fit in the current row starts a new one); each keeps its own segment id so
attention never crosses conversations (attention/document_mask.py); the tail is padded with pad_id, flag False and its
own segment. A conversation longer than seq_len + 1 is truncated (counted in `stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from minicpm4.io import jsonl_records
from minicpm4.tokenizer import Tokenizer
from minicpm4.train.data import Batch
from minicpm4.train.losses import IGNORE_INDEX

IM_END = "<|im_end|>"


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """The `messages` lists of a JSONL file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    conversations = []
    for lineno, record in jsonl_records(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}:{lineno}: expected {{\"messages\": [...]}} with at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{path}:{lineno}: messages[{i}] needs string 'role' and 'content'")
        conversations.append(messages)
    return conversations


def encode_conversation(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, trained) for one conversation: the rule in the module docstring."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    trained = [False] * len(ids)
    im_end = tokenizer.token_to_id(IM_END)
    if im_end is None:
        raise ValueError(f"the tokenizer has no {IM_END} token; SFT needs a ChatML tokenizer")
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = tokenizer.encode_chat(messages[:k], add_generation_prompt=True)
        start = next((i for i, (a, b) in enumerate(zip(header, ids)) if a != b), min(len(header), len(ids)))
        upto = tokenizer.encode_chat(messages[: k + 1], add_generation_prompt=False)
        if ids[: len(upto)] != upto or im_end not in upto[start:]:
            raise ValueError(f"assistant message {k}: its ChatML rendering is not a token prefix of the whole "
                             "conversation; cannot place the loss mask")
        stop = len(upto) - 1 - upto[::-1].index(im_end)  # the closing <|im_end|>
        for i in range(start, stop + 1):
            trained[i] = True
    return ids, trained


@dataclass
class PackStats:
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing to train on after truncation
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0


@dataclass
class PackedConversations:
    """Rows of packed conversations; `batch(indices)` gives the trainer's shifted layout."""

    seq_len: int
    pad_id: int
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # (ids, trained, segment)
    stats: PackStats = field(default_factory=PackStats)

    @classmethod
    def build(cls, examples: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> PackedConversations:
        out = cls(seq_len, pad_id)
        cap = seq_len + 1
        cur: list[tuple[list[int], list[bool]]] = []
        used = 0
        for ids, trained in examples:
            out.stats.conversations += 1
            if len(ids) > cap:
                ids, trained = ids[:cap], trained[:cap]
                out.stats.truncated += 1
            if not any(trained[1:]):  # position 0 of a row is never a target
                out.stats.dropped += 1
                continue
            if used + len(ids) > cap:
                out._add_row(cur)
                cur, used = [], 0
            cur.append((ids, trained))
            used += len(ids)
        if cur:
            out._add_row(cur)
        return out

    def _add_row(self, convs: list[tuple[list[int], list[bool]]]) -> None:
        cap = self.seq_len + 1
        ids = np.full(cap, self.pad_id, dtype=np.int64)
        trained = np.zeros(cap, dtype=bool)
        seg = np.full(cap, len(convs), dtype=np.int64)  # padding: a segment of its own
        pos = 0
        for s, (c_ids, c_trained) in enumerate(convs):
            n = len(c_ids)
            ids[pos:pos + n], trained[pos:pos + n], seg[pos:pos + n] = c_ids, c_trained, s
            pos += n
        self.rows.append((ids, trained, seg))
        self.stats.rows += 1
        self.stats.tokens += pos
        self.stats.trained_tokens += int(trained[1:].sum())

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int]) -> Batch:
        ids = torch.from_numpy(np.stack([self.rows[i][0] for i in indices]))  # [B, T+1]
        trained = torch.from_numpy(np.stack([self.rows[i][1] for i in indices]))
        seg = torch.from_numpy(np.stack([self.rows[i][2] for i in indices]))
        labels = torch.where(trained[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
        return Batch(ids[:, :-1].contiguous(), labels.contiguous(), seg[:, :-1].contiguous())


def load_sft(path: str | Path, tokenizer: Tokenizer, seq_len: int) -> PackedConversations:
    pad_id = tokenizer.token_to_id(IM_END)  # never a target where it pads (flag False); any id would do
    examples = [encode_conversation(tokenizer, messages) for messages in read_jsonl(path)]
    packed = PackedConversations.build(examples, seq_len, pad_id)
    if len(packed) == 0:
        raise ValueError(f"{path}: no conversation with an assistant turn to train on")
    return packed
