"""`minicpm4 mcp synth`: tool-use SFT trajectories and the held-out test set, through the live servers.

A trajectory is the conversation MiniCPM4-MCP is trained on (MINICPM4.md §9.2): system prompt with the
offered tools, the user's query, per gold call an assistant turn (a short thought + the call) and the tool's
observation, then the final answer (mcp_tasks.answer_text). Every gold call is executed through the real MCP
server and a task is dropped if any call errors — the report's "keep trajectories whose outcome is right".

Offered tools vary: the needed tools always, plus, with probability 1/2, every other connected tool, in a
random order — so the model learns to pick the right tool from a list, not that a tool is always there.

get_current_time answers with the clock at synthesis time, so thousands of trajectories would all show the
same hour and the model would learn to print it instead of reading the observation. Its observation is
therefore re-rendered for a random instant in the same zone, in the server's exact JSON layout (the keys of
the real reply are checked: a server whose reply looks different stops the synthesis). Other tools'
observations are the real replies.

Non-tool chats (e.g. the default model's dictionary SFT set) can be mixed in, some with tools offered and no
call made, so the model keeps answering without tools and does not forget its earlier SFT.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from minicpm4.apps.mcp_host import Toolbox
from minicpm4.apps.mcp_tasks import ToolTask, answer_text, resolve_call
from minicpm4.apps.tool_calls import THOUGHT_END, THOUGHT_START, ToolCall, format_assistant, render_conversation

_TIME_KEYS = {"timezone", "datetime", "day_of_week", "is_dst"}


def random_time_observation(real: str, rng: random.Random) -> str:
    """A get_current_time reply for a random instant of 2020-2030, in the layout of the real reply `real`."""
    data = json.loads(real)
    if set(data) != _TIME_KEYS:
        raise ValueError(f"get_current_time replied with keys {sorted(data)}, expected {sorted(_TIME_KEYS)}: "
                         "this server's layout is not the one the synthesis re-renders")
    zone = ZoneInfo(data["timezone"])
    instant = datetime.fromtimestamp(rng.uniform(1577836800, 1893456000), tz=timezone.utc).astimezone(zone)
    return json.dumps({"timezone": data["timezone"], "datetime": instant.isoformat(timespec="seconds"),
                       "day_of_week": instant.strftime("%A"), "is_dst": bool(instant.dst())}, indent=2)


def thought_for(call: ToolCall, tools: list[dict]) -> str:
    """A one-line thought naming the tool and why (its description's first sentence)."""
    desc = next((t["function"].get("description", "") for t in tools if t["function"]["name"] == call.name), "")
    reason = desc.split(".")[0].strip().lower() or call.name.replace("_", " ")
    return f"{THOUGHT_START}I should use {call.name}: {reason}.{THOUGHT_END}"


def offered_tools(task: ToolTask, tools: list[dict], rng: random.Random) -> list[dict]:
    needed = [t for t in tools if t["function"]["name"] in task.tools]
    others = [t for t in tools if t["function"]["name"] not in task.tools]
    chosen = needed + (others if rng.random() < 0.5 else [])
    rng.shuffle(chosen)
    return chosen


async def trajectory(task: ToolTask, toolbox: Toolbox, rng: random.Random) -> list[dict] | None:
    """The chat-template messages of one solved task, or None when a gold call fails on the server."""
    tools = offered_tools(task, toolbox.tools, rng)
    messages: list[dict] = [{"role": "user", "content": task.query}]
    observations: list[str] = []
    for call in task.calls:
        gold = resolve_call(call, observations)
        if any(v is None for v in gold.arguments.values()):
            return None
        result = await toolbox.call(gold.name, gold.arguments)
        if result.is_error:
            return None
        text = random_time_observation(result.text, rng) if gold.name == "get_current_time" else result.text
        observations.append(text)
        messages.append({"role": "assistant", "content": format_assistant(thought_for(gold, tools), [gold])})
        messages.append({"role": "tool", "content": text})
    messages.append({"role": "assistant", "content": answer_text(task, observations)})
    return render_conversation(messages, tools)


def drill(task: ToolTask) -> list[dict]:
    """A call drill: the query and its first gold call alone, no tools prompt (~40 tokens instead of ~700).

    Measured on the 3 M-parameter default model: trained on full trajectories only, it learned the format and
    which tool to pick, but copied no argument (per-token loss on the digits of an expression stayed ~4-6
    nats, the values metric 0%): a value is ~5 of the ~1,000 tokens a trajectory costs. Packed drills give
    ~25x more copy targets per step, so SFT learns to copy cities, clock times and numbers; the full
    trajectories teach doing it under the tools prompt."""
    first = task.calls[0]
    return [{"role": "user", "content": task.query}, {"role": "assistant", "content": format_assistant(None, [first])}]


def plain_chat(messages: list[dict], tools: list[dict], rng: random.Random) -> list[dict]:
    """A non-tool chat, half the time with tools offered (and, rightly, not called)."""
    offered = [t for t in tools if rng.random() < 0.5] if rng.random() < 0.5 else []
    return render_conversation(messages, offered or None)
