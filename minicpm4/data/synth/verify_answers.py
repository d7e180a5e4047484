"""Automated verification of synthesized reasoning samples (MINICPM4.md §8.3, track 2): a math answer must equal
the gold answer, a code answer must pass its unit tests in the sandbox.

Both reuse the RL rewards' extraction and checking (train/rl/rewards.py), so a sample kept for SFT is one the RL
reward would also score 1.0.
"""

from __future__ import annotations

from typing import Sequence

from minicpm4.data.synth.verdict import Verdict, quote
from minicpm4.train.rl.rewards import MAX_ANSWER_CHARS, extract_answer, extract_code, math_equal, run_code_tests


def verify_math(response: str, gold: str) -> Verdict:
    """Passes when the response's final answer (last \\boxed{...}, else "Answer: ...") equals `gold` by
    math-verify (rule matching + SymPy): "77.0" matches "77", "0.5" matches "\\frac{1}{2}"."""
    answer = extract_answer(response)
    if answer is None:
        return Verdict.failed("no final answer (neither \\boxed{...} nor 'Answer: ...')")
    if len(answer) > MAX_ANSWER_CHARS:
        return Verdict.failed(f"final answer too long ({len(answer)} characters)")
    if not math_equal(gold, answer):
        return Verdict.failed(f"wrong answer: got {quote(answer)}, expected {quote(gold)}")
    return Verdict.passed()


def verify_code(response: str, tests: Sequence[str], *, timeout_s: float = 5.0, memory_mb: int = 512) -> Verdict:
    """Passes when the response's last code block passes every test (each a snippet of asserts) in the sandbox,
    all within timeout_s and memory_mb. A hang or a crash fails the tests it kept from running.
    SandboxUnavailable propagates: whether to skip the code track or stop is the caller's choice."""
    if not tests:
        raise ValueError("verify_code needs at least one test")
    code = extract_code(response)
    if code is None:
        return Verdict.failed("no code block")
    results = run_code_tests(code, tests, timeout_s=timeout_s, memory_mb=memory_mb)
    failed = [i for i, ok in enumerate(results) if not ok]
    if failed:
        return Verdict.failed(f"tests failed: {len(failed)}/{len(results)} (first: test {failed[0]})")
    return Verdict.passed()
