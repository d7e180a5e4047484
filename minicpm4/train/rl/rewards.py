"""Verifiable rewards (MINICPM4.md §7.1): each a function (task, response text) -> float in [0, 1].

- math: 0 when the answer format is broken (no `\\boxed{...}` and no "Answer: ..." / "answer is ..."), else 1 when
  math-verify finds the extracted answer equal to the gold (rule matching + SymPy, as in the report), else 0.
  Thousands separators count: "The answer is 1,000" scores 1 against "1000" (math-verify reads "1,000" as one
  number; models write large numbers that way, and no answer in a generated set is a list of numbers).
- code: the last fenced code block, run with the task's tests in the sandbox (sandbox.py); the reward is the
  fraction of tests passed (1.0 when all pass), 0 without a code block. A test that hangs or exhausts memory
  fails, and so do the tests it kept from running; the caller never hangs.
- your own kinds: `load_reward("module:function")` or `load_reward("path/to/file.py:function")`, any callable
  (task, response) -> float.

The code reward trusts the process it runs: the sandbox keeps a solution from harming the host, not from
deliberately forging its own score (patching the harness from inside, objects whose `__eq__` is always True).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from minicpm4.errors import MissingDependency, UserError
from minicpm4.train.rl.sandbox import run_python
from minicpm4.train.rl.tasks import RLTask

RewardFn = Callable[[RLTask, str], float]

MAX_ANSWER_CHARS = 200  # a final answer longer than this is not an answer (and would only cost SymPy time)
MAX_RESULT_DIGITS = 10_000  # an answer whose value has more digits is rejected before SymPy tries to compute it
MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own limit, where it can apply one (the main thread only)
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)

# ---- math -----------------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"\banswer\s*(?:is\b\s*:?|:)\s*([^\n]*)", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} whose braces balance and which is not empty."""
    start = len(text)
    while (start := text.rfind("\\boxed{", 0, start)) >= 0:
        depth, begin = 1, start + len("\\boxed{")
        for i in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                if text[begin:i].strip():
                    return text[begin:i].strip()
                break
    return None


def extract_answer(response: str) -> str | None:
    """The model's final answer: the last \\boxed{...}, else what follows the last "Answer:" / "answer is"
    (case-insensitive, the rest of that line, markdown emphasis and a final full stop dropped), else None."""
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    for match in reversed(list(_ANSWER.finditer(response))):
        answer = match.group(1).strip(" \t*_`").rstrip(".").strip(" \t*_`")
        if answer:
            return answer
    return None


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; we disable them on purpose (see _math_equal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@lru_cache(maxsize=1)
def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise MissingDependency("math rewards", "math-verify", "rl") from None
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutWarning())
    return math_verify


def _as_latex(text: str) -> str:
    """math-verify extracts from LaTeX-delimited text: "8" alone may not parse, "$8$" does."""
    return text if "$" in text or "\\(" in text or "\\[" in text else f"${text}$"


def _too_big(expr) -> bool:
    """Whether SymPy would spend minutes computing expr (9^{9^{9}}, (10^{10})!). math-verify's timeout is
    signal-based and off in worker threads, so huge powers and factorials are refused here, checked innermost
    first so that each exponent evaluated is already known to be small."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    for node in sympy.postorder_traversal(expr):
        try:
            if isinstance(node, sympy.Pow) and node.exp.is_number:
                exponent = abs(complex(node.exp.evalf(15)))
                base = abs(complex(node.base.evalf(15))) if node.base.is_number else 10.0
                if exponent * max(sympy.log(max(base, 2.0), 10).evalf(), 1.0) > MAX_RESULT_DIGITS:
                    return True
            elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.subfactorial)):
                if node.args[0].is_number and abs(complex(node.args[0].evalf(15))) > MAX_RESULT_DIGITS:
                    return True
        except (TypeError, ValueError, OverflowError):
            return True  # a value SymPy cannot even estimate is not a final answer
    return False


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None):
    return tuple(_math_verify().parse(_as_latex(gold), parsing_timeout=timeout_s))


def _math_equal(gold: str, answer: str) -> bool:
    mv = _math_verify()
    # math-verify's timeouts use SIGALRM, which only the main thread may set: elsewhere (batch_rewards, the
    # trainer's pool) they are switched off and _too_big plus MAX_ANSWER_CHARS bound the work instead.
    timeout_s = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        parsed_gold = list(_parse_gold(gold, timeout_s))
        parsed = mv.parse(_as_latex(answer), parsing_timeout=timeout_s)
        if not parsed_gold or not parsed or any(_too_big(p) for p in parsed):
            return False
        return bool(mv.verify(parsed_gold, parsed, timeout_seconds=timeout_s))
    except Exception:  # noqa: BLE001 - a parser failure on model text means "not equal", never a crash
        return False


def math_equal(gold: str, answer: str) -> bool:
    """Whether `answer` equals `gold` by math-verify (rule matching + SymPy), under the same time and size guards
    as math_reward; a parser failure counts as "not equal"."""
    return _math_equal(gold, answer)


def math_reward(task: RLTask, response: str) -> float:
    """1.0 when the response's final answer equals task.answer, 0.0 when it differs or there is none."""
    if task.answer is None:
        raise UserError(f"task {task.id!r}: a math task needs an answer")
    answer = extract_answer(response)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    return 1.0 if _math_equal(task.answer, answer) else 0.0


# ---- code -----------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = {"python", "py", "python3"}


def extract_code(response: str) -> str | None:
    """The last ```python (or ```py) fenced block; without one, the last untagged ``` block; else None. A block
    left open (a truncated response) does not count."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == ""):
        bodies = [body for tag, body in blocks if wanted(tag)]
        if bodies and bodies[-1].strip():
            return bodies[-1]
    return None


# Runs the solution once, then each test on its own, and reports one line per test on a private copy of
# stdout, marked with a per-run nonce, so what the solution prints (or a closed sys.stdout) cannot pass for a
# result. Tests after one that hangs never report: the parent counts them as failed.
_HARNESS = """\
import os as _os
_out = _os.dup(1)
_NONCE = {nonce!r}
_TESTS = {tests!r}
_ns = {{"__name__": "solution"}}
try:
    exec(compile({code!r}, "solution.py", "exec"), _ns)
except BaseException:
    import traceback
    traceback.print_exc()
    _os._exit(0)
for _i, _test in enumerate(_TESTS):
    try:
        exec(compile(_test, "test_%d" % _i, "exec"), dict(_ns))
        _ok = "pass"
    except BaseException:
        _ok = "fail"
    _os.write(_out, ("%s %d %s\\n" % (_NONCE, _i, _ok)).encode())
_os._exit(0)
"""


def run_code_tests(code: str, tests: Sequence[str], *, timeout_s: float = 5.0, memory_mb: int = 512) -> list[bool]:
    """Whether each test passes against `code`, all run in one sandboxed process of at most timeout_s."""
    nonce = secrets.token_hex(8)
    result = run_python(_HARNESS.format(nonce=nonce, tests=list(tests), code=code), timeout_s=timeout_s,
                        memory_mb=memory_mb)
    passed = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit() and parts[2] == "pass":
            passed.add(int(parts[1]))
    return [i in passed for i in range(len(tests))]


def code_reward(task: RLTask, response: str, timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    """The fraction of task.tests the response's last code block passes; 0.0 without a code block."""
    if not task.tests:
        raise UserError(f"task {task.id!r}: a code task needs tests")
    code = extract_code(response)
    if code is None:
        return 0.0
    results = run_code_tests(code, task.tests, timeout_s=timeout_s, memory_mb=memory_mb)
    return sum(results) / len(results)


# ---- choosing a reward ------------------------------------------------------------------------------------------

BUILT_IN: dict[str, RewardFn] = {"math": math_reward, "code": code_reward}


def reward_for_kind(kind: str) -> RewardFn:
    """The built-in reward of a task kind ("math", "code")."""
    if kind not in BUILT_IN:
        raise UserError(f"no built-in reward for task kind {kind!r} (built in: {', '.join(BUILT_IN)}): give "
                        "your own as --reward module:function")
    return BUILT_IN[kind]


def load_reward(spec: str) -> RewardFn:
    """"module:function" (importable) or "path/to/file.py:function" -> the callable (task, response) -> float."""
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise UserError(f"reward {spec!r}: expected module:function, e.g. mypkg.rewards:score or rewards.py:score")
    try:
        if source.endswith(".py") or os.sep in source:
            path = Path(source)
            if not path.is_file():
                raise UserError(f"reward {spec!r}: no such file {source}")
            module_spec = importlib.util.spec_from_file_location(f"minicpm4_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import, name it in one line
        raise UserError(f"reward {spec!r}: cannot load {source!r} ({type(e).__name__}: {e})") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise UserError(f"reward {spec!r}: {source!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def batch_rewards(tasks: Sequence[RLTask], responses: Sequence[str], reward: RewardFn | None = None,
                  max_workers: int = DEFAULT_WORKERS) -> list[float]:
    """Rewards of responses[i] to tasks[i], by each task's kind unless `reward` is given. A thread pool:
    code rewards wait on sandbox subprocesses, so several run at once."""
    if len(tasks) != len(responses):
        raise ValueError(f"batch_rewards: {len(tasks)} tasks but {len(responses)} responses")
    fns = [reward or reward_for_kind(t.kind) for t in tasks]  # an unknown kind fails before anything runs
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return list(pool.map(lambda fn, task, response: float(fn(task, response)), fns, tasks, responses))
