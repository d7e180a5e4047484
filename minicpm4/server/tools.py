"""OpenAI tool calling on /v1/chat/completions, in MiniCPM4's format (minicpm4/apps/tool_calls.py).

Requests: `tools` become a system-prompt section; assistant turns with `tool_calls` are rendered as the model
writes calls; `tool` turns carry results. tool_choice "none" offers nothing; "auto" (the default with tools)
lets the model decide; "required" / a named function start the assistant turn with the call marker (and the
function's name), since decoding cannot be constrained otherwise. Replies: the text is parsed; valid calls
become `tool_calls` (finish_reason "tool_calls"), anything malformed stays text.
"""

from __future__ import annotations

import json
import uuid

from minicpm4.apps.tool_calls import CALL_START, parse_reply, render_conversation
from minicpm4.server.errors import ApiError
from minicpm4.server.protocol import (ChatCompletionRequest, ChatMessage, DeltaToolCall, FunctionCall,
                                      MessageToolCall, NamedToolChoice)


def active_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The offered tools as plain dicts, or None (no tools, or tool_choice "none")."""
    if not body.tools or body.tool_choice == "none":
        if isinstance(body.tool_choice, NamedToolChoice) or body.tool_choice == "required":
            raise ApiError(400, f"tool_choice {body.tool_choice!r} needs 'tools'", "tool_choice")
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if isinstance(body.tool_choice, NamedToolChoice):
        names = {t["function"]["name"] for t in tools}
        if body.tool_choice.function.name not in names:
            raise ApiError(400, f"tool_choice names {body.tool_choice.function.name!r}, which is not in 'tools'",
                           "tool_choice")
    return tools


def reply_prefix(body: ChatCompletionRequest) -> str:
    """Text the assistant turn starts with (the forced call of "required" / a named tool_choice)."""
    if body.tool_choice == "required":
        return CALL_START
    if isinstance(body.tool_choice, NamedToolChoice):
        return CALL_START + body.tool_choice.function.name + "("
    return ""


def render_messages(messages: list[ChatMessage], tools: list[dict] | None = None) -> list[dict[str, str]]:
    """Chat-template messages (role, content) for the request, the tools section in the system message."""
    try:
        return render_conversation([m.model_dump(exclude_none=True) for m in messages], tools)
    except ValueError as e:  # the message names the field, e.g. messages[2].tool_calls
        field = str(e).split(":", 1)[0]
        raise ApiError(400, str(e), field) from e


def reply_message(text: str, tools: list[dict] | None, prefix: str = "") -> tuple[str | None, list[MessageToolCall] | None]:
    """The generated text -> (content, tool_calls): calls only when every call block parses."""
    if tools is None:
        return text, None
    parsed = parse_reply(prefix + text, tools)
    if not parsed.calls:
        return text, None
    calls = [MessageToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                             function=FunctionCall(name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False)))
             for c in parsed.calls]
    return parsed.content or None, calls


def delta_calls(calls: list[MessageToolCall]) -> list[DeltaToolCall]:
    return [DeltaToolCall(index=i, id=c.id, function=c.function) for i, c in enumerate(calls)]
