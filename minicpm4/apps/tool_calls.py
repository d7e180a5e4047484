"""MiniCPM4's tool-call format (MINICPM4.md §9.2) <-> OpenAI `tools` / `tool_calls`.

The prompt: a system message that lists the tools as JSON (OpenAI's function schemas) and says how to call them;
the assistant writes an optional `<|thought_start|>…<|thought_end|>`, then `<|tool_call_start|>` + Python-style
calls, one per line, e.g. `get_time(timezone="Europe/Paris")`, + `<|tool_call_end|>`. Results come back as
`tool` messages. (The report gives the markers and the call syntax but not its system prompt; ours is below.)

Parsing uses `ast` and `ast.literal_eval` on each argument, never `eval`: a call is a bare function name with
keyword arguments whose values are literals (strings, numbers, booleans, None, lists, dicts); positional
arguments are mapped to the schema's parameter order. Anything else — a syntax error, an attribute call, an
expression as a value, an unknown tool — makes the whole reply plain text (no tool calls), never an error.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

THOUGHT_START, THOUGHT_END = "<|thought_start|>", "<|thought_end|>"
CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
_CALLS = re.compile(re.escape(CALL_START) + r"(.*?)(?:" + re.escape(CALL_END) + r"|$)", re.S)
_THOUGHT = re.compile(re.escape(THOUGHT_START) + r"(.*?)(?:" + re.escape(THOUGHT_END) + r"|$)", re.S)
_LITERALS = {True: "True", False: "False", None: "None"}


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ParsedReply:
    content: str  # the text outside the markers (the whole reply when it holds no valid call)
    calls: list[ToolCall] = field(default_factory=list)
    thought: str | None = None


def tools_system_prompt(tools: list[dict]) -> str:
    """The system-prompt section that offers `tools` (OpenAI function specs: {"type": "function", "function": {...}})."""
    # One compact JSON object per line: as readable as indented JSON and ~1/3 fewer tokens for a small vocabulary.
    specs = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more of these functions to answer the user:\n" + specs +
            f"\n\nTo call functions, write {CALL_START} followed by one Python-style call per line with keyword "
            f"arguments, e.g. {CALL_START}function_name(argument=\"value\"){CALL_END}. You may think first inside "
            f"{THOUGHT_START}…{THOUGHT_END}. The results come back as tool messages.")


def format_value(value: Any) -> str:
    """A JSON value as a Python literal (true -> True, null -> None; strings with JSON-style escapes are fine)."""
    if isinstance(value, bool) or value is None:
        return _LITERALS[value]
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{format_value(str(k))}: {format_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"tool argument of type {type(value).__name__} is not JSON")


def format_call(name: str, arguments: dict[str, Any]) -> str:
    return f"{name}(" + ", ".join(f"{k}={format_value(v)}" for k, v in arguments.items()) + ")"


def format_assistant(content: str | None, calls: list[ToolCall]) -> str:
    """An assistant turn with tool calls, as the model writes it (for conversation history)."""
    text = content or ""
    if calls:
        text += CALL_START + "\n".join(format_call(c.name, c.arguments) for c in calls) + CALL_END
    return text


def _content_text(content: Any) -> str:
    """An OpenAI message content: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)


def call_from_openai(call: dict, where: str) -> ToolCall:
    """An OpenAI tool_calls entry ({"function": {"name", "arguments": JSON string}}) -> ToolCall.
    Raises ValueError naming `where` (e.g. "messages[3].tool_calls") when the arguments are not a JSON object."""
    fn = call.get("function") or {}
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: tool call arguments are not JSON: {e}") from e
    if not isinstance(args, dict):
        raise ValueError(f"{where}: tool call arguments must be a JSON object")
    return ToolCall(fn.get("name", ""), args)


def render_conversation(messages: list[dict], tools: list[dict] | None = None) -> list[dict[str, str]]:
    """OpenAI chat messages (+ offered tools) -> chat-template messages {role, content}: the tools section joins
    the system message, assistant tool_calls are written as the model writes them, developer becomes system.
    The one rendering shared by the server, the MCP host, tool-use data synthesis and evaluation."""
    out = []
    for i, m in enumerate(messages):
        content = _content_text(m.get("content"))
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [call_from_openai(c, f"messages[{i}].tool_calls") for c in m["tool_calls"]]
            content = format_assistant(content, calls)
        role = m.get("role")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if tools:
        section = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def openai_tool_calls(calls: list[ToolCall], ids: list[str]) -> list[dict]:
    """ToolCalls -> OpenAI `tool_calls` entries (arguments as a JSON string)."""
    return [{"id": i, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c, i in zip(calls, ids)]


def _parameter_names(tools: list[dict] | None) -> dict[str, list[str]]:
    out = {}
    for t in tools or []:
        fn = t.get("function", t)
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            props = (fn.get("parameters") or {}).get("properties") or {}
            out[fn["name"]] = list(props) if isinstance(props, dict) else []
    return out


def _parse_calls(source: str, params: dict[str, list[str]] | None) -> list[ToolCall] | None:
    try:
        tree = ast.parse(source.strip(), mode="exec")
    except SyntaxError:
        return None
    calls = []
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name)):
            return None
        call, name = stmt.value, stmt.value.func.id
        if params is not None and name not in params:
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}
            positional = [ast.literal_eval(a) for a in call.args]
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
        if len(args) != len(call.keywords):  # **kwargs
            return None
        if positional:
            names = (params or {}).get(name, [])
            if len(positional) > len(names):
                return None
            args = {**dict(zip(names, positional)), **args}
        calls.append(ToolCall(name, args))
    return calls


def parse_reply(text: str, tools: list[dict] | None = None) -> ParsedReply:
    """The model's reply -> its text, its tool calls (every call block must parse; else none) and its thought.
    tools: the offered tools (calls to other names are not calls); None accepts any name."""
    blocks = _CALLS.findall(text)
    thought_m = _THOUGHT.search(text)
    thought = thought_m.group(1).strip() if thought_m else None
    if not blocks:
        return ParsedReply(text, [], thought)
    params = _parameter_names(tools) if tools is not None else None
    calls: list[ToolCall] = []
    for block in blocks:
        parsed = _parse_calls(block, params)
        if not parsed:
            return ParsedReply(text, [], thought)  # malformed: the reply stays plain text
        calls.extend(parsed)
    content = _THOUGHT.sub("", _CALLS.sub("", text)).strip()
    return ParsedReply(content, calls, thought)
