"""The MCP host against real third-party servers from PyPI (mcp-server-time, mcp-server-calculator, started as
subprocesses over stdio), with a scripted model for the control flow of the think -> call -> observe loop."""

from __future__ import annotations

import json
import sys

import anyio
import pytest

from minicpm4.apps.mcp_host import ServerSpec, Toolbox
from minicpm4.apps.tool_calls import CALL_END, CALL_START, THOUGHT_END, THOUGHT_START
from minicpm4.errors import UserError
from tests.apps.mcp_support import ScriptedBackend, server_command


@pytest.fixture(scope="module")
def time_server() -> str:
    return server_command("mcp-server-time")


@pytest.fixture(scope="module")
def calculator() -> str:
    return server_command("mcp-server-calculator")


def with_toolbox(commands: list[str], body):
    async def main():
        async with Toolbox.connect([ServerSpec.parse(c) for c in commands]) as box:
            return await body(box)
    return anyio.run(main)


def test_tools_of_both_servers_are_listed_as_openai_specs(time_server, calculator):
    async def body(box):
        return box.tools, dict(box.owner)
    tools, owner = with_toolbox([time_server, calculator], body)
    names = [t["function"]["name"] for t in tools]
    assert names == ["get_current_time", "convert_time", "calculate"]
    assert owner["calculate"] == calculator and owner["convert_time"] == time_server
    spec = tools[0]["function"]
    assert spec["parameters"]["required"] == ["timezone"] and "timezone" in spec["description"].lower()


def test_calls_run_through_the_servers_and_errors_come_back_as_results(time_server, calculator):
    async def body(box):
        return (await box.call("get_current_time", {"timezone": "Asia/Tokyo"}),
                await box.call("calculate", {"expression": "2**10 + 3"}),
                await box.call("get_current_time", {"timezone": "Mars/Olympus"}),
                await box.call("no_such_tool", {}))
    now, calc, bad_zone, unknown = with_toolbox([time_server, calculator], body)
    data = json.loads(now.text)
    assert not now.is_error and data["timezone"] == "Asia/Tokyo" and data["datetime"].endswith("+09:00")
    assert calc.text == "1027" and not calc.is_error
    assert bad_zone.is_error and "Mars/Olympus" in bad_zone.text
    assert unknown.is_error and "calculate" in unknown.text


def test_a_server_that_does_not_start_is_one_clear_error(tmp_path):
    pytest.importorskip("mcp")
    broken = tmp_path / "broken-server"
    broken.write_text("#!/bin/sh\necho 'config file missing' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(UserError, match="(?s)did not start.*config file missing"):
        with_toolbox([str(broken)], lambda box: None)
    with pytest.raises(UserError, match="not an executable"):
        ServerSpec.parse("no-such-mcp-server --flag")
    with pytest.raises(UserError, match="empty command"):
        ServerSpec.parse("  ")


def test_two_servers_offering_the_same_tool_are_refused(time_server):
    with pytest.raises(UserError, match="'get_current_time' is offered by two servers"):
        with_toolbox([time_server, f"{time_server} --local-timezone Etc/UTC"], lambda box: None)


def agent(backend, commands, query, max_steps=5):
    from minicpm4.apps.agent import run_agent

    steps = []

    async def body(box):
        return await run_agent(backend, box, [{"role": "user", "content": query}], max_steps, on_step=steps.append)
    return with_toolbox(commands, body), steps


def test_scripted_conversation_calls_observes_and_answers(time_server):
    backend = ScriptedBackend([
        f"{THOUGHT_START}the user wants Tokyo's clock{THOUGHT_END}{CALL_START}get_current_time(timezone=\"Asia/Tokyo\")"
        f"{CALL_END}",
        f"{CALL_START}convert_time(source_timezone='Asia/Tokyo', time='09:30', target_timezone='Europe/London'){CALL_END}",
        "It is 00:30 in London."])
    result, steps = agent(backend, [time_server], "What time is it in Tokyo, and 09:30 there in London?")
    assert result.stopped == "answer" and result.answer == "It is 00:30 in London."
    assert [s.calls[0].name for s in steps[:2]] == ["get_current_time", "convert_time"] and not steps[2].calls
    assert steps[0].turn.thought == "the user wants Tokyo's clock"
    # the model saw the tools every time, and each observation before its next turn
    assert all([t["function"]["name"] for t in tools] == ["get_current_time", "convert_time"]
               for _, tools in backend.seen)
    second_prompt = backend.seen[1][0]
    assert [m["role"] for m in second_prompt] == ["user", "assistant", "tool"]
    assert second_prompt[1]["tool_calls"][0]["id"] == second_prompt[2]["tool_call_id"]
    assert json.loads(second_prompt[2]["content"])["timezone"] == "Asia/Tokyo"
    converted = json.loads(steps[1].results[0].text)
    assert converted["source"]["datetime"][11:16] == "09:30" and converted["target"]["timezone"] == "Europe/London"
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


def test_the_step_limit_stops_a_model_that_never_answers(time_server):
    call = f"{CALL_START}get_current_time(timezone='Etc/UTC'){CALL_END}"
    result, steps = agent(ScriptedBackend([call] * 3), [time_server], "time?", max_steps=3)
    assert result.stopped == "step_limit" and result.answer is None and len(steps) == 3


def test_a_malformed_call_is_the_answer_text_and_nothing_runs(time_server):
    broken = f"{CALL_START}get_current_time(timezone=Asia/Tokyo{CALL_END}"
    result, steps = agent(ScriptedBackend([broken]), [time_server], "time in Tokyo?")
    assert result.stopped == "answer" and result.answer == broken and steps[0].results == []


def test_cli_one_shot_with_a_scripted_model_prints_each_step(time_server, calculator, monkeypatch, capsys):
    from minicpm4 import cli
    from minicpm4.apps import mcp_cli

    backend = ScriptedBackend([f"{CALL_START}calculate(expression='37 * 12'){CALL_END}", "37 * 12 = 444."])
    monkeypatch.setattr(mcp_cli, "make_backend", lambda args: backend)
    code = cli.main(["mcp", "--server", time_server, "--server", calculator, "-q", "What is 37 times 12?"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "-> calculate(expression='37 * 12')" in out.out and "<- 444" in out.out
    assert "assistant: 37 * 12 = 444." in out.out and "tools: get_current_time, convert_time, calculate" in out.err


def test_cli_errors_are_one_line(capsys):
    from minicpm4 import cli

    assert cli.main(["mcp", "-q", "hi"]) == 2
    assert "at least one --server" in capsys.readouterr().err
    assert cli.main(["mcp", "--server", sys.executable, "--max-steps", "0", "-q", "hi"]) == 2
    assert "--max-steps" in capsys.readouterr().err
