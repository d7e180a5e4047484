"""The think -> call -> observe loop of `minicpm4 mcp` (MiniCPM4-MCP, MINICPM4.md §9.2).

Each step asks the model for the next assistant turn with the tools offered. A turn with tool calls
(optionally after a `<|thought_start|>` thought) is executed through the Toolbox; the calls and their
results join the conversation as an assistant message with `tool_calls` and one `tool` message per call,
and the loop asks again. A turn without calls is the final answer. The loop stops there or after
`max_steps` turns that called tools (the answer is then None and `stopped` says so). A reply whose call
block does not parse is plain text by the parser's rule, i.e. it ends the loop as the answer, as an
OpenAI client would see it.

The model runs in a worker thread (anyio.to_thread) so the MCP sessions' receive loops keep running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import anyio

from minicpm4.apps.chat_backend import AssistantTurn, ChatBackend, Sampling
from minicpm4.apps.mcp_host import Toolbox, ToolResult
from minicpm4.apps.tool_calls import ToolCall


@dataclass
class AgentStep:
    turn: AssistantTurn
    results: list[ToolResult] = field(default_factory=list)  # one per call of the turn

    @property
    def calls(self) -> list[ToolCall]:
        return self.turn.calls


@dataclass
class AgentResult:
    messages: list[dict]  # the whole conversation, the final answer included
    steps: list[AgentStep]
    answer: str | None
    stopped: str  # "answer" or "step_limit"


async def run_agent(backend: ChatBackend, toolbox: Toolbox, messages: list[dict], max_steps: int = 5,
                    sampling: Sampling | None = None,
                    on_step: Callable[[AgentStep], None] | None = None) -> AgentResult:
    """Continue `messages` (ending with the user's turn) until the model answers or max_steps tool turns ran."""
    if max_steps < 1:
        raise ValueError("max_steps: must be >= 1")
    history = list(messages)
    steps: list[AgentStep] = []
    for _ in range(max_steps):
        turn = await anyio.to_thread.run_sync(backend.complete, history, toolbox.tools, sampling)
        step = AgentStep(turn)
        steps.append(step)
        if not turn.calls:
            history.append({"role": "assistant", "content": turn.content or ""})
            if on_step:
                on_step(step)
            return AgentResult(history, steps, turn.content or "", "answer")
        ids = [f"call_{len(steps)}_{i}" for i in range(len(turn.calls))]
        history.append(turn.message(ids))
        for call, call_id in zip(turn.calls, ids):
            result = await toolbox.call(call.name, call.arguments)
            step.results.append(result)
            history.append({"role": "tool", "tool_call_id": call_id, "content": result.text})
        if on_step:
            on_step(step)
    return AgentResult(history, steps, None, "step_limit")
