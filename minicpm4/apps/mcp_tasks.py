"""Tool-use tasks for the MCP servers we test with: user queries + the gold calls that solve them.

MiniCPM4-MCP's data came from an LLM writing queries per tool (MINICPM4.md §9.2); we have no such LLM offline,
so queries come from paraphrase templates per tool of `mcp-server-time` (get_current_time, convert_time) and
`mcp-server-calculator` (calculate), filled with random cities, clock times and numbers. Single-tool tasks
need one call; cross-tool tasks need two in sequence (the current time somewhere, then that time converted;
or a time and a calculation), so the second step is scored given the gold first step.

Held out: every tool's templates are split into a training part and a test part, so no test query shares a
phrasing with training data (and no test query string occurs in training). Cities and operators are shared
— mapping "Tokyo" to "Asia/Tokyo" is knowledge the model must have, as the report's model had.

A task is plain data (query, gold calls) and serialises to JSON; `answer_text` writes the final answer from
the gold calls' observations in one fixed style, which is what SFT teaches the model to do.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

from minicpm4.apps.tool_calls import ToolCall

CITIES = {
    "Tokyo": "Asia/Tokyo", "Paris": "Europe/Paris", "London": "Europe/London", "New York": "America/New_York",
    "Los Angeles": "America/Los_Angeles", "Chicago": "America/Chicago", "Berlin": "Europe/Berlin",
    "Madrid": "Europe/Madrid", "Rome": "Europe/Rome", "Moscow": "Europe/Moscow", "Beijing": "Asia/Shanghai",
    "Shanghai": "Asia/Shanghai", "Hong Kong": "Asia/Hong_Kong", "Singapore": "Asia/Singapore",
    "Seoul": "Asia/Seoul", "Sydney": "Australia/Sydney", "Melbourne": "Australia/Melbourne",
    "Auckland": "Pacific/Auckland", "Dubai": "Asia/Dubai", "Mumbai": "Asia/Kolkata", "Delhi": "Asia/Kolkata",
    "Bangkok": "Asia/Bangkok", "Jakarta": "Asia/Jakarta", "Cairo": "Africa/Cairo", "Lagos": "Africa/Lagos",
    "Nairobi": "Africa/Nairobi", "Johannesburg": "Africa/Johannesburg", "Sao Paulo": "America/Sao_Paulo",
    "Buenos Aires": "America/Argentina/Buenos_Aires", "Mexico City": "America/Mexico_City",
    "Toronto": "America/Toronto", "Vancouver": "America/Vancouver", "Denver": "America/Denver",
    "Honolulu": "Pacific/Honolulu", "Istanbul": "Europe/Istanbul", "Athens": "Europe/Athens",
    "Stockholm": "Europe/Stockholm", "Amsterdam": "Europe/Amsterdam", "Lisbon": "Europe/Lisbon",
    "Dublin": "Europe/Dublin", "Vienna": "Europe/Vienna", "Warsaw": "Europe/Warsaw", "UTC": "Etc/UTC",
}

# (template, split): train templates teach; test templates are only ever in the evaluation set.
CURRENT_TIME = [
    ("What time is it in {city}?", "train"), ("What's the current time in {city}?", "train"),
    ("Tell me the time in {city}.", "train"), ("Current time in {city}, please.", "train"),
    ("I need the local time in {city}.", "train"), ("Do you know what time it is in {city} right now?", "train"),
    ("What is the local time in {city} at the moment?", "train"), ("time in {city}?", "train"),
    ("What is the time now in {city}?", "test"), ("Could you check the clock in {city} for me?", "test"),
    ("{city}: what time is it there?", "test"),
]
CONVERT_TIME = [
    ("Convert {time} from {city} time to {city2} time.", "train"),
    ("If it is {time} in {city}, what time is it in {city2}?", "train"),
    ("What is {time} {city} time in {city2}?", "train"),
    ("I have a call at {time} in {city}. What time is that in {city2}?", "train"),
    ("{time} in {city} is what time in {city2}?", "train"),
    ("When it's {time} in {city}, what's the time in {city2}?", "test"),
    ("Please translate {time} {city} time into {city2} time.", "test"),
]
CALCULATE = [
    ("What is {a} {op} {b}?", "train"), ("Calculate {a} {op} {b}.", "train"), ("Compute {expr}", "train"),
    ("What is {expr}?", "train"), ("Please evaluate {expr}.", "train"), ("{a} {op} {b} = ?", "train"),
    ("What is the square root of {n}?", "train"), ("What is {p} percent of {n}?", "train"),
    ("How much is {a} {op} {b}?", "test"), ("Work out {expr} for me.", "test"),
    ("Find the square root of {n}.", "test"),
]
TIME_THEN_CONVERT = [
    ("What time is it in {city} now, and what is that time in {city2}?", "train"),
    ("Look up the current time in {city}, then convert it to {city2} time.", "train"),
    ("Get the time in {city} right now and tell me the same moment in {city2}.", "test"),
]
TIME_AND_CALCULATE = [
    ("What time is it in {city}? Also, what is {a} {op} {b}?", "train"),
    ("Tell me the time in {city} and compute {expr}.", "train"),
    ("Check the time in {city}, then work out {expr}.", "test"),
]
OPERATORS = [("plus", "+"), ("minus", "-"), ("times", "*"), ("multiplied by", "*"), ("divided by", "/"),
             ("to the power of", "**")]


@dataclass
class ToolTask:
    query: str
    calls: list[ToolCall]  # the gold calls, one step each, in order
    kind: str  # which template family
    split: str  # "train" or "test"
    tools: list[str] = field(default_factory=list)  # the tool names the task needs

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ToolTask:
        return cls(d["query"], [ToolCall(c["name"], c["arguments"]) for c in d["calls"]], d["kind"], d["split"],
                   list(d.get("tools", [])))


def _two_cities(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(sorted(CITIES), 2)
    return a, b


def _arithmetic(rng: random.Random) -> dict:
    word, op = rng.choice(OPERATORS)
    a = rng.randint(2, 999)
    b = rng.randint(2, 9) if op == "**" else rng.randint(2, 999)
    if rng.random() < 0.5:  # an expression written out, copied into the call
        c = rng.randint(1, 99)
        expr = f"{a} {op} {b} + {c}" if op != "**" else f"{a} ** {b}"
        call_expr = expr
    else:
        expr, call_expr = f"{a}{op}{b}", f"{a}{op}{b}"
    return {"a": a, "b": b, "op": word, "sym": op, "expr": expr, "call_expr": call_expr,
            "n": rng.choice([rng.randint(2, 99) ** 2, rng.randint(2, 9999)]), "p": rng.choice([5, 10, 15, 20, 25, 50, 75])}


def _calculate_task(template: str, v: dict) -> ToolCall:
    if "square root" in template:
        return ToolCall("calculate", {"expression": f"sqrt({v['n']})"})
    if "percent" in template:
        return ToolCall("calculate", {"expression": f"{v['p']} / 100 * {v['n']}"})
    if "{expr}" in template:
        return ToolCall("calculate", {"expression": v["call_expr"]})
    return ToolCall("calculate", {"expression": f"{v['a']} {v['sym']} {v['b']}"})


def make_task(kind: str, template: str, split: str, rng: random.Random) -> ToolTask:
    city, city2 = _two_cities(rng)
    clock = f"{rng.randint(0, 23):02d}:{rng.choice([0, 15, 30, 45, rng.randint(0, 59)]):02d}"
    v = _arithmetic(rng)
    text = template.format(city=city, city2=city2, time=clock, a=v["a"], b=v["b"], op=v["op"], expr=v["expr"],
                           n=v["n"], p=v["p"])
    now = ToolCall("get_current_time", {"timezone": CITIES[city]})
    if kind == "current_time":
        calls = [now]
    elif kind == "convert_time":
        calls = [ToolCall("convert_time", {"source_timezone": CITIES[city], "time": clock,
                                           "target_timezone": CITIES[city2]})]
    elif kind == "calculate":
        calls = [_calculate_task(template, v)]
    elif kind == "time_then_convert":  # the second call's time comes from the first call's observation
        calls = [now, ToolCall("convert_time", {"source_timezone": CITIES[city], "time": "{observed_time}",
                                                "target_timezone": CITIES[city2]})]
    elif kind == "time_and_calculate":
        calls = [now, _calculate_task(template, v)]
    else:
        raise ValueError(f"kind: unknown task family {kind!r}")
    return ToolTask(text, calls, kind, split, sorted({c.name for c in calls}))


FAMILIES = {"current_time": CURRENT_TIME, "convert_time": CONVERT_TIME, "calculate": CALCULATE,
            "time_then_convert": TIME_THEN_CONVERT, "time_and_calculate": TIME_AND_CALCULATE}
# How often each family is drawn (single-tool tasks dominate, as in the report's data).
WEIGHTS = {"current_time": 3, "convert_time": 3, "calculate": 4, "time_then_convert": 1, "time_and_calculate": 1}


def generate_tasks(split: str, count: int, seed: int, available: set[str] | None = None,
                   exclude_queries: set[str] | None = None) -> list[ToolTask]:
    """`count` distinct tasks of one split whose tools are all in `available` (None: all families)."""
    if split not in ("train", "test"):
        raise ValueError("split: must be 'train' or 'test'")
    rng = random.Random(f"{split}:{seed}")
    families = []
    for kind, templates in FAMILIES.items():
        probe = make_task(kind, templates[0][0], split, random.Random(0))
        if available is None or set(probe.tools) <= available:
            families += [kind] * WEIGHTS[kind]
    if not families:
        raise ValueError("no task family fits the available tools (need get_current_time/convert_time/calculate)")
    seen = set(exclude_queries or ())
    tasks: list[ToolTask] = []
    attempts = 0
    while len(tasks) < count:
        attempts += 1
        if attempts > count * 50:
            raise ValueError(f"only {len(tasks)} distinct {split} tasks could be drawn (asked for {count})")
        kind = rng.choice(families)
        template = rng.choice([t for t, s in FAMILIES[kind] if s == split])
        task = make_task(kind, template, split, rng)
        if task.query not in seen:
            seen.add(task.query)
            tasks.append(task)
    return tasks


def observed_time(observation: str) -> str | None:
    """HH:MM of a get_current_time observation (the server's JSON), or None if it is not one."""
    try:
        return json.loads(observation)["datetime"][11:16]
    except (ValueError, KeyError, TypeError):
        return None


def resolve_call(call: ToolCall, observations: list[str]) -> ToolCall:
    """Fill a gold call's placeholders from earlier observations ({observed_time}: the first call's clock)."""
    args = dict(call.arguments)
    for k, v in args.items():
        if v == "{observed_time}":
            args[k] = observed_time(observations[0]) if observations else None
    return ToolCall(call.name, args)


def answer_text(task: ToolTask, observations: list[str]) -> str:
    """The final answer in the style SFT teaches: each observation restated in one sentence."""
    parts = []
    for call, obs in zip(task.calls, observations):
        parts.append(_restate(resolve_call(call, observations), obs))
    return " ".join(parts)


def _restate(call: ToolCall, obs: str) -> str:
    try:
        data = json.loads(obs)
    except ValueError:
        data = None
    if call.name == "get_current_time" and isinstance(data, dict) and "datetime" in data:
        return f"It is {data['datetime'][11:16]} on {data.get('day_of_week', '')} in {data['timezone']}."
    if call.name == "convert_time" and isinstance(data, dict) and "target" in data:
        return (f"{data['source']['datetime'][11:16]} in {data['source']['timezone']} is "
                f"{data['target']['datetime'][11:16]} in {data['target']['timezone']}.")
    if call.name == "calculate":
        return f"{call.arguments.get('expression')} = {obs.strip()}."
    return f"{call.name} returned: {obs.strip()}"
