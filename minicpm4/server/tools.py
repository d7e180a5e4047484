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

from minicpm4.apps.tool_calls import CALL_START, ToolCall, format_assistant, parse_reply, tools_system_prompt
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


def _content(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    return m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)


def render_messages(messages: list[ChatMessage], tools: list[dict] | None = None) -> list[dict[str, str]]:
    """Chat-template messages (role, content) for the request, the tools section in the system message."""
    out = []
    for i, m in enumerate(messages):
        content = _content(m)
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except json.JSONDecodeError as e:
                    raise ApiError(400, f"tool call arguments are not JSON: {e}", f"messages[{i}].tool_calls") from e
                if not isinstance(args, dict):
                    raise ApiError(400, "tool call arguments must be a JSON object", f"messages[{i}].tool_calls")
                calls.append(ToolCall(c.function.name, args))
            content = format_assistant(content, calls)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if tools:
        section = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


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
