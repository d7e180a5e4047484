"""`minicpm4 mcp eval`: MiniCPM4-MCP's per-call metrics (MINICPM4.md §9.2).

Every gold call of every test task is one item, scored given the ground-truth previous steps: the prompt is the
query plus the gold earlier calls and their real observations (executed through the live servers), and the
model's next turn is compared with the gold call:
- name: the first predicted call has the gold function name;
- parameter names: ... and exactly the gold set of argument names;
- parameter values: ... and every value matches (see values_match).
Each metric counts an item right only if the previous ones are right (a wrong function's arguments are
wrong), so name >= names >= values, and every item counts in every denominator (a reply without a call is
wrong on all three). Also reported: the fraction of predicted calls the server executes without error.
Averages are over items (the report's sample-weighted average) and broken down by tool.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

from minicpm4.apps.chat_backend import ChatBackend, Sampling
from minicpm4.apps.mcp_host import Toolbox
from minicpm4.apps.mcp_tasks import ToolTask, resolve_call
from minicpm4.apps.tool_calls import ToolCall

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs}


def arithmetic_value(text: str) -> float | None:
    """The value of an arithmetic expression (numbers, + - * / // % **, unary minus, sqrt/abs), or None.
    Walks the ast itself (never eval); exponents are capped so a '9**9**9' cannot hang the evaluation."""
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and len(node.args) == 1 and not node.keywords):
            return _FUNCTIONS[node.func.id](walk(node.args[0]))
        raise ValueError("not arithmetic")

    try:
        return float(walk(ast.parse(text.strip(), mode="eval").body))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def values_match(predicted: Any, gold: Any) -> bool:
    """Equal values; strings also when equal ignoring whitespace, or when both are arithmetic expressions with
    the same value (rel. 1e-9: "37*12" matches "37 * 12" and "12*37")."""
    if predicted == gold:
        return True
    if isinstance(predicted, str) and isinstance(gold, str):
        if "".join(predicted.split()) == "".join(gold.split()):
            return True
        a, b = arithmetic_value(predicted), arithmetic_value(gold)
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return False


@dataclass
class CallScore:
    name: bool
    param_names: bool
    param_values: bool

    @classmethod
    def of(cls, predicted: ToolCall | None, gold: ToolCall) -> CallScore:
        name = predicted is not None and predicted.name == gold.name
        names = name and set(predicted.arguments) == set(gold.arguments)
        values = names and all(values_match(predicted.arguments[k], v) for k, v in gold.arguments.items())
        return cls(name, names, values)


@dataclass
class EvalItem:
    task_index: int
    step: int
    query: str
    gold: dict
    predicted: dict | None
    reply: str
    score: CallScore
    executed_ok: bool | None = None  # the predicted call ran without a tool error (None: no call predicted)


@dataclass
class Metrics:
    items: int
    name: float
    param_names: float
    param_values: float
    executed_ok: float  # over all items (a missing call counts as not executed)
    by_tool: dict[str, dict[str, float]] = field(default_factory=dict)

    def row(self) -> str:
        return (f"name {100 * self.name:.1f} / param names {100 * self.param_names:.1f} / "
                f"param values {100 * self.param_values:.1f} (executed ok {100 * self.executed_ok:.1f}; "
                f"{self.items} calls)")


def summarize(items: list[EvalItem]) -> Metrics:
    def rates(rows: list[EvalItem]) -> dict[str, float]:
        n = max(1, len(rows))
        return {"items": len(rows), "name": sum(r.score.name for r in rows) / n,
                "param_names": sum(r.score.param_names for r in rows) / n,
                "param_values": sum(r.score.param_values for r in rows) / n,
                "executed_ok": sum(bool(r.executed_ok) for r in rows) / n}

    overall = rates(items)
    tools = sorted({i.gold["name"] for i in items})
    return Metrics(by_tool={t: rates([i for i in items if i.gold["name"] == t]) for t in tools}, **overall)


async def _gold_histories(tasks: list[ToolTask], toolbox: Toolbox) -> list[tuple[int, int, list[dict], ToolCall]]:
    """(task index, step, messages before the step, gold call) for every gold call; earlier steps executed."""
    out = []
    for t, task in enumerate(tasks):
        history: list[dict] = [{"role": "user", "content": task.query}]
        observations: list[str] = []
        for k, call in enumerate(task.calls):
            gold = resolve_call(call, observations)
            out.append((t, k, list(history), gold))
            result = await toolbox.call(gold.name, gold.arguments)
            observations.append(result.text)
            call_id = f"call_{k}"
            history.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": gold.name, "arguments": json.dumps(gold.arguments, ensure_ascii=False)}}]})
            history.append({"role": "tool", "tool_call_id": call_id, "content": result.text})
    return out


async def evaluate(backend: ChatBackend, toolbox: Toolbox, tasks: list[ToolTask],
                   sampling: Sampling | None = None, execute: bool = True) -> tuple[Metrics, list[EvalItem]]:
    """Score the backend's next call for every gold step of `tasks` (all prompts in one batch)."""
    import anyio

    cases = await _gold_histories(tasks, toolbox)
    turns = await anyio.to_thread.run_sync(backend.complete_batch, [c[2] for c in cases], toolbox.tools,
                                           sampling or Sampling(max_tokens=96))
    items = []
    for (t, k, _, gold), turn in zip(cases, turns):
        predicted = turn.calls[0] if turn.calls else None
        item = EvalItem(t, k, tasks[t].query, asdict(gold), asdict(predicted) if predicted else None, turn.text,
                        CallScore.of(predicted, gold))
        if execute and predicted is not None:
            item.executed_ok = not (await toolbox.call(predicted.name, predicted.arguments)).is_error
        items.append(item)
    return summarize(items), items
