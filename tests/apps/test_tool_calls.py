"""MiniCPM4 tool-call format: rendering and parsing golden cases (apps/tool_calls.py, server/tools.py)."""

from __future__ import annotations

import json

import pytest

from minicpm4.apps.tool_calls import CALL_END, CALL_START, ToolCall, format_assistant, format_call, parse_reply

TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "current time",
                                           "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "calculate",
                                           "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]


@pytest.mark.parametrize("text, calls, content", [
    (f'{CALL_START}get_time(timezone="Europe/Paris"){CALL_END}', [("get_time", {"timezone": "Europe/Paris"})], ""),
    (f'<|thought_start|>I need the time<|thought_end|>{CALL_START}get_time("UTC"){CALL_END}',
     [("get_time", {"timezone": "UTC"})], ""),  # positional -> schema order; the thought is not content
    (f'Let me check.{CALL_START}get_time(timezone="UTC")\ncalculate(expression="2 * (3 + 4)"){CALL_END}',
     [("get_time", {"timezone": "UTC"}), ("calculate", {"expression": "2 * (3 + 4)"})], "Let me check."),
    (f'{CALL_START}calculate(expression="say \\"hi\\", ok"){CALL_END}', [("calculate", {"expression": 'say "hi", ok'})], ""),
    (f'{CALL_START}get_time(timezone="UTC")', [("get_time", {"timezone": "UTC"})], ""),  # end marker cut off by EOS
    (f'{CALL_START}get_time(timezone="UTC"){CALL_END}{CALL_START}calculate(expression="1+1"){CALL_END}',
     [("get_time", {"timezone": "UTC"}), ("calculate", {"expression": "1+1"})], ""),
])
def test_valid_calls_parse(text, calls, content):
    parsed = parse_reply(text, TOOLS)
    assert [(c.name, c.arguments) for c in parsed.calls] == calls and parsed.content == content


@pytest.mark.parametrize("text", [
    "just text, no call",
    f"{CALL_START}get_time(timezone=){CALL_END}",  # syntax error
    f'{CALL_START}os.system("rm -rf /"){CALL_END}',  # attribute call
    f'{CALL_START}get_time(timezone=__import__("os").getcwd()){CALL_END}',  # an expression, not a literal
    f'{CALL_START}delete_everything(){CALL_END}',  # not an offered tool
    f'{CALL_START}get_time(**{{"timezone": "UTC"}}){CALL_END}',
    f'{CALL_START}get_time("a", "b"){CALL_END}',  # more positionals than parameters
    f'{CALL_START}x = 1{CALL_END}',
    f'{CALL_START}get_time(timezone="UTC"){CALL_END} and {CALL_START}broken({CALL_END}',  # one bad block: no calls
])
def test_malformed_replies_stay_text(text):
    parsed = parse_reply(text, TOOLS)
    assert parsed.calls == [] and parsed.content == text


def test_format_round_trips_through_parse():
    calls = [ToolCall("calculate", {"expression": "1/3", "precision": 4, "exact": True, "notes": None,
                                    "vars": {"x": [1, 2.5, "y\n"]}})]
    text = format_assistant("ok", calls)
    assert text.startswith("ok" + CALL_START) and text.endswith(CALL_END)
    assert parse_reply(text).calls == calls  # any name accepted without a tool list
    assert format_call("f", {"a": True, "b": None}) == "f(a=True, b=None)"


def test_server_rendering_of_tools_and_history():
    from minicpm4.server.protocol import ChatCompletionRequest
    from minicpm4.server.tools import active_tools, render_messages, reply_message

    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What time is it in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "Europe/Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "14:05"}], "tools": TOOLS})
    tools = active_tools(body)
    msgs = render_messages(body.messages, tools)
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.") and "get_time" in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": f'{CALL_START}get_time(timezone=\'Europe/Paris\'){CALL_END}'}
    assert msgs[3] == {"role": "tool", "content": "14:05"}
    content, calls = reply_message(f'{CALL_START}get_time(timezone="UTC"){CALL_END}', tools)
    assert content is None and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments) == {"timezone": "UTC"}
    assert reply_message("plain answer", tools) == ("plain answer", None)
    assert reply_message("anything", None) == ("anything", None)
