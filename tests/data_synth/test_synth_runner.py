"""The synthesis runner and its files: resume after a kill (a truncated last line included), near-duplicate
rejection, refused requests, the review queue and its merge, the stats file, the record schema and the CLI."""

from __future__ import annotations

import io
import json
import re
import urllib.error
from functools import partial

import pytest

from minicpm4.apps.chat_backend import Sampling, turn_from_text
from minicpm4.data.synth.records import RECORD_SCHEMA, Record, load_records, record_id, validate_record
from minicpm4.data.synth.review import apply_review, review_path
from minicpm4.data.synth.runner import RunConfig, reason_class, run_synthesis, stats_path
from minicpm4.data.synth.track import Job, Request, assistant, check_reply, reply_text, user
from minicpm4.errors import UserError
from minicpm4.train.sft_data import read_jsonl

SAMPLING = Sampling(32, 0.0)


class EchoTrack:
    """Job i asks "Say item i" and keeps the reply if it names item i; two variants per job."""

    name = "knowledge"

    def __init__(self, n: int) -> None:
        self.n = n

    def info(self) -> dict:
        return {"items": self.n}

    def jobs(self, limit):
        return [Job(self.name, f"item{i}", ("a", "b"), partial(self._steps, i=i)) for i in range(self.n)][:limit]

    def _steps(self, job, i):
        prompts = [f"Say item {i} ({v})" for v in job.variants]
        turns = yield [Request([user(p)]) for p in prompts]
        out = []
        for v, p, t in zip(job.variants, prompts, turns):
            text = reply_text(t)
            verdict = check_reply(text, p)
            if verdict.ok and f"item {i}" not in text:
                from minicpm4.data.synth.verdict import Verdict

                verdict = Verdict.failed(f"wrong item in {text!r}")
            out.append(job.record(v, [user(p), assistant(text)], verdict))
        return out


class Backend:
    """Replies "Here is item i, variant v, told in a distinct way #k" (unique per prompt); raises after `fail_after`
    replies (a kill); remembers every prompt."""

    def __init__(self, fail_after: int | None = None, reply=None) -> None:
        self.fail_after, self.prompts, self.reply = fail_after, [], reply

    def complete(self, messages, tools=None, sampling=None, prefix=""):
        prompt = messages[-1]["content"]
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.prompts.append(prompt)
        if self.reply is not None:
            return turn_from_text(self.reply(prompt), tools)
        words = " ".join(f"w{len(self.prompts)}x{j}" for j in range(8))
        return turn_from_text(f"Here is {prompt[4:]}, told as {words}", tools)

    def complete_batch(self, conversations, tools=None, sampling=None, prefix=""):
        return [self.complete(m, tools, sampling, prefix) for m in conversations]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_resume_after_a_kill_regenerates_nothing_finished(tmp_path):
    out = tmp_path / "synth.jsonl"
    config = RunConfig(out=out, concurrency=2, show_progress=False, review_fraction=0.0)
    with pytest.raises(KeyboardInterrupt):
        run_synthesis([EchoTrack(6)], Backend(fail_after=5), SAMPLING, config)
    first = lines(out)
    assert 0 < len(first) < 12 and json.loads(stats_path(out).read_text())["completed"] is False
    with open(out, "a") as f:
        f.write('{"id": "knowledge:item5:a", "track": "know')  # killed mid-line
    again = Backend()
    stats = run_synthesis([EchoTrack(6)], again, SAMPLING, config)
    final = lines(out)
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) == 12 and final[:len(first)] == first  # old records untouched, no repeats
    finished = {r["meta"]["seed"] for r in first if sum(x["meta"]["seed"] == r["meta"]["seed"] for x in first) == 2}
    assert not any(f"Say {seed[:4]} {seed[4:]} " in p for seed in finished for p in again.prompts)
    assert stats["completed"] and stats["tracks"]["knowledge"]["already_done"] == len(first)
    assert stats["tracks"]["knowledge"]["generated"] == 12 - len(first)
    # a third run finds everything done and asks nothing
    idle = Backend()
    assert run_synthesis([EchoTrack(6)], idle, SAMPLING, config)["records"] == 0 and idle.prompts == []


def test_truncated_last_line_is_cut_but_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "tr')
    assert [r["id"] for r in load_records(path)] == ["a", "b"]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\n{"id": "b"}')  # complete, but the newline never made it
    assert len(load_records(path)) == 2 and path.read_text().endswith('"b"}\n')
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(UserError, match=r"x.jsonl:2: not valid JSON"):
        load_records(path)


def test_near_duplicates_are_rejected_naming_the_kept_record(tmp_path):
    out = tmp_path / "synth.jsonl"
    reply = "Here is item {}: " + " ".join(f"the same long answer sentence number {j}." for j in range(12))
    backend = Backend(reply=lambda p: reply.format(p.split()[2]))
    stats = run_synthesis([EchoTrack(2)], backend, SAMPLING, RunConfig(out=out, show_progress=False))
    records = {r["id"]: r for r in lines(out)}
    assert records["knowledge:item0:a"]["kept"]
    assert records["knowledge:item0:b"]["reason"] == "near duplicate of knowledge:item0:a"
    assert stats["tracks"]["knowledge"]["rejected_by_reason"] == {"near duplicate": 2}


def test_refused_requests_reject_their_job_and_the_run_goes_on(tmp_path):
    class Refusing(Backend):
        def complete(self, messages, tools=None, sampling=None, prefix=""):
            if "item 1" in messages[-1]["content"]:
                cause = urllib.error.HTTPError("http://x/v1/chat/completions", 400, "Bad Request", {}, io.BytesIO())
                raise UserError("http://x/v1/chat/completions: HTTP 400: prompt too long") from cause
            return super().complete(messages, tools, sampling, prefix)

    out = tmp_path / "synth.jsonl"
    run_synthesis([EchoTrack(3)], Refusing(), SAMPLING, RunConfig(out=out, show_progress=False))
    records = {r["id"]: r for r in lines(out)}
    assert records["knowledge:item1:a"]["reason"].startswith("request failed: http://x/v1/chat/completions: HTTP 400")
    assert records["knowledge:item0:a"]["kept"] and records["knowledge:item2:b"]["kept"]


def test_an_unreachable_endpoint_stops_the_run(tmp_path):
    class Down(Backend):
        def complete(self, *a, **k):
            raise UserError("http://x/v1/chat/completions: cannot reach the endpoint (refused)")

    out = tmp_path / "synth.jsonl"
    with pytest.raises(UserError, match="cannot reach"):
        run_synthesis([EchoTrack(2)], Down(), SAMPLING, RunConfig(out=out, show_progress=False))
    assert lines(out) == []  # nothing recorded as rejected: a rerun retries everything


def test_review_queue_and_decisions_merge_back(tmp_path):
    out, kept = tmp_path / "synth.jsonl", tmp_path / "kept.jsonl"
    stats = run_synthesis([EchoTrack(3)], Backend(), SAMPLING,
                          RunConfig(out=out, show_progress=False, review_fraction=1.0, kept_only=kept))
    queue = lines(review_path(out))
    assert len(queue) == 6 == stats["tracks"]["knowledge"]["queued_for_review"] == stats["kept_exported"]
    assert all(e["decision"] == "" and e["why"] == "sampled" and e["messages"] for e in queue)
    queue[0]["decision"], queue[0]["note"] = "reject", "too short"
    queue[1]["decision"] = "Accept"
    review_path(out).write_text("".join(json.dumps(e) + "\n" for e in queue))
    counts = apply_review(out, kept_only=kept)
    assert counts == {"accepted": 1, "rejected": 1, "pending": 4, "unmatched": 0, "kept_exported": 5}
    records = {r["id"]: r for r in lines(out)}
    assert records[queue[0]["id"]]["reason"] == "human review: rejected: too short"
    assert records[queue[1]["id"]]["meta"]["review"] == "accepted"
    assert len(read_jsonl(kept)) == 5
    queue[0]["decision"] = "maybe"
    review_path(out).write_text("".join(json.dumps(e) + "\n" for e in queue))
    with pytest.raises(UserError, match=r"review.jsonl:1: decision 'maybe'"):
        apply_review(out)


def test_stats_file(tmp_path):
    out = tmp_path / "synth.jsonl"
    backend = Backend(reply=lambda p: "Here is item 99, the wrong one" if "(b)" in p else f"Here is {p[4:]}")
    run_synthesis([EchoTrack(4)], backend, SAMPLING, RunConfig(out=out, show_progress=False))
    stats = json.loads(stats_path(out).read_text())
    k = stats["tracks"]["knowledge"]
    assert (k["generated"], k["kept"], k["rejected"]) == (8, 4, 4) and k["rejected_by_reason"] == {"wrong item in 'Here is item N, the wrong one'": 4}
    assert stats["completed"] and stats["records"] == 8 and stats["records_per_s"] > 0 and k["info"] == {"items": 4}


def test_record_schema():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(RECORD_SCHEMA)
    good = Record(record_id("tool", "s1", "subset"), "tool", [user("q"), assistant("a")], True, "",
                  {"seed": "s1", "variant": "subset"}, [{"type": "function", "function": {"name": "f"}}]).to_dict()
    validate_record(good)
    for bad, field in ((dict(good, reason="why?"), "reason"), (dict(good, kept=False), "reason"),
                       (dict(good, meta={"variant": "x"}), "meta"), (dict(good, track="chat"), "track"),
                       (dict(good, messages=[{"role": "user", "content": None}]), "messages"),
                       (dict(good, messages=[user("q")]), "messages"), (dict(good, extra=1), "(record)")):
        with pytest.raises(ValueError, match=re.escape(f"'tool:s1:subset': {field}")):
            validate_record(bad)


def test_reason_classes():
    assert reason_class("wrong answer: got 3, expected 2") == "wrong answer"
    assert reason_class("0/4 samples pass, need 1 (sample 0: constraint x)") == "N/N samples pass, need N"
    assert reason_class("near duplicate of a:b:c") == "near duplicate"
    assert reason_class("context length 12 outside 10..11") == "context length N outside N..N"


def test_cli(tmp_path, capsys):
    from minicpm4.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--help"])
    assert e.value.code == 0 and "usage: minicpm4 data synth" in capsys.readouterr().out
    out = str(tmp_path / "o.jsonl")
    assert main(["data", "synth", "--track", "knowledge", "--out", out]) == 2
    assert "minicpm4 serve" in capsys.readouterr().err
    assert main(["data", "synth", "--track", "knowledge,chat", "--out", out, "--base-url", "http://x"]) == 2
    assert "--track knowledge,chat: unknown chat" in capsys.readouterr().err
    assert main(["data", "synth", "--track", "instruction", "--out", out, "--temperature", "0",
                 "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "needs a temperature > 0" in capsys.readouterr().err
    assert main(["data", "synth", "--track", "tool", "--out", out, "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "cannot reach the endpoint" in capsys.readouterr().err
    assert main(["data", "synth", "--track", "longctx", "--out", out, "--length-range", "9,3",
                 "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--length-range 9,3" in capsys.readouterr().err


def test_cli_runs_in_process_and_resumes(tmp_path, capsys):
    from minicpm4.api import DEFAULT_MODEL_DIR
    from minicpm4.cli import main

    out, kept = tmp_path / "o.jsonl", tmp_path / "kept.jsonl"
    argv = ["data", "synth", "--track", "tool", "--limit", "2", "--out", str(out), "--model", str(DEFAULT_MODEL_DIR),
            "--dtype", "float32", "--max-tokens", "16", "--no-progress", "--kept-only", str(kept)]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(lines(out)) == 4 and kept.exists() and stats_path(out).exists()
    assert main(argv) == 0 and "0 records in" in capsys.readouterr().out
    assert len(lines(out)) == 4
