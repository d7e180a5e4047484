"""RL tasks (minicpm4/train/rl/tasks.py, make_tasks.py): the loader's errors, deterministic generators, gold
answers recomputed from the prompt text, reference solutions that pass their own tests, and the shipped sets."""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from minicpm4.errors import UserError
from minicpm4.train.rl import make_tasks
from minicpm4.train.rl.rewards import run_code_tests
from minicpm4.train.rl.tasks import (CODE_FAMILIES, MATH_INSTRUCTION, RLTask, generate_code_tasks,
                                     generate_math_tasks, load_tasks, write_tasks)

SHIPPED = {"math-train": 2000, "math-test": 200, "code-train": 500, "code-test": 100}


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[RLTask]]:
    return {name: load_tasks(make_tasks.ASSETS / f"{name}.jsonl") for name in SHIPPED}


# ---- the loader -----------------------------------------------------------------------------------------------

def write_lines(tmp_path, *lines) -> str:
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) for line in lines), encoding="utf-8")
    return str(path)


MATH = {"id": "a", "kind": "math", "prompt": "What is 1 + 1?", "answer": "2"}
CODE = {"id": "c", "kind": "code", "prompt": "Write f.", "tests": ["assert f() == 1"], "entry_point": "f"}


@pytest.mark.parametrize("lines, message", [
    ([json.dumps(MATH) + "\n", "{not json\n"], r"tasks.jsonl:2: not valid JSON"),
    (['["a list"]\n'], r"tasks.jsonl:1: expected a JSON object"),
    ([{"id": "a", "kind": "math", "answer": "2"}], r"tasks.jsonl:1: missing field 'prompt'"),
    ([{**MATH, "id": 7}], r"tasks.jsonl:1: field 'id' must be a non-empty string"),
    ([{**MATH, "prompt": "  "}], r"tasks.jsonl:1: field 'prompt' must be a non-empty string"),
    ([{**CODE, "tests": "assert f() == 1"}], r"tasks.jsonl:1: field 'tests' must be a list"),
    ([{**MATH, "anwser": "2"}], r"tasks.jsonl:1: unknown field 'anwser'.*'meta'"),
    ([{**MATH, "answer": None}], r"tasks.jsonl:1: a math task needs 'answer'"),
    ([{**CODE, "tests": []}], r"tasks.jsonl:1: a code task needs 'tests'"),
    ([{k: v for k, v in CODE.items() if k != "entry_point"}], r"tasks.jsonl:1: a code task needs 'entry_point'"),
    ([{**CODE, "entry_point": "not a name"}], r"tasks.jsonl:1: field 'entry_point' must be a Python function name"),
    ([{**MATH, "meta": [1]}], r"tasks.jsonl:1: field 'meta' must be a JSON object"),
    ([MATH, "\n", CODE, {**MATH, "prompt": "again"}], r"tasks.jsonl:4: duplicate id 'a' \(first on line 1\)"),
    (["\n\n"], r"tasks.jsonl: holds no tasks"),
])
def test_load_tasks_golden_errors(tmp_path, lines, message):
    lines = [line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines]
    with pytest.raises(UserError, match=message):
        load_tasks(write_lines(tmp_path, *lines))


def test_load_tasks_reads_user_kinds_and_round_trips(tmp_path):
    user = {"id": "u", "kind": "poem", "prompt": "Write a haiku.", "meta": {"syllables": [5, 7, 5]}}
    tasks = load_tasks(write_lines(tmp_path, json.dumps({**MATH, "answer": 2}) + "\n", json.dumps(CODE) + "\n",
                                   json.dumps(user) + "\n"))
    assert tasks[0].answer == "2"  # a number answer reads as its text
    assert tasks[1].tests == ("assert f() == 1",) and tasks[2].meta == {"syllables": [5, 7, 5]}
    write_tasks(tmp_path / "again.jsonl", tasks)
    assert load_tasks(tmp_path / "again.jsonl") == tasks
    with pytest.raises(UserError, match="no such task file"):
        load_tasks(tmp_path / "missing.jsonl")


# ---- the generators -------------------------------------------------------------------------------------------

def test_generators_are_deterministic_by_seed_and_honour_exclude():
    for generate in (generate_math_tasks, generate_code_tasks):
        a, b, other = generate(60, seed=3), generate(60, seed=3), generate(60, seed=4)
        assert a == b and [t.prompt for t in a] != [t.prompt for t in other]
        assert len({t.prompt for t in a}) == 60 and len({t.id for t in a}) == 60
        fresh = generate(60, seed=3, exclude={t.prompt for t in a[:30]}, prefix="x")
        assert not {t.prompt for t in fresh} & {t.prompt for t in a[:30]}
        assert fresh[0].id == "x-00000"


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def arithmetic(text: str) -> int:
    """Evaluate +, -, *, // on integers (and parentheses) without eval."""
    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](value(node.left), value(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int), ast.dump(node)
        return node.value
    return value(ast.parse(text, mode="eval").body)


# An oracle for the word problems written from the sentences, independent of the generator's bookkeeping:
# each clause after the opening one must match exactly one of these.
_CLAUSES = [
    (re.compile(r"^(?:buys|finds) (\d+) more$", re.IGNORECASE), lambda v, n: v + n),
    (re.compile(r"^\w+ gives \w+ (\d+) more$", re.IGNORECASE), lambda v, n: v + n),
    (re.compile(r"^gives (\d+) to \w+$", re.IGNORECASE), lambda v, n: v - n),
    (re.compile(r"^loses (\d+) of them$", re.IGNORECASE), lambda v, n: v - n),
    (re.compile(r"^buys (\d+) bags with (\d+) \w+ in each bag$", re.IGNORECASE), lambda v, n, m: v + n * m),
    (re.compile(r"^the number of \w+ \w+ has doubles$", re.IGNORECASE), lambda v: v * 2),
    (re.compile(r"^the number of \w+ \w+ has triples$", re.IGNORECASE), lambda v: v * 3),
    (re.compile(r"^gives half of them to \w+$", re.IGNORECASE), lambda v: v // 2),
]


def solve_word_problem(prompt: str) -> int:
    story = prompt.split(" How many ")[0].rstrip(".")
    clauses = [c.strip() for c in re.split(r"\. Then |\. | and ", story)]
    opening = re.fullmatch(r"\w+ has (\d+) boxes with (\d+) \w+ in each box", clauses[0]) or \
        re.fullmatch(r"\w+ has (\d+) \w+", clauses[0])
    assert opening, clauses[0]
    value = arithmetic(" * ".join(opening.groups()))
    for clause in clauses[1:]:
        clause = re.sub(r"^(?:She|He|she|he) ", "", clause)
        matches = [(pattern.fullmatch(clause), apply) for pattern, apply in _CLAUSES if pattern.fullmatch(clause)]
        assert len(matches) == 1, clause
        match, apply = matches[0]
        value = apply(value, *map(int, match.groups()))
        assert value >= 0
    return value


def test_math_gold_answers_recomputed_from_the_prompt(shipped):
    for task in shipped["math-train"][:1000] + shipped["math-test"]:
        assert task.prompt.endswith(MATH_INSTRUCTION)
        question = task.prompt.removesuffix(MATH_INSTRUCTION).strip()
        if question.startswith("What is "):
            expected = arithmetic(question.removeprefix("What is ").removesuffix("?"))
        else:
            expected = solve_word_problem(question)
        assert task.answer == str(expected), task.prompt
        worked, result = task.solution.rsplit(" = ", 1)
        assert arithmetic(worked) == expected == int(result)


def test_math_difficulty_is_long_tailed(shipped):
    steps = Counter(t.meta["steps"] for t in shipped["math-train"])
    assert set(steps) == {1, 2, 3, 4}
    assert steps[1] > steps[2] > steps[3] > steps[4] >= 0.04 * len(shipped["math-train"])
    lengths = [len(t.prompt) for t in shipped["math-train"]]
    assert max(lengths) > 2 * min(lengths)


def test_code_reference_solutions_pass_their_tests_and_the_prompt_example(bwrap, shipped):
    """One task per family from each shipped split (and an obviously wrong answer for each, which must fail):
    the expected values (computed by the generator's own Python) agree with the reference source."""
    sample = {}
    for task in shipped["code-test"] + shipped["code-train"]:
        sample.setdefault(task.meta["family"], task)
    assert set(sample) == set(CODE_FAMILIES)

    def check(task: RLTask) -> tuple[str, list[bool], list[bool]]:
        call, value = re.search(r"For example, `(.+?)` returns `(.+?)`\.", task.prompt).groups()
        tests = [*task.tests, f"assert {call} == {value}"]
        wrong = f"def {task.entry_point}(*args):\n    return None\n"
        return task.id, run_code_tests(task.solution, tests), run_code_tests(wrong, task.tests)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for task_id, right, wrong in pool.map(check, sample.values()):
            assert all(right), (task_id, right)
            assert not all(wrong), task_id


def test_code_tasks_are_well_formed(shipped):
    for task in shipped["code-train"] + shipped["code-test"]:
        assert 3 <= len(task.tests) <= 5 and all(t.startswith(f"assert {task.entry_point}(") for t in task.tests)
        assert f"`{task.entry_point}(" in task.prompt and "```python" in task.prompt
        assert task.solution not in task.prompt and f"def {task.entry_point}(" in task.solution
        assert len(set(task.tests)) == len(task.tests)


# ---- the shipped files ----------------------------------------------------------------------------------------

def test_shipped_sets_have_the_stated_counts_and_disjoint_splits(shipped):
    assert {name: len(tasks) for name, tasks in shipped.items()} == SHIPPED
    for name in SHIPPED:
        assert (make_tasks.ASSETS / f"{name}.jsonl").stat().st_size < 1_000_000
    for kind in ("math", "code"):
        train, test = ({t.prompt for t in shipped[f"{kind}-{split}"]} for split in ("train", "test"))
        assert len(train) == SHIPPED[f"{kind}-train"] and len(test) == SHIPPED[f"{kind}-test"]
        assert not train & test
    readme = (make_tasks.ASSETS / "README.md").read_text()
    assert make_tasks.COMMAND in readme and "Licence" in readme and "| math-train.jsonl | 2000 |" in readme


def test_shipped_files_equal_a_fresh_run_of_make_tasks(tmp_path, capsys):
    make_tasks.main(["--out", str(tmp_path)])
    for name in [*SHIPPED, "README"]:
        suffix = ".md" if name == "README" else ".jsonl"
        assert (tmp_path / f"{name}{suffix}").read_bytes() == (make_tasks.ASSETS / f"{name}{suffix}").read_bytes(), \
            f"{name}{suffix} is stale: run {make_tasks.COMMAND}"
    assert "math-train.jsonl: 2000 tasks" in capsys.readouterr().out
