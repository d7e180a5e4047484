import json

import pytest

from minicpm4.api import demo_pipeline
from minicpm4.train.chat_eval import QARow, answer_f1, read_heldout, score_generations


def test_answer_f1():
    assert answer_f1("The cat sat.", "a cat sat") == 1.0
    assert answer_f1("dog", "cat") == 0.0
    # pred {large, dog}, ref {large, cat, small}: P = 1/2, R = 1/3 -> F1 = 0.4
    assert answer_f1("large dog", "large cat, small") == pytest.approx(0.4)


def test_read_heldout_filters_task_and_validates(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "task": "definition" if i % 2 else "verse", "key": str(i)} for i in range(6)]
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_heldout(path, task="definition", limit=2)
    assert [(r.question, r.answer) for r in got] == [("q1", "a1"), ("q3", "a3")]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ValueError, match="h.jsonl:1"):
        read_heldout(path)


def test_score_generations_runs_on_a_model():
    pipe = demo_pipeline(seed=0)
    rows = [QARow("What is x?", "x is a letter", "definition", "x")]
    result = score_generations(pipe, rows, max_new_tokens=4)
    assert result["rows"] == 1 and 0.0 <= result["mean_f1"] <= 1.0 and result["examples"][0]["question"] == "What is x?"
