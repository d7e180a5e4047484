"""Track 5, tool use (MINICPM4.md §8.3): function calls checked against the tools' JSON Schemas, dropping samples
whose gold tool is missing from the offered set or whose arguments break the schema.

Tools: minicpm4/assets/synth/tools.json (OpenAI function tools; get_current_time, convert_time and calculate
have the exact schemas of mcp-server-time / mcp-server-calculator, which the bundled tool model was tuned on).
Seeds: minicpm4/assets/synth/tool-seeds.jsonl ({"id", "query", "tools": [gold tool names]}). Per seed:

  all-tools  every tool offered (in a random order)
  subset     a random subset offered, so the gold tool is sometimes missing: such a sample is rejected with
             the verifier's reason and the model is not asked (the report drops these)

The model is asked with `tools=` (the server, or LocalBackend, parses MiniCPM4 calls into tool calls);
`verify_tool_calls(calls, offered, gold_names=...)` keeps a reply that calls every gold tool with arguments
the schema accepts (kept calls whose numbers do not occur in the query, or that call extra tools, are borderline
and go to the human review). A thought or text line the model wrote before the call is kept as the call's CoT step.
The kept record's messages are chat-template messages (tools prompt in the system message, the calls in
MiniCPM4's format in the assistant turn, via apps/tool_calls.render_conversation), so SFT reads them as they
are; the offered tools ride along in "tools".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from minicpm4.apps.tool_calls import THOUGHT_END, THOUGHT_START, openai_tool_calls, render_conversation
from minicpm4.data.synth.tool_schema import check_tool_set, verify_tool_calls
from minicpm4.data.synth.track import Job, JobSteps, Request, TrackContext, assistant, pick, user
from minicpm4.errors import UserError

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "synth"
TOOLS_PATH = ASSETS / "tools.json"
SEEDS_PATH = ASSETS / "tool-seeds.jsonl"
_NUMBER = re.compile(r"\d+")


@dataclass
class ToolConfig:
    tools_path: Path = TOOLS_PATH
    seeds_path: Path = SEEDS_PATH


def load_tools(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        tools = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    check_tool_set(tools)
    return tools


def load_seeds(path: Path, names: set[str]) -> list[dict]:
    from minicpm4.io import jsonl_records

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    seeds = []
    for lineno, rec in jsonl_records(path):
        ok = (isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("query"), str)
              and isinstance(rec.get("tools"), list) and rec["tools"])
        if not ok:
            raise UserError(f"{path}:{lineno}: expected {{\"id\", \"query\", \"tools\": [gold tool names]}}")
        if unknown := [t for t in rec["tools"] if t not in names]:
            raise UserError(f"{path}:{lineno}: gold tool {unknown[0]!r} is not in the tool set")
        seeds.append(rec)
    return seeds


class ToolTrack:
    name = "tool"

    def __init__(self, ctx: TrackContext, config: ToolConfig | None = None) -> None:
        self.ctx, self.config = ctx, config or ToolConfig()
        self.tools = load_tools(self.config.tools_path)
        self.seeds = load_seeds(self.config.seeds_path, {t["function"]["name"] for t in self.tools})

    def info(self) -> dict:
        return {"tools": [t["function"]["name"] for t in self.tools], "seeds": len(self.seeds)}

    def jobs(self, limit: int | None) -> list[Job]:
        return [Job(self.name, s["id"], ("all-tools", "subset"), partial(self._steps, seed=s))
                for s in pick(self.seeds, limit, self.ctx.data_seed, self.name)]

    def offered(self, variant: str, rng) -> list[dict]:
        tools = list(self.tools)
        if variant == "subset":
            tools = rng.sample(tools, rng.randint(1, len(tools) - 1))
        rng.shuffle(tools)
        return tools

    def _steps(self, job: Job, seed: dict) -> JobSteps:
        rng = self.ctx.rng(self.name, seed["id"])
        gold = list(seed["tools"])
        query = [user(seed["query"])]
        offers = {v: self.offered(v, rng) for v in job.variants}
        records, asking = [], []
        for variant, tools in offers.items():
            meta = {"gold": gold, "offered": [t["function"]["name"] for t in tools]}
            if not set(gold) <= set(meta["offered"]):  # no reply can be right: the verifier says why, unasked
                missing = verify_tool_calls([], tools, gold_names=gold)
                records.append(job.record(variant, render_conversation(query, tools), missing, tools, **meta))
            else:
                asking.append((variant, tools, meta))
        if not asking:
            return records
        turns = yield [Request(query, tools) for _, tools, _ in asking]
        for (variant, tools, meta), turn in zip(asking, turns):
            calls = [{"name": c.name, "arguments": c.arguments} for c in turn.calls]
            verdict = verify_tool_calls(calls, tools, gold_names=gold)
            cot = (turn.thought or turn.content or "").strip() if turn.calls else ""
            meta = {**meta, "calls": calls, "cot": bool(cot)}
            if verdict.ok:
                if extra := sorted({c["name"] for c in calls} - set(gold)):
                    meta["borderline"] = f"calls tools beyond the gold set: {', '.join(extra)}"
                elif invented := sorted(set(_NUMBER.findall(json.dumps([c["arguments"] for c in calls])))
                                        - set(_NUMBER.findall(seed["query"]))):
                    # the schema holds but a value came from nowhere ("57 ** 5" for "15 percent of 2380")
                    meta["borderline"] = f"argument numbers not in the query: {', '.join(invented[:5])}"
                thought = f"{THOUGHT_START}{cot}{THOUGHT_END}" if cot else None
                message = {"role": "assistant", "content": thought,
                           "tool_calls": openai_tool_calls(turn.calls, [f"call_{i}" for i in range(len(calls))])}
                messages = render_conversation(query + [message], tools)
            else:
                messages = render_conversation(query, tools) + [assistant(turn.text or turn.content or "")]
            records.append(job.record(variant, messages, verdict, tools, **meta))
        return records
