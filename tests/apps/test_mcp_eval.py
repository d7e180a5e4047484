"""MCP evaluation and data: the per-call metrics on golden cases, the held-out split of the task templates, the
synthesized trajectories (through the live servers), and `mcp eval` / `mcp synth` end to end with a stub model."""

from __future__ import annotations

import json

import anyio
import pytest

from minicpm4.apps.mcp_eval import CallScore, arithmetic_value, evaluate, summarize, values_match
from minicpm4.apps.mcp_tasks import (CALCULATE, CONVERT_TIME, CURRENT_TIME, FAMILIES, ToolTask, answer_text,
                                     generate_tasks, resolve_call)
from minicpm4.apps.tool_calls import CALL_END, CALL_START, ToolCall
from tests.apps.mcp_support import ScriptedBackend, server_command


@pytest.mark.parametrize("predicted, gold, same", [
    ("37 * 12", "37*12", True), ("12*37", "37 * 12", True), ("sqrt(81)", "9", True), ("0.15*40", "15 / 100 * 40", True),
    ("37 * 13", "37 * 12", False), ("Asia/Tokyo", "Asia/Tokyo", True), ("Asia/Tokio", "Asia/Tokyo", False),
    ("asia/tokyo", "Asia/Tokyo", False), ("14:30", "14:30", True), ("14:31", "14:30", False), (3, 3, True),
    ("3", 3, False), ("__import__('os').getpid()", "1", False),
])
def test_values_match(predicted, gold, same):
    assert values_match(predicted, gold) is same


def test_arithmetic_is_walked_not_evaluated():
    assert arithmetic_value("2 ** 10 + -3 % 5") == 1026.0
    assert arithmetic_value("9 ** 9 ** 9") is None  # capped exponent: no hang
    assert arithmetic_value("1 / 0") is None
    assert arithmetic_value("open('x')") is None and arithmetic_value("().__class__") is None


def test_call_scores_are_nested_and_every_item_counts():
    gold = ToolCall("convert_time", {"source_timezone": "Asia/Tokyo", "time": "09:30", "target_timezone": "Europe/Paris"})
    assert CallScore.of(ToolCall("convert_time", dict(gold.arguments)), gold) == CallScore(True, True, True)
    assert CallScore.of(ToolCall("convert_time", {**gold.arguments, "time": "9:30"}), gold) == CallScore(True, True, False)
    assert CallScore.of(ToolCall("convert_time", {"time": "09:30"}), gold) == CallScore(True, False, False)
    assert CallScore.of(ToolCall("get_current_time", {"timezone": "Asia/Tokyo"}), gold) == CallScore(False, False, False)
    assert CallScore.of(None, gold) == CallScore(False, False, False)


def test_test_templates_are_held_out_from_training():
    for family in FAMILIES.values():
        train = {t for t, s in family if s == "train"}
        test = {t for t, s in family if s == "test"}
        assert train and test and not train & test
    test = generate_tasks("test", 200, seed=0)
    train = generate_tasks("train", 2000, seed=0, exclude_queries={t.query for t in test})
    test_templates = {t for fam in (CURRENT_TIME, CONVERT_TIME, CALCULATE) for t, s in fam if s == "test"}
    assert not {t.query for t in train} & {t.query for t in test}
    assert len({t.query for t in train}) == 2000 and all(t.split == "train" for t in train)
    assert any(t.kind == "calculate" for t in test) and test_templates
    assert [t.to_json() for t in generate_tasks("test", 20, seed=0)] == [t.to_json() for t in test[:20]]
    only_calc = generate_tasks("train", 50, seed=1, available={"calculate"})
    assert {t.kind for t in only_calc} == {"calculate"}


def test_shipped_test_set_is_the_generated_one():
    from minicpm4.apps.mcp_cli import TEST_TASKS, load_tasks

    shipped = load_tasks(TEST_TASKS)
    assert [t.to_json() for t in shipped] == [t.to_json() for t in generate_tasks("test", len(shipped), seed=0)]


def test_second_steps_use_the_first_observation_and_answers_restate_them():
    task = ToolTask("q", [ToolCall("get_current_time", {"timezone": "Asia/Tokyo"}),
                          ToolCall("convert_time", {"source_timezone": "Asia/Tokyo", "time": "{observed_time}",
                                                    "target_timezone": "Europe/Paris"})], "time_then_convert", "test")
    now = json.dumps({"timezone": "Asia/Tokyo", "datetime": "2026-01-05T17:42:10+09:00", "day_of_week": "Monday",
                      "is_dst": False})
    assert resolve_call(task.calls[1], [now]).arguments["time"] == "17:42"
    conv = json.dumps({"source": {"timezone": "Asia/Tokyo", "datetime": "2026-01-05T17:42:00+09:00"},
                       "target": {"timezone": "Europe/Paris", "datetime": "2026-01-05T09:42:00+01:00"}})
    assert answer_text(task, [now, conv]) == ("It is 17:42 on Monday in Asia/Tokyo. "
                                              "17:42 in Asia/Tokyo is 09:42 in Europe/Paris.")


@pytest.fixture(scope="module")
def servers() -> list[str]:
    return [server_command("mcp-server-time"), server_command("mcp-server-calculator")]


def test_evaluate_scores_a_stub_model_given_gold_previous_steps(servers):
    from minicpm4.apps.mcp_host import ServerSpec, Toolbox

    tasks = [ToolTask("What is 6 times 7?", [ToolCall("calculate", {"expression": "6 * 7"})], "calculate", "test",
                      ["calculate"]),
             ToolTask("time in Tokyo, then in Paris", [
                 ToolCall("get_current_time", {"timezone": "Asia/Tokyo"}),
                 ToolCall("convert_time", {"source_timezone": "Asia/Tokyo", "time": "{observed_time}",
                                           "target_timezone": "Europe/Paris"})], "time_then_convert", "test")]
    replies = [f"{CALL_START}calculate(expression='7*6'){CALL_END}",  # right (same value)
               f"{CALL_START}get_current_time(timezone='Asia/Tokyo'){CALL_END}",  # right
               f"{CALL_START}convert_time(source_timezone='Asia/Tokyo', time='25:99', "
               f"target_timezone='Europe/Paris'){CALL_END}"]  # right names, wrong value, fails on the server
    backend = ScriptedBackend(replies)

    async def main():
        async with Toolbox.connect([ServerSpec.parse(c) for c in servers]) as box:
            return await evaluate(backend, box, tasks)
    metrics, items = anyio.run(main)
    assert [i.score for i in items] == [CallScore(True, True, True), CallScore(True, True, True),
                                        CallScore(True, True, False)]
    assert [i.executed_ok for i in items] == [True, True, False]
    assert (metrics.items, metrics.name, metrics.param_values) == (3, 1.0, pytest.approx(2 / 3))
    # the third prompt holds the gold first step and its real observation
    prompt = backend.seen[2][0]
    assert [m["role"] for m in prompt] == ["user", "assistant", "tool"]
    observed = json.loads(prompt[2]["content"])["datetime"][11:16]
    assert items[2].gold["arguments"]["time"] == observed
    assert metrics.by_tool["calculate"]["param_values"] == 1.0 and metrics.by_tool["convert_time"]["items"] == 1
    assert summarize([]).items == 0


def test_synth_writes_trajectories_that_render_and_pass_the_servers(servers, tmp_path):
    from minicpm4 import cli
    from minicpm4.train.sft_data import read_jsonl

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"word {i}?"},
                                                      {"role": "assistant", "content": f"meaning {i}"}]}) + "\n"
                             for i in range(20)))
    out = tmp_path / "synth"
    argv = ["mcp", "synth", "--out", str(out), "--train", "30", "--val", "4", "--test", "10", "--mix-chat", str(chats)]
    for s in servers:
        argv += ["--server", s]
    assert cli.main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped_failed_calls"] == 0 and stats["test"] == 10 and stats["train_kinds"]["chat"] == 10
    train = read_jsonl(out / "train.jsonl")
    tool_rows = [m for m in train if any(x["role"] == "assistant" and CALL_START in x["content"] for x in m)]
    assert len(tool_rows) == 30 and len(train) == 40
    for messages in tool_rows:
        assert messages[0]["role"] == "system" and "# Tools" in messages[0]["content"]
        roles = [m["role"] for m in messages[1:]]
        assert roles[0] == "user" and roles[-1] == "assistant" and "tool" in roles
    test_queries = {json.loads(line)["query"] for line in (out / "test.jsonl").read_text().splitlines()}
    assert not test_queries & {m[1]["content"] for m in tool_rows}


def test_eval_cli_on_the_shipped_tasks_with_a_stub_model(servers, tmp_path, monkeypatch, capsys):
    from minicpm4 import cli
    from minicpm4.apps import mcp_cli

    monkeypatch.setattr(mcp_cli, "make_backend", lambda args: ScriptedBackend(["no tools today"] * 50))
    out = tmp_path / "eval.json"
    argv = ["mcp", "eval", "--limit", "5", "--out", str(out)]
    for s in servers:
        argv += ["--server", s]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "name 0.0 / param names 0.0 / param values 0.0" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["metrics"]["items"] == len(saved["items"]) >= 5
