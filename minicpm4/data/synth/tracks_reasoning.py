"""Track 2, reasoning (MINICPM4.md §8.3): math solved step by step and checked against the gold answer; code
written, traced and repaired, checked by the shipped unit tests in the sandbox.

Seeds: the RL task sets (minicpm4/assets/rl-tasks/math-train.jsonl {prompt, answer} and code-train.jsonl
{prompt, tests, solution}), interleaved math / code. Variants:

  math  solve           the problem as given, solved step by step; verify_math against the gold answer
        rephrase        question-style evolution: the model rewords the problem (every number kept, none added,
                        so the gold answer still holds), then solves the rewording; verify_math
  code  write           the function written from its specification; verify_code with the shipped tests
        predict-output  the reference solution shown, the model predicts one test call's value (the test's
                        right-hand side is the gold)
        bug-fix         the reference solution with one operator or constant mutated (a mutation the tests
                        catch, checked in the sandbox first) to be fixed; verify_code

The code variants need the bubblewrap sandbox; without it the track stops at the start, or runs math only with
`--no-code`.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from minicpm4.data.synth.track import Job, JobSteps, Request, TrackContext, assistant, pick, reply_text, user
from minicpm4.data.synth.verdict import Verdict, quote
from minicpm4.data.synth.verify_answers import verify_code, verify_math
from minicpm4.errors import UserError

TASKS_DIR = Path(__file__).resolve().parents[2] / "assets" / "rl-tasks"
ANSWER_LINE = "Give the final answer on the last line as: Answer: <number>"
SOLVE_HINT = "Solve it step by step and check the result before the last line."
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_ANSWER = re.compile(r"^\s*(?:final\s+)?answer\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mod, ast.Mod: ast.FloorDiv,
          ast.Pow: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}


@dataclass
class ReasoningConfig:
    math_path: Path = TASKS_DIR / "math-train.jsonl"
    code_path: Path = TASKS_DIR / "code-train.jsonl"
    code: bool = True  # False: math only (--no-code)
    rephrase: bool = True  # the math question-style evolution variant
    timeout_s: float = 5.0
    memory_mb: int = 512


def _load(path: Path, fields: tuple[str, ...]) -> list[dict]:
    from minicpm4.io import jsonl_records

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    items = []
    for lineno, rec in jsonl_records(path):
        if not isinstance(rec, dict) or any(f not in rec for f in ("id", *fields)):
            raise UserError(f"{path}:{lineno}: expected an object with {', '.join(('id', *fields))}")
        items.append(rec)
    return items


def numbers(text: str) -> Counter:
    return Counter(_NUMBER.findall(text))


def check_rephrase(original: str, rewrite: str) -> Verdict:
    if not rewrite.strip():
        return Verdict.failed("empty rephrased problem")
    if " ".join(rewrite.split()) == " ".join(original.split()):
        return Verdict.failed("rephrased problem is the original")
    before, after = numbers(original), numbers(rewrite)
    if missing := before - after:
        return Verdict.failed(f"rephrased problem lost numbers: {', '.join(sorted(missing))}")
    if added := after - before:
        return Verdict.failed(f"rephrased problem added numbers: {', '.join(sorted(added))}")
    return Verdict.passed()


def test_call(test: str) -> tuple[str, object] | None:
    """`assert f(1, 2) == 3` -> ("f(1, 2)", 3); None for any other shape."""
    try:
        stmt = ast.parse(test).body
    except SyntaxError:
        return None
    if len(stmt) != 1 or not isinstance(stmt[0], ast.Assert):
        return None
    cmp = stmt[0].test
    if not (isinstance(cmp, ast.Compare) and isinstance(cmp.ops[0], ast.Eq) and len(cmp.ops) == 1
            and isinstance(cmp.left, ast.Call)):
        return None
    try:
        return ast.unparse(cmp.left), ast.literal_eval(cmp.comparators[0])
    except ValueError:
        return None


def verify_output(response: str, expected: object) -> Verdict:
    found = _ANSWER.findall(response or "")
    if not found:
        return Verdict.failed("no final 'Answer' line")
    got = found[-1].strip().strip("`")
    try:
        value = ast.literal_eval(got)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = got
    if value != expected or isinstance(value, bool) != isinstance(expected, bool):  # True == 1 in Python
        return Verdict.failed(f"wrong output: got {quote(got)}, expected {quote(repr(expected))}")
    return Verdict.passed()


def mutations(solution: str) -> list[str]:
    """Every one-node mutation of the solution (an operator swapped, an integer constant off by one), as code."""
    tree = ast.parse(solution)
    spots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            spots += [(node.ops, i) for i, op in enumerate(node.ops) if type(op) in _SWAPS]
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in _SWAPS:
            spots.append((node, "op"))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            spots.append((node, "value"))
    out = []
    for holder, key in spots:
        if key == "op":
            old = holder.op
            holder.op = _SWAPS[type(old)]()
        elif key == "value":
            old = holder.value
            holder.value = old + 1
        else:
            old = holder[key]
            holder[key] = _SWAPS[type(old)]()
        out.append(ast.unparse(tree) + "\n")
        if key == "op":
            holder.op = old
        elif key == "value":
            holder.value = old
        else:
            holder[key] = old
    return out


def fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


class ReasoningTrack:
    name = "reasoning"

    def __init__(self, ctx: TrackContext, config: ReasoningConfig | None = None) -> None:
        self.ctx, self.config = ctx, config or ReasoningConfig()
        self.math = _load(self.config.math_path, ("prompt", "answer"))
        self.code = _load(self.config.code_path, ("prompt", "tests", "solution")) if self.config.code else []
        if self.config.code:
            from minicpm4.train.rl.sandbox import SandboxUnavailable, check_sandbox

            try:
                check_sandbox()
            except SandboxUnavailable as e:
                raise UserError(f"the reasoning track's code variants: {e}; or pass --no-code for math only") from None

    def info(self) -> dict:
        return {"math_items": len(self.math), "code_items": len(self.code), "code": self.config.code}

    def jobs(self, limit: int | None) -> list[Job]:
        math = pick(self.math, None, self.ctx.data_seed, "reasoning-math")
        code = pick(self.code, None, self.ctx.data_seed, "reasoning-code")
        mixed = [x for pair in zip(math, code) for x in pair] + math[len(code):] + code[len(math):]
        out = []
        for item in mixed if limit is None else mixed[:limit]:
            if "tests" in item:
                out.append(Job(self.name, item["id"], ("write", "predict-output", "bug-fix"),
                               partial(self._code_steps, item=item)))
            else:
                variants = ("solve", "rephrase") if self.config.rephrase else ("solve",)
                out.append(Job(self.name, item["id"], variants, partial(self._math_steps, item=item)))
        return out

    # ---- math ----

    def _math_steps(self, job: Job, item: dict) -> JobSteps:
        problem = item["prompt"].replace(ANSWER_LINE, "").strip()
        gold = str(item["answer"])
        question = f"{problem}\n{SOLVE_HINT} {ANSWER_LINE}"
        requests = [Request([user(question)])]
        rephrase_prompt = (f"Rewrite this math word problem in different words. Keep every number and what is "
                           f"asked exactly the same, so the answer does not change. Reply with the rewritten "
                           f"problem only.\n\n{problem}")
        if "rephrase" in job.variants:
            requests.append(Request([user(rephrase_prompt)]))
        turns = yield requests
        solved = reply_text(turns[0])
        records = [self._math_record(job, "solve", question, solved, gold)]
        if "rephrase" not in job.variants:
            return records
        rewrite = re.sub(r"^(?:rewritten\s+problem\s*[:：])\s*", "", reply_text(turns[1]), flags=re.I).strip()
        verdict = check_rephrase(problem, rewrite)
        if not verdict.ok:
            return records + [job.record("rephrase", [user(rephrase_prompt), assistant(rewrite)], verdict,
                                         gold=gold, kind="math", original=problem)]
        question2 = f"{rewrite}\n{SOLVE_HINT} {ANSWER_LINE}"
        [turn] = yield [Request([user(question2)])]
        return records + [self._math_record(job, "rephrase", question2, reply_text(turn), gold, original=problem)]

    def _math_record(self, job: Job, variant: str, question: str, response: str, gold: str, **meta):
        verdict = verify_math(response, gold)
        steps = [line for line in response.splitlines() if line.strip() and not _ANSWER.match(line)]
        if verdict.ok and not steps:
            meta["borderline"] = "right answer without worked steps"
        return job.record(variant, [user(question), assistant(response)], verdict, gold=gold, kind="math", **meta)

    # ---- code ----

    def _verify_code(self, response: str, tests: list[str]) -> Verdict:
        return verify_code(response, tests, timeout_s=self.config.timeout_s, memory_mb=self.config.memory_mb)

    def _code_steps(self, job: Job, item: dict) -> JobSteps:
        rng: random.Random = self.ctx.rng(self.name, item["id"])
        tests, solution = list(item["tests"]), item["solution"]
        spec = item["prompt"].split("\n\n")[0].strip()
        meta = {"kind": "code", "tests": tests}
        records, requests, pending = [], [], []

        requests.append(Request([user(item["prompt"])]))
        pending.append(("write", item["prompt"], None))

        calls = [c for c in map(test_call, tests) if c is not None]
        if calls:
            call, expected = rng.choice(calls)
            q = (f"Here is a Python function:\n{fenced(solution)}\nWhat does `{call}` return? Trace it step by step, "
                 f"then give the value on the last line as: Answer: <Python literal>")
            requests.append(Request([user(q)]))
            pending.append(("predict-output", q, expected))
        else:
            records.append(job.record("predict-output", [user(item["prompt"])],
                                      Verdict.failed("no `assert f(...) == value` test to predict"), **meta))

        candidates = mutations(solution)
        rng.shuffle(candidates)
        buggy = next((b for b in candidates[:4] if not self._verify_code(fenced(b), tests).ok), None)
        if buggy is None:
            records.append(job.record("bug-fix", [user(item["prompt"])],
                                      Verdict.failed("no mutation of the solution that the tests catch"), **meta))
        else:
            q = (f"This function should do the following: {spec}\nBut it has a bug:\n{fenced(buggy)}\n"
                 "Find the bug and reply with the corrected function in a ```python fenced code block.")
            requests.append(Request([user(q)]))
            pending.append(("bug-fix", q, buggy))

        turns = yield requests
        for (variant, q, extra), turn in zip(pending, turns):
            response = reply_text(turn)
            if variant == "predict-output":
                verdict = verify_output(response, extra)
                rec_meta = {**meta, "expected": json.dumps(extra) if _jsonable(extra) else repr(extra)}
            else:
                verdict = self._verify_code(response, tests)
                rec_meta = {**meta, "buggy": extra} if variant == "bug-fix" else dict(meta)
            records.append(job.record(variant, [user(q), assistant(response)], verdict, **rec_meta))
        return records


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
