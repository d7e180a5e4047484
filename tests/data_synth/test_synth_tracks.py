"""The five synthesis tracks on a rule-driven fake model: known right replies are kept, known wrong ones are
rejected with the verifier's reason; every record is schema-valid and the kept ones load as SFT data."""

from __future__ import annotations

import json
import re

import pytest

from minicpm4.apps.chat_backend import Sampling, turn_from_text
from minicpm4.data.synth import tracks_instruction
from minicpm4.data.synth.constraints import NoCommas, StartsWith, WordCountAtMost
from minicpm4.data.synth.records import validate_record
from minicpm4.data.synth.runner import RunConfig, run_synthesis
from minicpm4.data.synth.track import TrackContext
from minicpm4.data.synth.tracks_instruction import InstructionConfig, InstructionTrack
from minicpm4.data.synth.tracks_knowledge import KnowledgeConfig, KnowledgeTrack
from minicpm4.data.synth.tracks_longctx import LongContextConfig, LongContextTrack
from minicpm4.data.synth.tracks_reasoning import ReasoningConfig, ReasoningTrack
from minicpm4.data.synth.tracks_tool import ToolConfig, ToolTrack
from minicpm4.train.sft_data import read_jsonl


class RuleBackend:
    """A fake model: rule(prompt, tools, sampling) -> reply text, parsed like LocalBackend parses its replies."""

    def __init__(self, rule) -> None:
        self.rule = rule
        self.prompts: list[str] = []

    def complete(self, messages, tools=None, sampling=None, prefix=""):
        prompt = messages[-1]["content"]
        self.prompts.append(prompt)
        return turn_from_text(prefix + self.rule(prompt, tools, sampling), tools)

    def complete_batch(self, conversations, tools=None, sampling=None, prefix=""):
        return [self.complete(m, tools, sampling, prefix) for m in conversations]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path, track, backend, sampling=None):
    out = tmp_path / "out.jsonl"
    stats = run_synthesis([track], backend, sampling or Sampling(64, 0.7, 1.0, 0),
                          RunConfig(out=out, show_progress=False, review_fraction=0.0, kept_only=tmp_path / "kept.jsonl"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for r in records:
        validate_record(r)
    if any(r["kept"] for r in records):
        assert len(read_jsonl(tmp_path / "kept.jsonl")) == sum(r["kept"] for r in records)  # the SFT loader reads them
    return {r["id"]: r for r in records}, stats


@pytest.fixture
def kb(tmp_path):
    return write_jsonl(tmp_path / "kb.jsonl", [
        {"id": "dns", "title": "Domain Name System", "abstract": "The Domain Name System maps host names such as "
         "example.com to numeric IP addresses through a hierarchy of name servers."},
        {"id": "tcp", "title": "Transmission Control Protocol", "abstract": "TCP provides reliable, ordered "
         "delivery of a byte stream between hosts, with acknowledgements and retransmission."},
        {"id": "raid", "title": "RAID", "abstract": "Redundant array of independent disks: several disks combined "
         "into one logical unit for redundancy or speed, such as mirroring and striping."},
        {"id": "cache", "title": "Cache memory", "abstract": "A small fast memory that keeps copies of recently "
         "used data close to the processor, so repeated reads avoid slow main memory."},
    ])


# ---- knowledge ----------------------------------------------------------------------------------------------------

def knowledge_rule(prompt, tools, sampling):
    if prompt.startswith("Knowledge point: Domain Name System"):
        return "Question: What does the Domain Name System do?\nAnswer: It maps host names to IP addresses."
    if prompt.startswith("Knowledge point: Transmission Control Protocol"):
        return "Question: What is the capital of France?\nAnswer: Paris is the capital of France."
    if prompt.startswith("Knowledge point:"):
        return "I'm not sure what you want."  # no Question/Answer format
    if prompt.startswith("Rewrite this question"):
        return ("Which of these does the Domain Name System translate into IP addresses, filling ____? "
                "A) host names B) disks C) colours D) songs")
    if "in a different way from this earlier answer" in prompt:
        return "Name servers answer lookups, turning a name like example.com into the address a host can reach."
    return "It turns host names into addresses, answer A."  # the evolved question


def test_knowledge_keeps_right_and_rejects_wrong(tmp_path, kb):
    ctx = TrackContext()
    track = KnowledgeTrack(ctx, KnowledgeConfig(kb_path=kb))
    records, stats = run(tmp_path, track, RuleBackend(knowledge_rule))
    dns = {k.split(":")[2]: v for k, v in records.items() if k.startswith("knowledge:dns:")}
    assert len(dns) == 3 and {"qa", "answer2"} <= set(dns)
    assert all(r["kept"] for r in dns.values()), [r["reason"] for r in dns.values()]
    assert dns["qa"]["messages"] == [{"role": "user", "content": "What does the Domain Name System do?"},
                                     {"role": "assistant", "content": "It maps host names to IP addresses."}]
    style = next(r for v, r in dns.items() if v.startswith("style-"))
    assert style["meta"]["style"] in ("multiple-choice", "fill-in-the-blank", "short-answer", "explain-to-a-child")
    tcp = [r for k, r in records.items() if k.startswith("knowledge:tcp:")]
    assert len(tcp) == 3 and all(not r["kept"] and r["reason"] == "question not about 'Transmission Control Protocol'"
                                 for r in tcp)
    raid = [r for k, r in records.items() if k.startswith("knowledge:raid:")]
    assert all(r["reason"].startswith("reply not in the Question/Answer format") for r in raid)
    s = stats["tracks"]["knowledge"]
    assert s["generated"] == 12 and s["kept"] == 3 and s["rejected_by_reason"]["reply not in the Question/Answer format"] == 6


def test_knowledge_rejects_refusals_and_repeated_answers(tmp_path, kb):
    def rule(prompt, tools, sampling):
        if "in a different way" in prompt:
            return "It maps host names to IP addresses."  # the first answer again
        if prompt.startswith("Rewrite"):
            return "What does DNS stand for?"  # a multiple-choice rewrite without options fails its style check
        if prompt.startswith("Knowledge point:"):
            return "Question: What does the Domain Name System do?\nAnswer: It maps host names to IP addresses."
        return "I'm sorry, I cannot answer that."

    records, _ = run(tmp_path, KnowledgeTrack(TrackContext(), KnowledgeConfig(kb_path=kb)), RuleBackend(rule))
    assert records["knowledge:dns:answer2"]["reason"] == "second answer repeats the first"
    style = next(r for k, r in records.items() if k.startswith("knowledge:dns:style-"))
    assert not style["kept"] and style["reason"] in ("multiple-choice question without labelled options",
                                                     "fill-in-the-blank question without a blank",
                                                     "refusal in the answer", "rewritten question not about "
                                                     "'Domain Name System'")


# ---- reasoning ----------------------------------------------------------------------------------------------------

SOLUTION = "def reverse_string(s):\n    return s[::-2] + '!'\n"


@pytest.fixture
def reasoning_files(tmp_path):
    math = write_jsonl(tmp_path / "math.jsonl", [
        {"id": "m-right", "prompt": "Nia has 11 apples and buys 66 more. How many apples does Nia have now? "
         "Give the final answer on the last line as: Answer: <number>", "answer": "77"},
        {"id": "m-wrong", "prompt": "Yuki has 4 beads and gives half of them away. How many beads are left? "
         "Give the final answer on the last line as: Answer: <number>", "answer": "2"},
    ])
    code = write_jsonl(tmp_path / "code.jsonl", [
        {"id": "c-1", "prompt": "Write a Python function `reverse_string(s)` that returns every second character of "
         "s, going backwards from the last one, followed by '!'.\n\nReply with the complete function in a ```python "
         "fenced code block.", "tests": ["assert reverse_string('sandbox') == 'xbns!'",
                                         "assert reverse_string('sky') == 'ys!'"], "solution": SOLUTION},
    ])
    return math, code


def reasoning_rule(wrong_code: bool):
    def rule(prompt, tools, sampling):
        if "Rewrite this math word problem" in prompt:
            return ("A girl called Nia owned 11 apples at first; later on she purchased another 66 of them. "
                    "What is her apple count at the end?")
        if "apple count" in prompt:
            return "Starting from 11 apples, 66 are added, which makes 77 in total.\nAnswer: 77"
        if "apples" in prompt:
            return "Nia starts with 11 and adds 66.\n11 + 66 = 77\nAnswer: 77"
        if "beads" in prompt:
            return "Half of 4 is 2, and she keeps... 3?\nAnswer: 3"
        if "What does `" in prompt:
            call = re.search(r"What does `(.+?)` return", prompt).group(1)
            ns: dict = {}
            exec(SOLUTION, ns)
            return f"Tracing it gives the value.\nAnswer: {eval(call, ns)!r}"
        body = "def reverse_string(s):\n    return s[::-1]\n" if wrong_code else SOLUTION
        return f"```python\n{body}```"
    return rule


@pytest.fixture
def bwrap():
    from minicpm4.train.rl.sandbox import SandboxUnavailable, check_sandbox

    try:
        check_sandbox()
    except SandboxUnavailable as e:
        pytest.skip(str(e))


def test_reasoning_math_and_code(tmp_path, reasoning_files, bwrap):
    math, code = reasoning_files
    track = ReasoningTrack(TrackContext(), ReasoningConfig(math_path=math, code_path=code))
    records, stats = run(tmp_path, track, RuleBackend(reasoning_rule(wrong_code=False)))
    assert records["reasoning:m-right:solve"]["kept"] and records["reasoning:m-right:rephrase"]["kept"]
    assert records["reasoning:m-right:rephrase"]["messages"][0]["content"].startswith("A girl called Nia")
    assert records["reasoning:m-wrong:solve"]["reason"] == "wrong answer: got 3, expected 2"
    for variant in ("write", "predict-output", "bug-fix"):
        assert records[f"reasoning:c-1:{variant}"]["kept"], records[f"reasoning:c-1:{variant}"]["reason"]
    buggy = records["reasoning:c-1:bug-fix"]["meta"]["buggy"]
    assert buggy != SOLUTION and buggy in records["reasoning:c-1:bug-fix"]["messages"][0]["content"]


def test_reasoning_rejects_failing_code(tmp_path, reasoning_files, bwrap):
    math, code = reasoning_files
    track = ReasoningTrack(TrackContext(), ReasoningConfig(math_path=math, code_path=code, rephrase=False))
    records, _ = run(tmp_path, track, RuleBackend(reasoning_rule(wrong_code=True)))
    assert records["reasoning:c-1:write"]["reason"].startswith("tests failed: ")
    assert records["reasoning:c-1:bug-fix"]["reason"].startswith("tests failed: ")
    assert "reasoning:m-right:rephrase" not in records


def test_reasoning_without_code_needs_no_sandbox(tmp_path, reasoning_files):
    math, code = reasoning_files
    track = ReasoningTrack(TrackContext(), ReasoningConfig(math_path=math, code_path=code, code=False))
    records, _ = run(tmp_path, track, RuleBackend(reasoning_rule(wrong_code=False)))
    assert {r["meta"]["kind"] for r in records.values()} == {"math"}


# ---- instruction --------------------------------------------------------------------------------------------------

def test_instruction_keeps_a_passing_sample(tmp_path, kb, monkeypatch):
    layered = [StartsWith("My answer is"), WordCountAtMost(30), NoCommas()]
    monkeypatch.setattr(tracks_instruction, "sample_constraints", lambda rng, k, keywords=(): layered[:k])

    def rule(prompt, tools, sampling):
        if "Domain Name System" in prompt and sampling.seed == 1:  # sample 1 of 4 obeys everything
            return "My answer is that names become numbers so hosts can find each other"
        return "Well, it is a long story, with many commas, and no fixed opening."

    track = InstructionTrack(TrackContext(samples=4), InstructionConfig(kb_path=kb, max_constraints=3))
    records, _ = run(tmp_path, track, RuleBackend(rule))
    for j in (1, 2, 3):
        r = records[f"instruction:dns:c{j}"]
        assert r["kept"] and r["meta"]["passing"] == [1] and r["meta"]["borderline"] == "only 1/4 samples passed"
        assert r["messages"][1]["content"].startswith("My answer is")
        assert len(r["meta"]["constraints"]) == j  # progressive layering
        assert all(c.describe() in r["messages"][0]["content"] for c in layered[:j])
    tcp = records["instruction:tcp:c1"]
    assert not tcp["kept"] and tcp["reason"].startswith("0/4 samples pass, need 1 (sample 0: constraint starts_with")
    assert records["instruction:tcp:c3"]["reason"].startswith("0/4 samples pass")


def test_instruction_needs_positive_samples(kb):
    with pytest.raises(ValueError, match="--samples"):
        InstructionTrack(TrackContext(samples=0), InstructionConfig(kb_path=kb))


# ---- long context -------------------------------------------------------------------------------------------------

def longctx_rule(prompt, tools, sampling):
    if prompt.startswith("Here is a document:"):
        title = prompt.split("\n")[2]
        if title == "RAID":
            return ""  # no query: rejected
        return f"What does the document say about {title}?"
    query = re.search(r"Question: What does the document say about (.+)\?", prompt).group(1)
    if query == "Cache memory":
        return "I'm sorry, I cannot help with that."
    return f"It explains {query} in detail, as document one says."


def test_longctx_inserts_the_source_and_verifies(tmp_path, kb):
    ctx = TrackContext()
    track = LongContextTrack(ctx, LongContextConfig(kb_path=kb, length_range=(60, 120),
                                                    query_types=("extraction", "summary")))
    records, stats = run(tmp_path, track, RuleBackend(longctx_rule))
    dns = records["longctx:dns:extraction"]
    assert dns["kept"], dns["reason"]
    m = dns["meta"]["position"]
    assert dns["meta"]["documents"][m - 1] == "dns" and 1 <= m <= dns["meta"]["k"] + 1
    assert f"Document {m}: Domain Name System" in dns["messages"][0]["content"]
    assert 60 <= dns["meta"]["length"] <= 120 and dns["meta"]["length_unit"] == "chars/4 estimate"
    assert records["longctx:raid:summary"]["reason"] == "empty query"
    assert records["longctx:cache:extraction"]["reason"] == "refusal in the answer"
    assert stats["tracks"]["longctx"]["info"]["length_unit"] == "chars/4 estimate"


def test_longctx_rejects_a_context_outside_the_range(tmp_path, kb):
    track = LongContextTrack(TrackContext(), LongContextConfig(kb_path=kb, length_range=(100_000, 100_001),
                                                               query_types=("open-qa",)))
    records, _ = run(tmp_path, track, RuleBackend(longctx_rule))
    assert re.fullmatch(r"context length \d+ outside 100000\.\.100001", records["longctx:dns:open-qa"]["reason"])
    assert records["longctx:dns:open-qa"]["meta"]["random_fill"] >= 0


# ---- tool ---------------------------------------------------------------------------------------------------------

def tool_rule(prompt, tools, sampling):
    if "Tokyo" in prompt:
        return ("<|thought_start|>The user wants the clock in Tokyo.<|thought_end|>"
                "<|tool_call_start|>get_current_time(timezone=\"Asia/Tokyo\")<|tool_call_end|>")
    if "London" in prompt:
        return "<|tool_call_start|>convert_time(source_timezone=\"Europe/London\", time=\"14:30\")<|tool_call_end|>"
    return "I do not know."


def test_tool_calls_verified_against_schema_and_gold(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"id": "time", "query": "What time is it in Tokyo?", "tools": ["get_current_time"]},
        {"id": "convert", "query": "If it is 14:30 in London, what time is it in Singapore?", "tools": ["convert_time"]},
        {"id": "plain", "query": "Tell me a joke.", "tools": ["calculate"]},
    ])
    track = ToolTrack(TrackContext(), ToolConfig(seeds_path=seeds))
    backend = RuleBackend(tool_rule)
    records, stats = run(tmp_path, track, backend)
    ok = records["tool:time:all-tools"]
    assert ok["kept"] and ok["meta"]["cot"] and ok["meta"]["calls"] == [
        {"name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}}]
    assert [m["role"] for m in ok["messages"]] == ["system", "user", "assistant"]
    assert ok["messages"][2]["content"] == ("<|thought_start|>The user wants the clock in Tokyo.<|thought_end|>"
                                            "<|tool_call_start|>get_current_time(timezone='Asia/Tokyo')<|tool_call_end|>")
    assert "# Tools" in ok["messages"][0]["content"] and len(ok["tools"]) == 8
    assert records["tool:convert:all-tools"]["reason"] == "schema: 'target_timezone' is a required property"
    assert records["tool:plain:all-tools"]["reason"] == "no tool call"
    for seed, gold in (("time", "get_current_time"), ("convert", "convert_time"), ("plain", "calculate")):
        sub = records[f"tool:{seed}:subset"]
        assert len(sub["tools"]) < 8
        if gold not in sub["meta"]["offered"]:  # the gold tool was not offered: rejected, the model never asked
            assert sub["reason"] == f"gold tool '{gold}' missing from the tool set"
            assert sub["messages"][-1]["role"] == "user"
    asked = len(backend.prompts)
    assert asked == 3 + sum(r["meta"]["gold"][0] in r["meta"]["offered"] for k, r in records.items() if "subset" in k)


def test_subsets_drop_the_gold_tool_sometimes():
    track = ToolTrack(TrackContext())
    offered = [track.offered("subset", TrackContext().rng("tool", s["id"])) for s in track.seeds]
    missing = sum(not set(s["tools"]) <= {t["function"]["name"] for t in o} for s, o in zip(track.seeds, offered))
    assert 0 < missing < len(track.seeds)


def test_shipped_assets_are_valid():
    from minicpm4.data.synth.tool_schema import check_tool_set
    from minicpm4.data.synth.tracks_tool import SEEDS_PATH, TOOLS_PATH, load_seeds

    tools = json.loads(TOOLS_PATH.read_text())
    check_tool_set(tools)
    assert len(tools) >= 8 and len(load_seeds(SEEDS_PATH, {t["function"]["name"] for t in tools})) >= 30
