"""The synthesis verifiers (minicpm4/data/synth/): math answers, sandboxed code tests, instruction-following
constraints and tool calls, each on golden passing and failing cases."""

from __future__ import annotations

import json
import random
import re
import socket
import textwrap

import pytest

from minicpm4.data.synth.constraints import (KINDS, AllLowercase, BulletPointsExactly, EndsWith, ExcludeWords,
                                             IncludeKeywords, JsonObject, NoCommas, ParagraphsExactly, StartsWith,
                                             TitleInDoubleAngles, WordCountAtLeast, WordCountAtMost,
                                             constraint_from_dict, constraint_to_dict, sample_constraints,
                                             verify_constraints, verify_samples)
from minicpm4.data.synth.tool_schema import check_tool_set, verify_tool_call, verify_tool_calls
from minicpm4.data.synth.verdict import Verdict
from minicpm4.data.synth.verify_answers import verify_code, verify_math
from minicpm4.errors import UserError
from minicpm4.train.rl import sandbox
from minicpm4.train.rl.sandbox import SandboxUnavailable


# ---- math -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold", [
    ("6 * 7 + 35 = 77, so the answer is \\boxed{77}.", "77"),
    ("The answer is 77.0", "77"),
    ("Half of it: \\boxed{\\frac{1}{2}}", "0.5"),
    ("Answer: 0.5", "\\frac{1}{2}"),
    ("First guess \\boxed{3}, but rechecking gives \\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
])
def test_verify_math_accepts_equivalent_forms(response, gold):
    assert verify_math(response, gold) == Verdict.passed()


@pytest.mark.parametrize("response, gold, reason", [
    ("so \\boxed{12}", "77", "wrong answer: got 12, expected 77"),
    ("The answer is 0.51", "\\frac{1}{2}", "wrong answer: got 0.51, expected \\frac{1}{2}"),
    ("I computed 77 somewhere", "77", "no final answer"),
])
def test_verify_math_rejects_wrong_or_missing_answers(response, gold, reason):
    verdict = verify_math(response, gold)
    assert not verdict.ok and verdict.reason.startswith(reason)


# ---- code -------------------------------------------------------------------------------------------------------

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-4, 9) == 5"]


def fenced(code: str) -> str:
    return f"Here is my solution.\n\n```python\n{textwrap.dedent(code).strip()}\n```\n"


def test_verify_code_accepts_a_correct_function(bwrap):
    wrong_then_right = fenced("def add(a, b):\n    return a - b") + fenced("def add(a, b):\n    return a + b")
    assert verify_code(wrong_then_right, ADD_TESTS) == Verdict.passed()  # the last block is the answer


def test_verify_code_rejects_failing_code(bwrap):
    verdict = verify_code(fenced("def add(a, b):\n    return a - b"), ADD_TESTS)
    assert verdict == Verdict.failed("tests failed: 2/3 (first: test 0)")


def test_verify_code_rejects_a_reply_without_code():
    assert verify_code("def add(a, b): return a + b", ADD_TESTS) == Verdict.failed("no code block")
    with pytest.raises(ValueError, match="at least one test"):
        verify_code(fenced("x = 1"), [])


def test_verify_code_stops_an_infinite_loop(bwrap):
    verdict = verify_code(fenced("def add(a, b):\n    while True:\n        pass"), ADD_TESTS, timeout_s=1.0)
    assert verdict == Verdict.failed("tests failed: 3/3 (first: test 0)")


def test_verify_code_rejects_code_that_reaches_the_network(bwrap):
    server = socket.socket()  # a server on the host's loopback: reachable from any unsandboxed process
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        code = f"""
            import socket
            def phone_home():
                socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=2).close()
                return True
        """
        assert not verify_code(fenced(code), ["assert phone_home()"]).ok
    finally:
        server.close()


def test_verify_code_rejects_code_that_writes_outside_its_folder(bwrap, tmp_path):
    target = tmp_path / "escaped.txt"
    code = f"""
        def escape():
            with open({str(target)!r}, "w") as f:
                f.write("out")
            return True
    """
    assert not verify_code(fenced(code), ["assert escape()"]).ok
    assert not target.exists()


def test_verify_code_lets_an_unavailable_sandbox_propagate(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_error", ["bwrap cannot start here"])
    with pytest.raises(SandboxUnavailable, match="bwrap cannot start here"):
        verify_code(fenced("def add(a, b):\n    return a + b"), ADD_TESTS)


# ---- constraints: one passing and one failing golden text per kind -----------------------------------------------

FOUR_WORDS = "one two three four"
GOLDEN = [  # (constraint, a reply that satisfies it, one that does not, the failure detail)
    (WordCountAtMost(4), "Don't stop, well-known friend!", f"{FOUR_WORDS} five", "5 words"),
    (WordCountAtLeast(5), f"{FOUR_WORDS} five", FOUR_WORDS, "4 words"),
    (IncludeKeywords(("Solar panel", "grid")), "Each solar panel feeds the grid.", "Panels feed the gridlock.",
     "missing 'Solar panel' and 'grid'"),
    (ExcludeWords(("very", "just")), "It is justified and every bit true.", "It is Very good.", "uses 'very'"),
    (BulletPointsExactly(3), "Intro:\n- a\n* b\n  - c\n---\n**bold** line", "- a\n- b\n-- not a bullet",
     "2 bullet points"),
    (ParagraphsExactly(2), "First part\nstill first.\n\n  \nSecond part.\n", "One.\n\nTwo.\n\nThree.",
     "3 paragraphs"),
    (AllLowercase(), "all quiet here, 42 times.", "all quiet Here.", "uppercase in 'Here.'"),
    (EndsWith("Is there anything else I can help with?"), "Done. is there anything else I can help with?\" \n",
     "Is there anything else I can help with? Bye.", "ends with"),
    (StartsWith("My answer is"), "\"My answer is yes.\"", "Well, my answer is yes.", "starts with 'Well, my an"),
    (JsonObject(), "```json\n{\"a\": [1, 2]}\n```", "[1, 2]", "JSON list, not an object"),
    (TitleInDoubleAngles(), "<<A poem of joy>>\nRoses...", "<< >> no title <here>", "no <<title>>"),
    (NoCommas(), "Short. Clear. Done.", "Yes, no，maybe", "2 commas"),
]


def test_every_constraint_kind_has_a_golden_case():
    assert sorted(c.kind for c, *_ in GOLDEN) == sorted(KINDS)


@pytest.mark.parametrize("constraint, good, bad, detail", GOLDEN, ids=[c.kind for c, *_ in GOLDEN])
def test_constraint_passes_and_fails_its_golden_texts(constraint, good, bad, detail):
    assert constraint.check(good) == Verdict.passed()
    verdict = constraint.check(bad)
    assert not verdict.ok
    assert verdict.reason.startswith(f"constraint {constraint.label()}: {detail}"), verdict.reason
    assert constraint.describe().endswith(".") and constraint.describe()[0].isupper()


def test_constraint_reasons_read_as_in_the_records():
    verdict = WordCountAtMost(50).check("word " * 73)
    assert verdict.reason == "constraint word_count_at_most(50): 73 words"
    assert JsonObject().check("{oops").reason.startswith("constraint json_object(): not valid JSON (")


def test_verify_constraints_names_the_first_that_fails():
    constraints = [AllLowercase(), WordCountAtMost(3), NoCommas()]
    assert verify_constraints("tiny reply", constraints) == Verdict.passed()
    assert verify_constraints("a, b c d", constraints).reason == "constraint word_count_at_most(3): 4 words"
    assert verify_constraints("anything", []) == Verdict.passed()


def test_verify_samples_returns_the_passing_indices():
    constraints = [StartsWith("Sure"), NoCommas()]
    samples = ["Sure, thing", "sure thing", "No", "Sure thing!"]
    assert verify_samples(samples, constraints) == (Verdict.passed(), [1, 3])
    assert verify_samples(samples, constraints, min_pass=2) == (Verdict.passed(), [1, 3])
    verdict, passing = verify_samples(samples, constraints, min_pass=3)
    assert passing == [1, 3]
    assert verdict.reason == "2/4 samples pass, need 3 (sample 0: constraint no_commas(): 1 comma)"
    assert verify_samples([], constraints) == (Verdict.failed("no samples"), [])


# ---- constraints: sampling compatible sets ----------------------------------------------------------------------

NOT_WITH_JSON = {"bullet_points_exactly", "paragraphs_exactly", "title_in_double_angles", "starts_with",
                 "ends_with", "no_commas"}


def contradicts(a: dict, b: dict) -> bool:
    """An independent pairwise rule over the record form: which two constraints no reply satisfies together."""
    if a["kind"] == b["kind"]:
        return True
    by_kind = {a["kind"]: a, b["kind"]: b}
    if {"word_count_at_most", "word_count_at_least"} <= by_kind.keys():
        return by_kind["word_count_at_least"]["n"] >= by_kind["word_count_at_most"]["n"]
    if "json_object" in by_kind and NOT_WITH_JSON & by_kind.keys():
        return True
    required = " ".join(d.get("phrase", "") + " " + " ".join(d.get("words", [])) for d in (a, b)
                        if d["kind"] in ("include_keywords", "starts_with", "ends_with")).lower()
    if "exclude_words" in by_kind and set(w.lower() for w in by_kind["exclude_words"]["words"]) & set(
            re.findall(r"\w+", required)):
        return True
    return "no_commas" in by_kind and "," in required


def test_contradicts_itself_catches_what_it_should():  # the rule below would pass vacuously if this broke
    assert contradicts({"kind": "word_count_at_most", "n": 50}, {"kind": "word_count_at_least", "n": 60})
    assert contradicts({"kind": "json_object"}, {"kind": "bullet_points_exactly", "n": 3})
    assert contradicts({"kind": "include_keywords", "words": ["Good food"]},
                       {"kind": "exclude_words", "words": ["good"]})
    assert not contradicts({"kind": "word_count_at_most", "n": 50}, {"kind": "word_count_at_least", "n": 30})


KEYWORDS = ["solar panel", "grid", "battery", "very", "Inverter", "peak, load", "x", "good"]


def test_sampled_sets_never_contradict_and_round_trip():
    kinds_seen = set()
    for seed in range(400):
        rng = random.Random(seed)
        k = rng.randint(1, 8)
        constraints = sample_constraints(rng, k, keywords=KEYWORDS if seed % 4 else ())
        records = json.loads(json.dumps([constraint_to_dict(c) for c in constraints]))
        assert len(constraints) == k
        for i, a in enumerate(records):
            for b in records[i + 1:]:
                assert not contradicts(a, b), (seed, a, b)
        assert [constraint_from_dict(r) for r in records] == constraints
        for c in constraints:
            if isinstance(c, IncludeKeywords):
                assert set(c.words) <= {"solar panel", "grid", "battery", "very", "Inverter", "good"}  # no commas
        kinds_seen |= {c.kind for c in constraints}
    assert kinds_seen == set(KINDS)  # every kind is drawn, the crossing ones included
    assert sample_constraints(random.Random(7), 5, keywords=KEYWORDS) == \
        sample_constraints(random.Random(7), 5, keywords=KEYWORDS)


def test_sample_constraints_edges():
    assert sample_constraints(random.Random(0), 0) == []
    assert "include_keywords" not in {c.kind for seed in range(50)
                                      for c in sample_constraints(random.Random(seed), 6)}
    assert len(sample_constraints(random.Random(0), 11, keywords=["grid"])) == 11  # every kind but json_object
    with pytest.raises(UserError, match="at most 11 kinds combine"):
        sample_constraints(random.Random(0), 12, keywords=["grid"])


@pytest.mark.parametrize("record, message", [
    ({"kind": "word_count_at_mostly", "n": 3}, "unknown constraint kind 'word_count_at_mostly'"),
    ({"kind": "word_count_at_most"}, "missing field 'n'"),
    ({"kind": "word_count_at_most", "n": 0}, "n must be a positive integer"),
    ({"kind": "all_lowercase", "n": 1}, "unknown field 'n'"),
    ({"kind": "include_keywords", "words": []}, "words must be a non-empty list"),
    ({"kind": "ends_with", "phrase": " "}, "phrase must be a non-empty string"),
])
def test_bad_constraint_records_fail_with_the_field(record, message):
    with pytest.raises(UserError, match=re.escape(message)):
        constraint_from_dict(record)


# ---- tool calls -------------------------------------------------------------------------------------------------

CALCULATE = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"},
                                                    "precision": {"type": "integer", "minimum": 0}},
                   "required": ["expression"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: takes none
TOOLS = [CALCULATE, WEATHER, NOW]


@pytest.mark.parametrize("call", [
    {"name": "calculate", "arguments": {"expression": "2 + 2", "precision": 2}},
    {"name": "calculate", "arguments": "{\"expression\": \"2 + 2\"}"},  # a JSON string, as OpenAI sends it
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}},
    {"name": "now", "arguments": ""},
])
def test_valid_tool_calls_pass(call):
    assert verify_tool_call(call, TOOLS) == Verdict.passed()


@pytest.mark.parametrize("call, reason", [
    ({"name": "foo", "arguments": {}}, "unknown tool 'foo'"),
    ({"name": "calculate", "arguments": {"precision": 2}}, "schema: 'expression' is a required property"),
    ({"name": "calculate", "arguments": {"expression": 4}}, "schema: 4 is not of type 'string'"),
    ({"name": "calculate", "arguments": {"expression": "1", "precision": True}},
     "schema: True is not of type 'integer'"),
    ({"name": "calculate", "arguments": {"expression": "1", "verbose": True}},
     "schema: Additional properties are not allowed ('verbose' was unexpected)"),
    ({"name": "calculate", "arguments": "{\"expression\": \"1\""}, "arguments are not valid JSON ("),
    ({"name": "calculate", "arguments": "[1]"}, "arguments are a JSON list, not an object"),
    ({"arguments": {}}, "call without a tool name"),
])
def test_invalid_tool_calls_fail_with_a_reason(call, reason):
    verdict = verify_tool_call(call, TOOLS)
    assert not verdict.ok and verdict.reason.startswith(reason), verdict.reason


def test_verify_tool_calls_needs_every_call_valid_and_the_gold_tools_called():
    weather = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    sums = {"name": "calculate", "arguments": {"expression": "1+1"}}
    assert verify_tool_calls([weather, sums], TOOLS, gold_names=["calculate", "get_weather"]) == Verdict.passed()
    assert verify_tool_calls([weather], TOOLS) == Verdict.passed()
    assert verify_tool_calls([], TOOLS) == Verdict.failed("no tool call")
    assert verify_tool_calls([weather, {"name": "foo"}], TOOLS) == Verdict.failed("call 1: unknown tool 'foo'")
    assert verify_tool_calls([weather], TOOLS, gold_names=["calculate"]) == \
        Verdict.failed("gold tool 'calculate' not called")
    assert verify_tool_calls([weather], [WEATHER], gold_names=["calculate"]) == \
        Verdict.failed("gold tool 'calculate' missing from the tool set")


@pytest.mark.parametrize("tools, message", [
    ({"not": "a list"}, "tool set must be a list"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "object",
                                                                     "properties": {"a": {"type": "strng"}}}}}],
     "tool 'x': 'function.parameters' is not a valid JSON Schema"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}],
     "tool 'x': 'function.parameters' must describe an object"),
    ([{"type": "function", "function": {"description": "no name"}}], "tool 0: 'function.name' must be"),
    ([{"function": {"name": "x"}}], "tool 'x': 'type' must be 'function'"),
    ([NOW, NOW], "tool 'now': the name appears twice"),
])
def test_malformed_tool_sets_raise_naming_the_tool(tools, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_tool_set(tools)
    with pytest.raises(UserError, match=re.escape(message)):
        verify_tool_call({"name": "x", "arguments": {}}, tools)
    check_tool_set(TOOLS)
