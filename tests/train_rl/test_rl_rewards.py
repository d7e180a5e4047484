"""Verifiable rewards (minicpm4/train/rl/rewards.py): golden cases for answer and code extraction, math-verify
equality (also from worker threads), sandboxed code tests, user reward loading and batching."""

from __future__ import annotations

import threading
import time

import pytest

from minicpm4.errors import UserError
from minicpm4.train.rl.rewards import (batch_rewards, code_reward, extract_answer, extract_code, load_reward,
                                       math_reward, reward_for_kind, run_code_tests)
from minicpm4.train.rl.tasks import RLTask


def math_task(answer: str) -> RLTask:
    return RLTask(id="m", kind="math", prompt="?", answer=answer)


ADD_ONE = RLTask(id="c", kind="code", prompt="?", entry_point="add_one",
                 tests=("assert add_one(1) == 2", "assert add_one(-1) == 0", "assert add_one(10) == 11",
                        "assert add_one(0) == 1"))


def fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}\n```\nDone."


@pytest.mark.parametrize("response, expected", [
    ("Answer: 8", "8"),
    ("First 3 + 5 = 8.\nAnswer: 8.", "8"),
    ("the answer is 12 apples", "12 apples"),
    ("**Answer:** 42", "42"),
    ("Final Answer:\n7", "7"),
    ("Answer: 3\nwait, no. Answer: 5", "5"),  # the last one
    (r"so \boxed{\frac{1}{2}} and Answer: 9", r"\frac{1}{2}"),  # \boxed wins over "Answer:"
    (r"\boxed{1} then \boxed{\sqrt{x^{2}}}", r"\sqrt{x^{2}}"),  # the last, braces balanced
    (r"\boxed{5} and a broken \boxed{6", "5"),  # an unclosed \boxed is skipped
    ("I think it is 8", None),
    ("Answer:", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("response, gold, reward", [
    ("Answer: 8", "8", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    ("Answer: 7", "8", 0.0),
    ("It is eight, I am sure.", "8", 0.0),  # no answer in the asked format: broken format scores 0
    ("The answer is 1,000", "1000", 1.0),  # thousands separators read as one number (see rewards.py)
    ("Answer: 1,000", "1", 0.0),
    ("Answer: 8 apples", "8", 1.0),
    ("Answer: <number>", "8", 0.0),
    (r"\boxed{9^{9^{9}}}", "8", 0.0),  # refused before SymPy spends minutes on it
])
def test_math_reward(response, gold, reward):
    assert math_reward(math_task(gold), response) == reward


def test_math_reward_works_in_worker_threads():
    # math-verify's own timeouts use SIGALRM, which raises outside the main thread: they must be off there,
    # and a huge power must still come back at once.
    results: list = []

    def score():
        start = time.monotonic()
        results.append([math_reward(math_task("8"), "Answer: 8"),
                        math_reward(math_task("0.5"), r"\boxed{\frac{1}{2}}"),
                        math_reward(math_task("8"), r"Answer: 2^{2^{40}}")])
        results.append(time.monotonic() - start)

    worker = threading.Thread(target=score)
    worker.start()
    worker.join(timeout=30)
    assert results[0] == [1.0, 1.0, 0.0] and results[1] < 10


@pytest.mark.parametrize("response, expected", [
    (fenced("def f():\n    return 1"), "def f():\n    return 1\n"),
    ("```python\na = 1\n```\nthen\n```python\nb = 2\n```", "b = 2\n"),  # the last python block
    ("```py\nx = 1\n```\n```text\nnot code\n```", "x = 1\n"),  # a python block beats a later other-language one
    ("```\nplain = 1\n```", "plain = 1\n"),  # an untagged block when there is no python one
    ("```python\ndef f():\n    return 1", None),  # left open: a truncated response
    ("```bash\nls\n```", None),
    ("def f(): return 1", None),
])
def test_extract_code(response, expected):
    assert extract_code(response) == expected


def test_code_reward_golden_cases(bwrap):
    assert code_reward(ADD_ONE, fenced("def add_one(x):\n    return x + 1")) == 1.0
    assert code_reward(ADD_ONE, fenced("def add_one(x):\n    return x + 1 if x > 0 else 99")) == 0.5
    assert code_reward(ADD_ONE, fenced("def add_one(x)\n    return x + 1")) == 0.0  # syntax error
    assert code_reward(ADD_ONE, "def add_one(x): return x + 1") == 0.0  # not fenced
    assert code_reward(ADD_ONE, fenced("def other(x):\n    return x + 1")) == 0.0  # wrong name
    # Printing what looks like results does not count, nor does exiting before the tests run.
    forged = "import sys\nfor i in range(4):\n    print(i, 'pass')\nsys.exit(0)\ndef add_one(x):\n    return 0"
    assert code_reward(ADD_ONE, fenced(forged)) == 0.0


def test_code_reward_never_hangs_and_survives_memory_bombs(bwrap):
    start = time.monotonic()
    assert code_reward(ADD_ONE, fenced("def add_one(x):\n    while True:\n        pass"), timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 1.0 + 4.0
    # Tests that finished before the hang still count: the first two pass, the third loops forever.
    hangs_at_10 = "def add_one(x):\n    while x == 10:\n        pass\n    return x + 1"
    assert code_reward(ADD_ONE, fenced(hangs_at_10), timeout_s=1.0) == 0.5
    bomb = "def add_one(x):\n    hog = [bytearray(2**30) for _ in range(64)]\n    return x + 1"
    assert code_reward(ADD_ONE, fenced(bomb)) == 0.0
    # A solution that raises at import fails every test, and the harness still reports.
    assert run_code_tests("raise SystemExit(0)", ADD_ONE.tests) == [False] * 4


def test_reward_for_kind_and_user_rewards(tmp_path):
    assert reward_for_kind("math") is math_reward and reward_for_kind("code") is code_reward
    with pytest.raises(UserError, match="no built-in reward for task kind 'poem'.*--reward"):
        reward_for_kind("poem")
    module = tmp_path / "my_rewards.py"
    module.write_text("def length(task, response):\n    return len(response) / 10\nNOT_A_FUNCTION = 3\n")
    fn = load_reward(f"{module}:length")
    assert fn(math_task("1"), "12345") == 0.5
    assert load_reward("os.path:join")("a", "b") == "a/b"  # an importable module
    for spec, message in [("no_such_module_xyz:f", "cannot load 'no_such_module_xyz'"),
                          ("os.path:no_such_function", "has no attribute 'no_such_function'"),
                          (f"{module}:NOT_A_FUNCTION", "is a int, not a function"),
                          ("just_a_module", "expected module:function"),
                          (f"{tmp_path}/missing.py:f", "no such file")]:
        with pytest.raises(UserError, match=message) as e:
            load_reward(spec)
        assert repr(spec) in str(e.value)


def test_batch_rewards_in_order_through_a_thread_pool(bwrap):
    tasks = [ADD_ONE, math_task("8"), ADD_ONE, math_task("3")]
    responses = [fenced("def add_one(x):\n    return x + 1"), "Answer: 8", "no code", "Answer: 4"]
    assert batch_rewards(tasks, responses, max_workers=2) == [1.0, 1.0, 0.0, 0.0]
    assert batch_rewards(tasks[1:2], ["x"], reward=lambda task, response: 0.25) == [0.25]
    with pytest.raises(ValueError, match="2 tasks but 1 responses"):
        batch_rewards(tasks[:2], ["x"])
    with pytest.raises(UserError, match="'poem'"):
        batch_rewards([RLTask(id="p", kind="poem", prompt="?")], ["x"])
