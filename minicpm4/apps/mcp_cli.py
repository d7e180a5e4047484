"""`minicpm4 mcp`: a model using the tools of MCP servers (MiniCPM4-MCP, MINICPM4.md §9.2).

    minicpm4 mcp --server mcp-server-time --server mcp-server-calculator -q "What time is it in Tokyo?"
    minicpm4 mcp --server "mcp-server-time --local-timezone Etc/UTC"          # interactive
    minicpm4 mcp --base-url http://127.0.0.1:8000/v1 --server mcp-server-time  # any OpenAI-compatible endpoint
    minicpm4 mcp eval --server mcp-server-time --server mcp-server-calculator [--tasks FILE] [--out FILE]
    minicpm4 mcp synth --server mcp-server-time --server mcp-server-calculator --out DIR

Without --model or --base-url the bundled tool model runs (the default model after tool-use SFT,
minicpm4/assets/tool-model). `make mcp-servers` installs the two servers into build/mcp-servers/bin.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from minicpm4.apps.backend_cli import sampling_from_args
from minicpm4.errors import UserError

TOOL_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tool-model"
TEST_TASKS = TOOL_MODEL_DIR.parent / "mcp-tasks" / "test.jsonl"


def _add_common(p: argparse.ArgumentParser) -> None:
    from minicpm4.apps.backend_cli import add_backend_options

    p.add_argument("--server", action="append", default=[], metavar="CMD",
                   help="an MCP server's command line, started over stdio (repeat for several servers)")
    add_backend_options(p)
    p.add_argument("--server-logs", metavar="DIR", default=None, help="where the servers' stderr goes (default: a temp dir)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mcp", help="use MCP servers' tools with a model (interactive or -q); mcp eval | mcp synth",
                       description=__doc__.split("\n\n")[0])
    _add_common(p)
    p.add_argument("-q", "--query", default=None, help="one question, answered then exit (else: interactive)")
    p.add_argument("--max-steps", type=int, default=5, help="model turns with tool calls per question, at most")
    p.add_argument("--system", default=None, help="a system prompt (the tools section is appended to it)")
    p.set_defaults(func=cmd_mcp)
    inner = p.add_subparsers(dest="mcp_command", metavar="{eval,synth}")
    e = inner.add_parser("eval", help="per-call accuracy of function name / parameter names / values")
    _add_common(e)
    e.add_argument("--tasks", default=None, metavar="FILE",
                   help=f"test tasks (JSONL of mcp_tasks.ToolTask; default: the shipped {TEST_TASKS.name})")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N tasks")
    e.add_argument("--out", default=None, metavar="FILE", help="write metrics + every item as JSON")
    e.set_defaults(func=cmd_eval)
    s = inner.add_parser("synth", help="tool-use SFT trajectories + held-out test tasks, via the live servers")
    s.add_argument("--server", action="append", default=[], metavar="CMD")
    s.add_argument("--out", required=True, metavar="DIR", help="writes train.jsonl, val.jsonl, test.jsonl, stats.json")
    s.add_argument("--train", type=int, default=3000, help="training trajectories")
    s.add_argument("--val", type=int, default=100, help="validation trajectories (train templates, unseen queries)")
    s.add_argument("--test", type=int, default=200, help="test tasks (held-out templates)")
    s.add_argument("--drills", type=int, default=0,
                   help="extra short call drills (query -> first call, no tools prompt) from more training tasks")
    s.add_argument("--mix-chat", default=None, metavar="FILE",
                   help="an SFT JSONL of ordinary chats to mix in (keeps the model's other skills)")
    s.add_argument("--mix-fraction", type=float, default=0.25, help="share of mixed-in chats in train.jsonl")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--server-logs", metavar="DIR", default=None)
    s.set_defaults(func=cmd_synth)


def _specs(args: argparse.Namespace):
    from minicpm4.apps.mcp_host import ServerSpec

    if not args.server:
        raise UserError("give at least one --server CMD (e.g. --server mcp-server-time; `make mcp-servers` "
                        "installs it into build/mcp-servers/bin)")
    return [ServerSpec.parse(s) for s in args.server]


def make_backend(args: argparse.Namespace):
    from minicpm4.apps.backend_cli import make_backend as backend_from_args

    return backend_from_args(args, TOOL_MODEL_DIR, " (the bundled tool model: the 3M-parameter default model after "
                             "tool-use SFT; see its README.md)")


def _show(step) -> None:
    from minicpm4.apps.tool_calls import format_call

    if step.turn.thought:
        print(f"  thought: {step.turn.thought}")
    for call, result in zip(step.calls, step.results):
        print(f"  -> {format_call(call.name, call.arguments)}")
        text = result.text if len(result.text) <= 400 else result.text[:400] + " …"
        print(f"  <- {'ERROR ' if result.is_error else ''}{text}".replace("\n", "\n     "))
    sys.stdout.flush()


def cmd_mcp(args: argparse.Namespace) -> None:
    import anyio

    from minicpm4.apps.agent import run_agent
    from minicpm4.apps.mcp_host import Toolbox

    if args.max_steps < 1:
        raise UserError("--max-steps: must be >= 1")
    specs, sampling = _specs(args), sampling_from_args(args)
    backend = make_backend(args)
    query = args.query if args.query is not None else (None if sys.stdin.isatty() else sys.stdin.read().strip())

    async def main() -> None:
        async with Toolbox.connect(specs, args.server_logs) as box:
            print(f"tools: {', '.join(box.names())}", file=sys.stderr)
            history = [{"role": "system", "content": args.system}] if args.system else []
            while True:
                text = query if query is not None else await anyio.to_thread.run_sync(_read_line)
                if text is None:
                    return
                if not text:
                    continue
                history.append({"role": "user", "content": text})
                result = await run_agent(backend, box, history, args.max_steps, sampling, on_step=_show)
                history = result.messages
                print(f"assistant: {result.answer}" if result.answer is not None
                      else f"(stopped after {args.max_steps} tool steps without an answer)")
                if query is not None:
                    return

    anyio.run(main)


def _read_line() -> str | None:
    try:
        return input("you> ").strip()
    except EOFError:
        return None


def load_tasks(path: str | Path):
    from minicpm4.apps.mcp_tasks import ToolTask
    from minicpm4.io import jsonl_records

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--tasks {path}: no such file")
    tasks = []
    for lineno, record in jsonl_records(path):
        try:
            tasks.append(ToolTask.from_json(record))
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}:{lineno}: not a tool task ({e})") from e
    return tasks


def cmd_eval(args: argparse.Namespace) -> None:
    import anyio

    from minicpm4.apps.mcp_eval import evaluate
    from minicpm4.apps.mcp_host import Toolbox
    from minicpm4.io import write_text_atomic

    specs, sampling = _specs(args), sampling_from_args(args)
    tasks = load_tasks(args.tasks or TEST_TASKS)[: args.limit]
    backend = make_backend(args)

    async def main():
        async with Toolbox.connect(specs, args.server_logs) as box:
            missing = sorted({n for t in tasks for n in t.tools} - set(box.names()))
            if missing:
                raise UserError(f"the tasks need tools no --server offers: {', '.join(missing)}")
            return await evaluate(backend, box, tasks, sampling)

    metrics, items = anyio.run(main)
    print(metrics.row())
    for tool, r in metrics.by_tool.items():
        print(f"  {tool}: name {100 * r['name']:.1f} / names {100 * r['param_names']:.1f} / "
              f"values {100 * r['param_values']:.1f} ({r['items']} calls)")
    if args.out:
        from dataclasses import asdict

        write_text_atomic(args.out, json.dumps({"metrics": asdict(metrics), "items": [asdict(i) for i in items]},
                                               indent=1, ensure_ascii=False))


def cmd_synth(args: argparse.Namespace) -> None:
    import anyio

    from minicpm4.apps.mcp_host import Toolbox
    from minicpm4.apps.mcp_synth import drill, plain_chat, trajectory
    from minicpm4.apps.mcp_tasks import generate_tasks
    from minicpm4.io import write_text_atomic

    if not 0 <= args.mix_fraction < 1:
        raise UserError("--mix-fraction: must be in [0, 1)")
    specs = _specs(args)
    chats = []
    if args.mix_chat:
        from minicpm4.train.sft_data import read_jsonl

        try:
            chats = read_jsonl(args.mix_chat)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--mix-chat: {e}") from e
    out = Path(args.out)
    rng = random.Random(args.seed)

    async def main():
        async with Toolbox.connect(specs, args.server_logs) as box:
            available = set(box.names())
            test = generate_tasks("test", args.test, args.seed, available)
            fit = generate_tasks("train", args.train + args.val, args.seed, available,
                                 exclude_queries={t.query for t in test})
            val_queries = {t.query for t in fit[args.train:]}
            # drills may repeat a trajectory's query (the template space is finite), never a val/test one
            drills = generate_tasks("train", args.drills, args.seed + 1, available,
                                    exclude_queries=val_queries | {t.query for t in test})
            rows = {"train": [], "val": []}
            dropped = 0
            for i, task in enumerate(fit):
                messages = await trajectory(task, box, rng)
                if messages is None:
                    dropped += 1
                    continue
                rows["val" if i >= args.train else "train"].append({"messages": messages, "kind": task.kind})
            rows["train"] += [{"messages": drill(t), "kind": "drill"} for t in drills]
            return box.tools, test, rows, dropped

    tools, test, rows, dropped = anyio.run(main)
    n_tool = sum(r["kind"] != "drill" for r in rows["train"])
    n_chat = round(n_tool * args.mix_fraction / (1 - args.mix_fraction)) if chats else 0
    for messages in rng.sample(chats, min(n_chat, len(chats))):
        rows["train"].append({"messages": plain_chat(messages, tools, rng), "kind": "chat"})
    rng.shuffle(rows["train"])
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        write_text_atomic(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]))
    write_text_atomic(out / "test.jsonl", "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in test))
    kinds = {}
    for r in rows["train"]:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    stats = {"train": len(rows["train"]), "val": len(rows["val"]), "test": len(test), "dropped_failed_calls": dropped,
             "train_kinds": kinds, "seed": args.seed, "servers": args.server}
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=1))
    print(json.dumps(stats))
