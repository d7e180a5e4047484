"""Verifiable RL tasks (MINICPM4.md §7.1): the JSONL format, its loader, and the generators of the shipped sets.

One task per line, a JSON object:
    {"id": "m1", "kind": "math", "prompt": "What is 7 + 5? ...", "answer": "12"}
    {"id": "c1", "kind": "code", "prompt": "Write ...", "tests": ["assert f(1) == 2"], "entry_point": "f"}
`kind` picks the reward (rewards.py: "math", "code", or any kind scored by your own `module:function`);
`solution` (a reference answer, never shown to the model) and `meta` (any JSON object, e.g. for your reward)
are optional. The generators are deterministic by seed; `make_tasks.py` writes the shipped files.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from minicpm4.errors import UserError

MATH_INSTRUCTION = "Give the final answer on the last line as: Answer: <number>"
CODE_INSTRUCTION = "Reply with the complete function in a ```python fenced code block."


@dataclass(frozen=True)
class RLTask:
    id: str  # unique within a file
    kind: str  # "math" | "code" | any user kind
    prompt: str  # the user message shown to the model
    answer: str | None = None  # math: the gold answer (a number or expression, as text)
    tests: tuple[str, ...] = ()  # code: Python statements, each an `assert ...` on the solution
    entry_point: str | None = None  # code: the function name the tests call
    solution: str | None = None  # a reference solution (code) or worked arithmetic (math); not shown to the model
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)  # free-form, e.g. {"family": ...}

    def to_dict(self) -> dict[str, Any]:
        """The JSONL object: empty optional fields are left out."""
        d = asdict(self)
        d["tests"], d["meta"] = list(self.tests), dict(self.meta)
        return {k: v for k, v in d.items() if v not in (None, [], {})}


# ---- the file format ---------------------------------------------------------------------------------------

_STRINGS = ("id", "kind", "prompt", "entry_point", "solution")
_FIELDS = tuple(RLTask.__dataclass_fields__)


def task_from_dict(d: Any, where: str) -> RLTask:
    """One JSONL object -> RLTask; UserError "where: ..." naming the field for anything wrong."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object with id, kind and prompt, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)}; "
                        "put your own data under 'meta')")
    for key in ("id", "kind", "prompt"):
        if key not in d:
            raise UserError(f"{where}: missing field {key!r}")
    for key in _STRINGS:
        if key in d and d[key] is not None and (not isinstance(d[key], str) or not d[key].strip()):
            raise UserError(f"{where}: field {key!r} must be a non-empty string, got {d[key]!r:.60}")
    answer = d.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # "answer": 8 means what "answer": "8" means
    elif answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise UserError(f"{where}: field 'answer' must be a non-empty string (or a number), got {answer!r:.60}")
    tests = d.get("tests", [])
    if not isinstance(tests, list) or not all(isinstance(t, str) and t.strip() for t in tests):
        raise UserError(f"{where}: field 'tests' must be a list of non-empty strings (Python asserts)")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise UserError(f"{where}: field 'meta' must be a JSON object")
    entry_point = d.get("entry_point")
    if entry_point is not None and not entry_point.isidentifier():
        raise UserError(f"{where}: field 'entry_point' must be a Python function name, got {entry_point!r}")
    if d["kind"] == "math" and answer is None:
        raise UserError(f"{where}: a math task needs 'answer' (the gold answer)")
    if d["kind"] == "code" and not tests:
        raise UserError(f"{where}: a code task needs 'tests' (a non-empty list of assert statements)")
    if d["kind"] == "code" and entry_point is None:
        raise UserError(f"{where}: a code task needs 'entry_point' (the function the tests call)")
    return RLTask(id=d["id"], kind=d["kind"], prompt=d["prompt"], answer=answer, tests=tuple(tests),
                  entry_point=entry_point, solution=d.get("solution"), meta=meta)


def load_tasks(path: str | Path) -> list[RLTask]:
    """Read a task JSONL (blank lines skipped); UserError "path:line: ..." for a bad line or a repeated id."""
    from minicpm4.io import jsonl_records

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such task file")
    tasks: list[RLTask] = []
    first_line: dict[str, int] = {}
    try:
        for lineno, record in jsonl_records(path):
            task = task_from_dict(record, f"{path}:{lineno}")
            if task.id in first_line:
                raise UserError(f"{path}:{lineno}: duplicate id {task.id!r} (first on line {first_line[task.id]})")
            first_line[task.id] = lineno
            tasks.append(task)
    except ValueError as e:  # jsonl_records' "path:line: not valid JSON: ..."
        raise UserError(str(e)) from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not tasks:
        raise UserError(f"{path}: holds no tasks (the file is empty)")
    return tasks


def write_tasks(path: str | Path, tasks: Collection[RLTask]) -> None:
    """Write tasks as JSONL, atomically."""
    from minicpm4.io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in tasks))


def _unique(make: Callable[[random.Random], RLTask], count: int, seed: int, exclude: Collection[str],
            prefix: str) -> list[RLTask]:
    """`count` tasks with distinct prompts, none in `exclude`, numbered prefix-00000 on."""
    rng, seen, tasks, tries = random.Random(seed), set(exclude), [], 0
    while len(tasks) < count:
        tries += 1
        if tries > 200 * count + 1000:
            raise ValueError(f"could not make {count} distinct tasks (only {len(tasks)}): the generator's "
                             "families are too few for that count")
        task = make(rng)
        if task.prompt in seen:
            continue
        seen.add(task.prompt)
        tasks.append(replace(task, id=f"{prefix}-{len(tasks):05d}"))
    return tasks


# ---- math: arithmetic word problems with a long tail of chain lengths ---------------------------------------

_PEOPLE = [("Ana", "she"), ("Ben", "he"), ("Chen", "he"), ("Dara", "she"), ("Eli", "he"), ("Fatima", "she"),
           ("Gus", "he"), ("Hana", "she"), ("Ivan", "he"), ("Jo", "she"), ("Kofi", "he"), ("Lena", "she"),
           ("Mateo", "he"), ("Nia", "she"), ("Omar", "he"), ("Priya", "she"), ("Sam", "he"), ("Yuki", "she")]
_THINGS = ["apples", "marbles", "books", "stamps", "coins", "pencils", "cards", "shells", "stickers", "eggs",
           "cookies", "beads", "balloons", "crayons", "buttons"]
# Operations per word problem: most take one, a few need four, so correct responses range from one line to a
# short derivation (the report's long-tailed rollout lengths, §7.2).
_STEP_WEIGHTS = {1: 45, 2: 27, 3: 17, 4: 11}
PLAIN_FRACTION = 0.25  # "What is 7 + 5?" problems among the math tasks


class _Expr:
    """Worked arithmetic as text, parenthesised only where precedence needs it: the `solution` of a math task."""

    def __init__(self, value: int) -> None:
        self.text, self.value, self.is_sum = str(value), value, False

    def apply(self, op: str, n: int) -> None:
        if op in "+-":
            self.text, self.is_sum = f"{self.text} {op} {n}", True
        else:
            self.text, self.is_sum = f"{'(' + self.text + ')' if self.is_sum else self.text} {op} {n}", False
        self.value = {"+": self.value + n, "-": self.value - n, "*": self.value * n, "//": self.value // n}[op]


def _plain_problem(rng: random.Random) -> tuple[str, _Expr, int]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    if op == "-":
        a, b = max(a, b), min(a, b)
    if op == "*":
        b = rng.randint(2, 12)
    expr = _Expr(a)
    expr.apply(op, b)
    if rng.random() >= 0.3:
        return f"What is {expr.text}?", expr, 1
    c = rng.randint(2, 9)  # a second operation, where precedence matters
    if rng.random() < 0.5:
        expr.apply(rng.choice(["+", "*"]), c)  # left to right, parenthesised when needed: "(a + b) * c"
    else:  # "a + b * c": the product first
        expr = _Expr(a)
        expr.text, expr.value, expr.is_sum = f"{a} + {b} * {c}", a + b * c, True
    return f"What is {expr.text}?", expr, 2


def _word_problem(rng: random.Random) -> tuple[str, _Expr, int]:
    (name, pronoun), thing = rng.choice(_PEOPLE), rng.choice(_THINGS)
    friend = rng.choice([p for p, _ in _PEOPLE if p != name])
    ops = rng.choices(list(_STEP_WEIGHTS), weights=list(_STEP_WEIGHTS.values()))[0]
    steps = ops
    if ops > 1 and rng.random() < 0.3:  # the opening sentence is itself a multiplication
        boxes, each = rng.randint(2, 6), rng.randint(2, 12)
        expr = _Expr(boxes)
        expr.apply("*", each)
        sentences = [f"{name} has {boxes} boxes with {each} {thing} in each box."]
        steps -= 1
    else:
        expr = _Expr(rng.randint(2, 20))
        sentences = [f"{name} has {expr.value} {thing}."]
    he = pronoun.capitalize()
    for _ in range(steps):
        v = expr.value
        options = ["add", "add", "sub", "bags"] + (["double", "triple"] if v <= 40 else []) + \
            (["half"] if v % 2 == 0 and v >= 4 else [])
        choice = rng.choice(options if v >= 2 else ["add", "bags"])
        if choice == "add":
            n = rng.randint(1, 15)
            expr.apply("+", n)
            text = rng.choice([f"{he} buys {n} more.", f"{he} finds {n} more.", f"{friend} gives {name} {n} more."])
        elif choice == "sub":
            n = rng.randint(1, v - 1)
            expr.apply("-", n)
            text = rng.choice([f"{he} gives {n} to {friend}.", f"{he} loses {n} of them."])
        elif choice == "bags":  # "x + b * e": the product binds first, no parentheses needed
            bags, each = rng.randint(2, 5), rng.randint(2, 10)
            expr.text, expr.value, expr.is_sum = f"{expr.text} + {bags} * {each}", v + bags * each, True
            text = f"{he} buys {bags} bags with {each} {thing} in each bag."
        elif choice in ("double", "triple"):
            expr.apply("*", 2 if choice == "double" else 3)
            text = f"The number of {thing} {name} has {choice}s."
        else:
            expr.apply("//", 2)
            text = f"{he} gives half of them to {friend}."
        if len(sentences) > 1:
            text = "Then " + (text if text.startswith(friend) else text[0].lower() + text[1:])
        sentences.append(text)
    if len(sentences) == 2 and sentences[1].startswith(he + " "):
        # one step reads as one sentence: "Ana has 3 apples and buys 5 more."
        sentences = [f"{sentences[0][:-1]} and {sentences[1][len(he) + 1:]}"]
    return " ".join(sentences + [f"How many {thing} does {name} have now?"]), expr, ops


def _math_task(rng: random.Random) -> RLTask:
    plain = rng.random() < PLAIN_FRACTION
    question, expr, steps = (_plain_problem if plain else _word_problem)(rng)
    return RLTask(id="", kind="math", prompt=f"{question} {MATH_INSTRUCTION}", answer=str(expr.value),
                  solution=f"{expr.text} = {expr.value}", meta={"steps": steps})


def generate_math_tasks(count: int, seed: int, exclude: Collection[str] = frozenset(),
                        prefix: str = "math") -> list[RLTask]:
    """`count` arithmetic problems (integer answers >= 0), distinct prompts, none of them in `exclude`."""
    return _unique(_math_task, count, seed, exclude, prefix)


# ---- code: short Python functions from families with varied constants ---------------------------------------
# Each family: rng -> (signature, what it returns, reference solution source, reference function, input maker).
# The reference function computes the expected values; the solution source is what a correct answer looks like
# (tests check that the two agree by running the source against the tests in the sandbox).

_WORDS = ["level", "python", "banana", "rotor", "sandbox", "queue", "rhythm", "apple", "kernel", "tensor",
          "stream", "orange", "noon", "matrix", "vector", "lambda", "racecar", "cobra", "idea", "sky"]


def _ints(lo: int, hi: int) -> Callable[[random.Random], tuple]:
    return lambda r: (r.randint(lo, hi),)


def _word(r: random.Random) -> tuple:
    return (r.choice(_WORDS),)


def _sentence(r: random.Random) -> tuple:
    return (" ".join(r.sample(_WORDS, r.randint(2, 5))),)


def _int_list(lo: int, hi: int, min_len: int = 0) -> Callable[[random.Random], tuple]:
    return lambda r: ([r.randint(lo, hi) for _ in range(r.randint(min_len, 6))],)


def _fam_add(r):
    k = r.randint(1, 99)
    return ("add_constant(x)", f"returns x plus {k}", f"def add_constant(x):\n    return x + {k}\n",
            lambda x: x + k, _ints(-50, 100))


def _fam_multiply(r):
    k, c = r.randint(2, 20), r.randint(0, 9)
    plus, what = (f" + {c}", f" and adds {c}") if c else ("", "")
    return ("multiply_by(x)", f"multiplies x by {k}{what} and returns the result",
            f"def multiply_by(x):\n    return x * {k}{plus}\n", lambda x: x * k + c, _ints(-30, 60))


def _fam_multiple(r):
    k = r.randint(2, 15)
    rem = r.choice([0, 0, r.randint(0, k - 1)])
    what = f"is divisible by {k}" if rem == 0 else f"leaves the remainder {rem} when divided by {k}"
    return ("is_multiple(n)", f"returns True when the integer n {what}, else False",
            f"def is_multiple(n):\n    return n % {k} == {rem}\n", lambda n: n % k == rem,
            lambda q: (q.randint(-5, 12) * k + q.choice([rem, rem, 1, k - 1]),))


def _fam_clamp(r):
    lo, hi = r.randint(-20, 0), r.randint(1, 30)
    return ("clamp(x)", f"returns x limited to the range {lo} to {hi}: {lo} if x is below {lo}, {hi} if x is "
            f"above {hi}, else x", f"def clamp(x):\n    return min(max(x, {lo}), {hi})\n",
            lambda x: min(max(x, lo), hi), _ints(-40, 50))


def _fam_count_char(r):
    t = r.choice(["a", "e", "i", "o", "r", "s", "t", "l", "n", "c", "an", "na", "er", "on", "or", "in", "at", "ra",
                  "te", "en", "le", "ea", "ar", "ro", "es"])
    what = f"the letter {t!r}" if len(t) == 1 else f"the substring {t!r} (non-overlapping)"
    return ("count_char(s)", f"returns how many times {what} occurs in the string s",
            f"def count_char(s):\n    return s.count({t!r})\n", lambda s: s.count(t), _sentence)


def _fam_repeat(r):
    k, sep = r.randint(2, 6), r.choice(["", "-", " ", ",", "+", "/"])
    return ("repeat_text(s)", f"returns the string s repeated {k} times, joined by {sep!r}",
            f"def repeat_text(s):\n    return {sep!r}.join([s] * {k})\n", lambda s: sep.join([s] * k), _word)


def _fam_power(r):
    k, c = r.randint(2, 5), r.randint(0, 9)
    minus, what = (f" - {c}", f", minus {c}") if c else ("", "")
    return ("power(x)", f"returns x raised to the power {k}{what}", f"def power(x):\n    return x ** {k}{minus}\n",
            lambda x: x**k - c, _ints(-6, 9))


def _fam_sum_multiples(r):
    a, b = r.sample(range(2, 8), 2)
    return ("sum_multiples(n)", f"returns the sum of all integers from 0 up to but not including n that are "
            f"divisible by {a} or by {b}",
            f"def sum_multiples(n):\n    return sum(i for i in range(n) if i % {a} == 0 or i % {b} == 0)\n",
            lambda n: sum(i for i in range(n) if i % a == 0 or i % b == 0), _ints(0, 60))


def _fam_fizzbuzz(r):
    a, b = sorted(r.sample(range(2, 10), 2))

    def fizz(n: int) -> str:
        return "FizzBuzz" if n % a == 0 and n % b == 0 else "Fizz" if n % a == 0 else "Buzz" if n % b == 0 \
            else str(n)

    return ("fizzbuzz(n)", f"returns 'FizzBuzz' if n is divisible by both {a} and {b}, 'Fizz' if only by {a}, "
            f"'Buzz' if only by {b}, and otherwise n as a string",
            f"def fizzbuzz(n):\n    if n % {a} == 0 and n % {b} == 0:\n        return 'FizzBuzz'\n"
            f"    if n % {a} == 0:\n        return 'Fizz'\n    if n % {b} == 0:\n        return 'Buzz'\n"
            f"    return str(n)\n", fizz, _ints(1, 100))


def _fam_factorial_mod(r):
    m = r.randint(7, 1000)
    return ("factorial_mod(n)", f"returns n! (the factorial of the integer n >= 0) modulo {m}",
            f"def factorial_mod(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n"
            f"    return out % {m}\n", lambda n: math.factorial(n) % m, _ints(0, 15))


def _digit_sum(n: int, base: int, power: int) -> int:
    total = 0
    while n:
        n, d = divmod(n, base)
        total += d**power
    return total


def _fam_digit_sum(r):
    b, p = r.randint(2, 10), r.choice([1, 1, 2, 3])
    written = "" if b == 10 else f" written in base {b}"
    powers = {1: "", 2: "squares of the ", 3: "cubes of the "}[p]
    what = f"the sum of the {powers}digits of n{written}"
    return ("digit_sum(n)", f"takes an integer n >= 0 and returns {what}",
            f"def digit_sum(n):\n    total = 0\n    while n:\n        n, d = divmod(n, {b})\n"
            f"        total += d ** {p}\n    return total\n", lambda n: _digit_sum(n, b, p), _ints(0, 5000))


def _fam_count_letters(r):
    chars = "aeiou" if r.random() < 0.3 else "".join(sorted(r.sample("bcdeklmnorst", 3)))
    what = "vowels (a, e, i, o, u)" if chars == "aeiou" else f"characters that are one of {', '.join(chars)}"
    return ("count_letters(s)", f"returns how many {what} the string s contains",
            f"def count_letters(s):\n    return sum(1 for c in s if c in {chars!r})\n",
            lambda s: sum(1 for c in s if c in chars), _sentence)


def _fam_count_greater(r):
    k = r.randint(-10, 20)
    return ("count_greater(xs)", f"returns how many numbers in the list xs are greater than {k}",
            f"def count_greater(xs):\n    return sum(1 for x in xs if x > {k})\n",
            lambda xs: sum(1 for x in xs if x > k), _int_list(-15, 30))


def _fam_rotate(r):
    k, left = r.randint(1, 12), r.random() < 0.5
    way, moved = ("left", f"the first {k} % len(s) characters move to the end") if left else \
        ("right", f"the last {k} % len(s) characters move to the front")
    cut = f"{k} % len(s)" if left else f"-{k} % len(s)"
    return ("rotate(s)", f"returns the non-empty string s rotated {way} by {k} characters ({moved})",
            f"def rotate(s):\n    k = {cut}\n    return s[k:] + s[:k]\n",
            lambda s: s[(k if left else -k) % len(s):] + s[:(k if left else -k) % len(s)], _word)


def _fam_remove_char(r):
    chars = "".join(sorted(r.sample("aeiorstlncdmpu", r.choice([1, 2]))))
    what = " and every ".join(repr(c) for c in chars)
    code = "s" + "".join(f".replace({c!r}, '')" for c in chars)
    return ("remove_chars(s)", f"returns the string s with every {what} removed",
            f"def remove_chars(s):\n    return {code}\n", lambda s: "".join(c for c in s if c not in chars),
            _sentence)


def _fam_sum_first(r):
    k, first = r.randint(1, 10), r.random() < 0.5
    which, cut = ("first", f"xs[:{k}]") if first else ("last", f"xs[-{k}:]")
    return ("sum_ends(xs)", f"returns the sum of the {which} {k} numbers of the list xs (all of them if it is "
            f"shorter)", f"def sum_ends(xs):\n    return sum({cut})\n",
            lambda xs: sum(xs[:k] if first else xs[-k:]), _int_list(-20, 20))


def _fam_sum_powers(r):
    k, m = r.randint(1, 5), r.randint(1, 8)
    return ("sum_of_powers(n)", f"returns {m}**{k} + {m + 1}**{k} + ... + n**{k} for an integer n "
            f"(0 when n < {m})", f"def sum_of_powers(n):\n    return sum(i ** {k} for i in range({m}, n + 1))\n",
            lambda n: sum(i**k for i in range(m, n + 1)), _ints(0, 20))


def _fam_sequence(r):
    a, b = r.randint(0, 5), r.randint(1, 6)

    def term(n: int) -> int:
        x, y = a, b
        for _ in range(n):
            x, y = y, x + y
        return x

    return ("sequence_term(n)", f"returns term n (counting from 0) of the sequence that starts {a}, {b} and "
            f"where every later term is the sum of the two before it",
            f"def sequence_term(n):\n    x, y = {a}, {b}\n    for _ in range(n):\n        x, y = y, x + y\n"
            f"    return x\n", term, _ints(0, 25))


def _fam_gcd(r):
    k = r.randint(2, 60)
    return ("gcd_with(n)", f"returns the greatest common divisor of the integer n >= 1 and {k}",
            f"def gcd_with(n):\n    a, b = n, {k}\n    while b:\n        a, b = b, a % b\n    return a\n",
            lambda n: math.gcd(n, k), _ints(1, 300))


def _fam_caesar(r):
    k = r.randint(1, 25)

    def shift(s: str) -> str:
        return "".join(chr((ord(c) - 97 + k) % 26 + 97) if "a" <= c <= "z" else c for c in s)

    return ("caesar(s)", f"returns s with every lowercase letter a-z shifted {k} places forward in the alphabet "
            f"(wrapping from z to a); other characters stay as they are",
            f"def caesar(s):\n    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c "
            f"for c in s)\n", shift, _sentence)


def _fam_long_words(r):
    lo = r.randint(2, 6)
    hi = r.randint(lo, 9)
    return ("words_by_length(s)", f"returns the list of the space-separated words of s whose length is from "
            f"{lo} to {hi} characters (inclusive), in order",
            f"def words_by_length(s):\n    return [w for w in s.split() if {lo} <= len(w) <= {hi}]\n",
            lambda s: [w for w in s.split() if lo <= len(w) <= hi], _sentence)


def _fam_reverse_words(r):
    sep, k = r.choice([" ", "-", "_", ", ", "/", "|", "+", "."]), r.randint(1, 5)
    return ("reverse_words(s)", f"returns the last {k} space-separated words of s (all of them if there are "
            f"fewer) in reverse order, joined by {sep!r}",
            f"def reverse_words(s):\n    return {sep!r}.join(s.split()[::-1][:{k}])\n",
            lambda s: sep.join(s.split()[::-1][:k]), _sentence)


def _fam_max_or_default(r):
    k = r.randint(-20, 20)
    return ("max_or_default(xs)", f"returns the largest number in the list xs, or {k} when xs is empty",
            f"def max_or_default(xs):\n    return max(xs) if xs else {k}\n", lambda xs: max(xs) if xs else k,
            _int_list(-30, 30))


def _fam_max_distance(r):
    k = r.randint(-10, 20)
    return ("max_distance(xs)", f"returns the largest absolute difference between {k} and a number in the "
            f"non-empty list xs", f"def max_distance(xs):\n    return max(abs(x - {k}) for x in xs)\n",
            lambda xs: max(abs(x - k) for x in xs), _int_list(-30, 30, min_len=1))


def _fam_reverse(r):
    k, suffix = r.randint(1, 4), r.choice(["", "", "!", "?", "-", "_end", "x", "42"])
    nth = {2: "second", 3: "third", 4: "fourth"}
    what = "the string s reversed" if k == 1 else f"every {nth[k]} character of s, going backwards from the last one"
    tail = f", followed by {suffix!r}" if suffix else ""
    return ("reverse_string(s)", f"returns {what}{tail}",
            f"def reverse_string(s):\n    return s[::-{k}]{' + ' + repr(suffix) if suffix else ''}\n",
            lambda s: s[::-k] + suffix, _word)


CODE_FAMILIES: dict[str, Callable] = {f.__name__.removeprefix("_fam_"): f for f in [
    _fam_add, _fam_multiply, _fam_multiple, _fam_clamp, _fam_count_char, _fam_repeat, _fam_power,
    _fam_sum_multiples, _fam_fizzbuzz, _fam_factorial_mod, _fam_digit_sum, _fam_count_letters, _fam_count_greater,
    _fam_rotate, _fam_remove_char, _fam_sum_first, _fam_sum_powers, _fam_sequence, _fam_gcd, _fam_caesar,
    _fam_long_words, _fam_reverse_words, _fam_max_or_default, _fam_max_distance, _fam_reverse]}


def _call(entry: str, args: tuple) -> str:
    return f"{entry}({', '.join(repr(a) for a in args)})"


def _code_task(rng: random.Random) -> RLTask:
    family = rng.choice(sorted(CODE_FAMILIES))
    signature, what, solution, reference, make_args = CODE_FAMILIES[family](rng)
    entry = signature.split("(")[0]
    spec = f"Write a Python function `{signature}` that {what}."
    # The example depends only on the specification, so one specification is one prompt: deduplicating
    # prompts keeps a specification out of both train and test.
    example = make_args(random.Random(spec))
    n_tests = rng.randint(3, 5)
    cases: list[tuple] = []
    for _ in range(50 * n_tests):  # distinct inputs, none equal to the example's
        args = make_args(rng)
        if args != example and args not in cases:
            cases.append(args)
        if len(cases) == n_tests:
            break
    tests = tuple(f"assert {_call(entry, args)} == {reference(*args)!r}" for args in cases)
    prompt = f"{spec} For example, `{_call(entry, example)}` returns `{reference(*example)!r}`.\n\n{CODE_INSTRUCTION}"
    return RLTask(id="", kind="code", prompt=prompt, tests=tests, entry_point=entry, solution=solution,
                  meta={"family": family})


def generate_code_tasks(count: int, seed: int, exclude: Collection[str] = frozenset(),
                        prefix: str = "code") -> list[RLTask]:
    """`count` function-writing tasks (3-5 tests each), distinct prompts, none of them in `exclude`."""
    return _unique(_code_task, count, seed, exclude, prefix)
