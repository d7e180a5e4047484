"""Does a chat model answer held-out instruction questions? Generation-based scoring.

For each held-out row (user question, gold assistant answer) the model answers greedily and the
answer is scored by SQuAD-style bag-of-words F1 against the gold answer. Complements the
ScalingBench-style conditional loss (tunnel.py), which scores the gold answer's likelihood instead
of what the model actually says.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from minicpm4.api import Pipeline


@dataclass
class QARow:
    question: str
    answer: str
    task: str
    key: str


def read_heldout(path: str | Path, task: str | None = None, limit: int | None = None) -> list[QARow]:
    """Rows of an SFT jsonl file ({"messages": [user, assistant], "task", "key"}), optionally one task."""
    rows = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        msgs = obj.get("messages")
        if not (isinstance(msgs, list) and len(msgs) >= 2 and msgs[-1].get("role") == "assistant"):
            raise ValueError(f"{path}:{line_no}: 'messages' must end with an assistant turn")
        if task is None or obj.get("task") == task:
            rows.append(QARow(msgs[-2]["content"], msgs[-1]["content"], obj.get("task", ""), obj.get("key", "")))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def normalize_words(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def answer_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 between two texts after lower-casing and removing punctuation and articles."""
    pred, ref = normalize_words(prediction), normalize_words(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_generations(pipe: Pipeline, rows: list[QARow], max_new_tokens: int = 48, batch_size: int = 16) -> dict:
    """Greedy answers to every row; mean F1 and one example per 10 rows for the model card."""
    f1s, examples = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [[{"role": "user", "content": r.question}] for r in chunk]
        outs = pipe.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        for row, out in zip(chunk, outs):
            f1s.append(answer_f1(out.text, row.answer))
            if len(f1s) % 10 == 1:
                examples.append({"question": row.question, "gold": row.answer, "answer": out.text, "f1": f1s[-1]})
    return {"rows": len(f1s), "mean_f1": sum(f1s) / max(len(f1s), 1), "examples": examples}
