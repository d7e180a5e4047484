"""Package the bundled tool model (the default model after tool-use SFT) and measure it: `make tool-model`.

    python -m minicpm4.apps.tool_model --run runs/tool-sft --data build/mcp-sft --server CMD --server CMD [--out DIR]

Writes DIR (default minicpm4/assets/tool-model): bf16 weights, the default model's tokenizer, greedy
generation config, eval.json and README.md. eval.json holds the MiniCPM4-MCP metrics (mcp_eval) of the
default model and of this one on the shipped held-out tasks (minicpm4/assets/mcp-tasks/test.jsonl), and the
default model's held-out definition questions for both (does tool SFT cost the earlier skill?), plus a few
greedy transcripts of `minicpm4 mcp` on held-out queries.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import anyio
import torch

from minicpm4.api import DEFAULT_MODEL_DIR, from_pretrained
from minicpm4.apps.agent import run_agent
from minicpm4.apps.chat_backend import LocalBackend, Sampling
from minicpm4.apps.mcp_cli import TEST_TASKS, TOOL_MODEL_DIR, load_tasks
from minicpm4.apps.mcp_eval import evaluate
from minicpm4.apps.mcp_host import ServerSpec, Toolbox
from minicpm4.apps.tool_calls import format_call
from minicpm4.checkpoint import load_model, save_model
from minicpm4.train.default_model import TOKENIZER_FILES, evaluate_chat, publish

EXAMPLES = ["What is the time now in Paris?", "How much is 128 times 46?",
            "When it's 08:15 in London, what's the time in Tokyo?", "Find the square root of 1764."]


async def measure(pipes: dict[str, object], specs: list[ServerSpec], tasks) -> dict:
    out: dict = {}
    async with Toolbox.connect(specs) as box:
        for name, pipe in pipes.items():
            backend = LocalBackend(pipe)
            start = time.perf_counter()
            metrics, _ = await evaluate(backend, box, tasks, Sampling(max_tokens=96))
            out[name] = {"metrics": asdict(metrics), "seconds": time.perf_counter() - start}
        transcripts = []
        for query in EXAMPLES:
            start = time.perf_counter()
            result = await run_agent(LocalBackend(pipes["tool_model"]), box, [{"role": "user", "content": query}],
                                     max_steps=3, sampling=Sampling(max_tokens=128))
            transcripts.append({"query": query, "seconds": time.perf_counter() - start,
                                "calls": [format_call(c.name, c.arguments) for s in result.steps for c in s.calls],
                                "answer": result.answer})
        out["transcripts"] = transcripts
    return out


def model_card(r: dict) -> str:
    def row(name: str) -> str:
        m = r["mcp"][name]["metrics"]
        return (f"| {name.replace('_', ' ')} | {100 * m['name']:.1f} | {100 * m['param_names']:.1f} | "
                f"{100 * m['param_values']:.1f} | {100 * m['executed_ok']:.1f} |")

    tools = r["mcp"]["tool_model"]["metrics"]["by_tool"]
    per_tool = "\n".join(f"| {t} | {v['items']} | {100 * v['name']:.1f} | {100 * v['param_names']:.1f} | "
                         f"{100 * v['param_values']:.1f} |" for t, v in tools.items())
    examples = "\n".join(f"- {x['query']}\n  - calls: {', '.join(x['calls']) or '(none)'}\n  - answer: {x['answer']!r}"
                         for x in r["mcp"]["transcripts"])
    d = r.get("definitions")
    skill = ("The earlier skill, held-out definition questions (train/chat_eval.py): answer NLL "
             f"{d['default_model']['answer_nll']:.3f} -> {d['tool_model']['answer_nll']:.3f} nats/token, greedy F1 "
             f"{d['default_model']['greedy_f1']:.3f} -> {d['tool_model']['greedy_f1']:.3f} (default model -> tool "
             "model)." if d else "(The definition questions were not measured: build/data/sft/heldout.jsonl absent.)")
    kinds = ", ".join(f"{k} {v}" for k, v in r["data"].get("train_kinds", {}).items()) or "kinds not recorded"
    tm = r["mcp"]["tool_model"]["metrics"]
    # Said from the measured numbers, so the card cannot promise more than the model does.
    picks = [f"{t} ({m['name'] * 100:.0f}% right)" for t, m in tm["by_tool"].items() if m["name"] >= 0.5]
    ability = (f"It picks the right tool for most held-out queries of {', '.join(picks)}"
               if picks else "It rarely picks the right tool") + (
        f"; its calls run on the servers {tm['executed_ok'] * 100:.0f}% of the time. "
        f"It fills in the right argument values only {tm['param_values'] * 100:.1f}% of the time: it writes "
        "well-formed zones, times and expressions, but mostly not the ones the query names (it has not learned "
        "to copy them)." if tm["param_values"] < 0.5 else
        f"; {tm['param_values'] * 100:.0f}% of its calls have the right argument values.")
    return f"""# minicpm4 tool model

The bundled default model (minicpm4/assets/default-model, {r['parameters'] / 1e6:.2f} M parameters) after
tool-use SFT, so that `minicpm4 mcp` on the bundled model really calls MCP tools. Weights bf16; tokenizer and
chat format are the default model's; tool calls in MiniCPM4-MCP's format (minicpm4/apps/tool_calls.py).

## Data and recipe (`make tool-model`)
`minicpm4 mcp synth` against the live servers `mcp-server-time` and `mcp-server-calculator` (PyPI):
{r['data'].get('train', '?')} training conversations ({kinds}): tool trajectories from the training
templates of minicpm4/apps/mcp_tasks.py (one- and two-call tasks; every gold call executed on the server), short
query -> first-call drills (no tools prompt), and the default model's own SFT chats (some with tools offered and
not called). Then `minicpm4 train sft` from the
default model: {r['sft']['steps']} steps of {r['sft']['micro_batch_size']} x {r['sft']['seq_len']} tokens, lr
{r['sft']['lr']} (WSD: {r['sft']['warmup_steps']} warmup, {r['sft']['decay_shape']} decay over the last
{r['sft']['decay_steps']} steps), {r['sft']['dtype']}, loss on assistant tokens only.

## MiniCPM4-MCP metrics on the held-out test tasks
{r['test_tasks']} tasks ({r['mcp']['tool_model']['metrics']['items']} calls) from templates never used in training,
scored per call given the gold previous steps (minicpm4/apps/mcp_eval.py); greedy.

| model | function name | parameter names | parameter values | executed ok |
|---|---|---|---|---|
{row('default_model')}
{row('tool_model')}

By tool (tool model):

| tool | calls | name | names | values |
|---|---|---|---|---|
{per_tool}

{skill}

Greedy `minicpm4 mcp` runs on held-out queries:
{examples}

## What it can and cannot do
{ability}
It knows no other tools and no other cities, and it is a 3 M-parameter toy: check its calls.
"""


def train_config(run: Path) -> dict:
    """The SFT settings the run recorded (its latest checkpoint's train_state.json)."""
    states = sorted((run / "checkpoints").glob("step_*/train_state.json"))
    return json.loads(states[-1].read_text())["train_config"] if states else {}


def package(run: Path, data: Path, specs: list[ServerSpec], out: Path, chat_heldout: Path) -> dict:
    final = run / "final"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(load_model(final, dtype=torch.float32), tmp, dtype=torch.bfloat16)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, tmp / name)
    pipes = {"default_model": from_pretrained(DEFAULT_MODEL_DIR, dtype="float32"),
             "tool_model": from_pretrained(tmp, dtype="float32")}
    tasks = load_tasks(TEST_TASKS)
    stats_file = data / "stats.json"
    results = {"parameters": pipes["tool_model"].model.num_parameters(), "test_tasks": len(tasks),
               "sft": train_config(run),
               "data": json.loads(stats_file.read_text()) if stats_file.is_file() else {},
               "mcp": anyio.run(measure, pipes, specs, tasks)}
    if chat_heldout.is_file():
        results["definitions"] = {k: evaluate_chat(p, chat_heldout, "definition", 64) for k, p in pipes.items()}
    publish(tmp, out, results, model_card(results))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/tool-sft"))
    p.add_argument("--server", action="append", required=True)
    p.add_argument("--out", type=Path, default=TOOL_MODEL_DIR)
    p.add_argument("--data", type=Path, default=Path("build/mcp-sft"), help="the `mcp synth` folder it trained on")
    p.add_argument("--chat-heldout", type=Path, default=Path("build/data/sft/heldout.jsonl"))
    args = p.parse_args()
    results = package(args.run, args.data, [ServerSpec.parse(s) for s in args.server], args.out, args.chat_heldout)
    for name in ("default_model", "tool_model"):
        m = results["mcp"][name]["metrics"]
        print(f"{name}: name {100 * m['name']:.1f} / names {100 * m['param_names']:.1f} / "
              f"values {100 * m['param_values']:.1f} ({results['mcp'][name]['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
