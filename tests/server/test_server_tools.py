"""OpenAI tool calling against a live server with the official client: requests with tools and tool history,
tool_choice, errors as 400s, and replies parsed into tool_calls (streaming too). For the call path the model's
text is scripted (a stub model: the bundled one was not trained on tool calls); parsing, response building,
HTTP and the client's own parsing are real."""

from __future__ import annotations

import json

import pytest

for _dep in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_dep)
openai = pytest.importorskip("openai")

from minicpm4.apps.tool_calls import CALL_END, CALL_START  # noqa: E402
from minicpm4.server import chat as chat_module  # noqa: E402
from minicpm4.server import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "minicpm4-tools"
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "the current time in a timezone",
                                           "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                                                          "required": ["timezone"]}}}]
HISTORY = [{"role": "user", "content": "What time is it in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
               "name": "get_time", "arguments": json.dumps({"timezone": "Europe/Paris"})}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "14:05"}]


@pytest.fixture(scope="module")
def client(servers):
    live = servers.start(create_app(servers.engine(), MODEL))
    return openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0, timeout=60)


def scripted(monkeypatch, text: str) -> None:
    """The model's reply replaced by `text` where the handler reads it."""
    real = chat_module.reply_message
    monkeypatch.setattr(chat_module, "reply_message", lambda _text, tools, prefix="": real(text, tools, prefix))


def test_tools_and_tool_history_are_accepted(client):
    out = client.chat.completions.create(model=MODEL, messages=HISTORY, tools=TOOLS, max_tokens=8)
    choice = out.choices[0]
    assert choice.finish_reason in ("length", "stop", "tool_calls")
    assert (choice.message.tool_calls is None) == (choice.finish_reason != "tool_calls")


def test_a_call_comes_back_as_tool_calls(client, monkeypatch):
    scripted(monkeypatch, f'<|thought_start|>check<|thought_end|>{CALL_START}get_time(timezone="Asia/Tokyo"){CALL_END}')
    out = client.chat.completions.create(model=MODEL, messages=HISTORY[:1], tools=TOOLS, max_tokens=4)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"timezone": "Asia/Tokyo"}


def test_a_streamed_call_comes_back_as_tool_calls(client, monkeypatch):
    scripted(monkeypatch, f'{CALL_START}get_time(timezone="UTC"){CALL_END}')
    chunks = list(client.chat.completions.create(model=MODEL, messages=HISTORY[:1], tools=TOOLS, max_tokens=4,
                                                 stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [("get_time", {"timezone": "UTC"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_malformed_call_is_plain_text(client, monkeypatch):
    bad = f"{CALL_START}get_time(timezone=){CALL_END}"
    scripted(monkeypatch, bad)
    out = client.chat.completions.create(model=MODEL, messages=HISTORY[:1], tools=TOOLS, max_tokens=4)
    assert out.choices[0].message.content == bad and out.choices[0].message.tool_calls is None


def test_forced_tool_choice_starts_the_call(client, monkeypatch):
    seen = {}
    real = chat_module.reply_message

    def spy(text, tools, prefix=""):
        seen["prefix"] = prefix
        return real(text, tools, prefix)

    monkeypatch.setattr(chat_module, "reply_message", spy)
    client.chat.completions.create(model=MODEL, messages=HISTORY[:1], tools=TOOLS, max_tokens=4,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert seen["prefix"] == CALL_START + "get_time("


@pytest.mark.parametrize("kwargs, param", [
    (dict(tool_choice="required"), "tool_choice"),  # no tools
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=TOOLS, messages=[{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_time", "arguments": "{not json"}}]}]), "messages[0].tool_calls"),
])
def test_bad_tool_requests_are_400(client, kwargs, param):
    kwargs = {"messages": HISTORY[:1], **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4, **kwargs)
    assert e.value.body["param"] == param
