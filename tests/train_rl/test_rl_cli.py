"""`minicpm4 train rl` end to end on the bundled default model: a user task file with a user reward (updates
happen), the shipped math set (held-out accuracy before/after), resume, and flag errors."""

from __future__ import annotations

import json

from minicpm4.cli import main
from minicpm4.train.metrics import read_metrics

SMALL = ["--steps", "3", "--max-len", "12", "--chunk-len", "4", "--group-size", "2", "--prompts-per-step", "2",
         "--train-groups", "1", "--eval-limit", "3", "--lr", "1e-3", "--threads", "1"]


def test_user_tasks_and_reward_train_and_resume(tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "kind": "echo", "prompt": f"Say something about {w}."}) + "\n"
                             for i, w in enumerate(["cats", "rivers", "stars", "bread"])))
    out = tmp_path / "run"
    argv = ["train", "rl", "--task", str(tasks), "--reward", "tests.train_rl.user_reward:response_length",
            "--out", str(out), "--save-every", "1", *SMALL]
    assert main(argv) == 0, capsys.readouterr().err
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert any(r.get("updated") for r in records) and any(r["resumed"] for r in records)
    assert (out / "final" / "config.json").is_file() and (out / "metrics.png").is_file()
    assert "before" not in json.loads((out / "eval.json").read_text())  # a task file without --eval-tasks
    # Resuming a finished run continues from its last checkpoint and ends at the same step count.
    assert main(argv + ["--resume"]) == 0
    assert "resumed at step" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_shipped_math_set_reports_held_out_accuracy(tmp_path, capsys):
    out = tmp_path / "math"
    assert main(["train", "rl", "--task", "math", "--out", str(out), *SMALL]) == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    for key in ("before", "after"):
        assert result[key]["tasks"] == 3 and 0.0 <= result[key]["accuracy"] <= 1.0


def test_bad_flags_give_one_clear_error(tmp_path, capsys):
    base = ["train", "rl", "--out", str(tmp_path / "x")]
    assert main(base + ["--task", "nope.jsonl"]) == 2
    assert "--task nope.jsonl" in capsys.readouterr().err
    assert main(base + ["--task", "math", "--max-len", "8", "--chunk-len", "9"]) == 2
    assert "chunk_tokens" in capsys.readouterr().err
    assert main(base + ["--task", "math", "--reward", "no.such.module:f"]) == 2
    assert "cannot load" in capsys.readouterr().err
