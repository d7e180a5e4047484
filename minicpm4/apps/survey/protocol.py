"""The survey writer's step protocol (MiniCPM4-Survey, MINICPM4.md §9.1): parse a model step, render one.

A step is

    <think>…</think><answer>{"update": "<position>", "content": "…"}</answer>
    <think>…</think><tool_call>{"name": "search_engine", "arguments": {"query": ["…", "…"]}}</tool_call>

or, instead of the search, `<tool_call>{"name": "finalize"}</tool_call>`. Both halves are optional in the
parse (a step may only search, or only write), but a step with neither is a failure. Problems are collected
as messages, never raised: the loop counts failed steps and shows the model what was wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

SEARCH_TOOL = "search_engine"
FINALIZE_TOOL = "finalize"

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)


@dataclass(frozen=True)
class Update:
    position: str
    content: str


@dataclass(frozen=True)
class Search:
    queries: list[str]


@dataclass(frozen=True)
class Finalize:
    pass


@dataclass
class Step:
    thoughts: list[str] = field(default_factory=list)
    update: Update | None = None
    action: Search | Finalize | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.update is None and self.action is None


def _json_object(body: str, what: str, problems: list[str]) -> dict | None:
    try:
        value = json.loads(body.strip())
    except json.JSONDecodeError as e:
        problems.append(f"{what}: not valid JSON ({e.msg} at char {e.pos})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{what}: expected a JSON object")
        return None
    return value


def _update(body: str, problems: list[str]) -> Update | None:
    value = _json_object(body, "<answer>", problems)
    if value is None:
        return None
    position, content = value.get("update"), value.get("content")
    if not isinstance(position, str) or not position.strip():
        problems.append('<answer>: "update" must name a position (e.g. "introduction", "section-1")')
        return None
    if not isinstance(content, str):
        problems.append('<answer>: "content" must be a string')
        return None
    return Update(position.strip(), content)


def _action(body: str, problems: list[str]) -> Search | Finalize | None:
    value = _json_object(body, "<tool_call>", problems)
    if value is None:
        return None
    name = value.get("name")
    if name == FINALIZE_TOOL:
        return Finalize()
    if name != SEARCH_TOOL:
        problems.append(f'<tool_call>: unknown tool {name!r} (use "{SEARCH_TOOL}" or "{FINALIZE_TOOL}")')
        return None
    args = value.get("arguments")
    queries = args.get("query") if isinstance(args, dict) else None
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        problems.append('<tool_call>: search_engine needs {"arguments": {"query": ["...", ...]}}')
        return None
    queries = [q.strip() for q in queries if q.strip()]
    if not queries:
        problems.append("<tool_call>: search_engine got no non-empty query")
        return None
    return Search(queries)


def parse_step(text: str) -> Step:
    step = Step(thoughts=[t.strip() for t in _THINK.findall(text)])
    answers, calls = _ANSWER.findall(text), _CALL.findall(text)
    if len(answers) > 1:
        step.problems.append(f"{len(answers)} <answer> blocks: only the first is used")
    if len(calls) > 1:
        step.problems.append(f"{len(calls)} <tool_call> blocks: only the first is used")
    if answers:
        step.update = _update(answers[0], step.problems)
    if calls:
        step.action = _action(calls[0], step.problems)
    if not answers and not calls:
        step.problems.append("no <answer>{...}</answer> and no <tool_call>{...}</tool_call> in the reply")
    return step


def render_step(update: Update | None = None, action: Search | Finalize | None = None,
                thought: str = "") -> str:
    """A well-formed step (the stub model's replies, and what the system prompt shows as the example)."""
    parts = []
    if update is not None:
        parts.append(f"<think>{thought}</think><answer>"
                     + json.dumps({"update": update.position, "content": update.content}, ensure_ascii=False)
                     + "</answer>")
    if isinstance(action, Search):
        parts.append("<think></think><tool_call>" + json.dumps(
            {"name": SEARCH_TOOL, "arguments": {"query": action.queries}}, ensure_ascii=False) + "</tool_call>")
    elif isinstance(action, Finalize):
        parts.append("<tool_call>" + json.dumps({"name": FINALIZE_TOOL}) + "</tool_call>")
    return "\n".join(parts)
