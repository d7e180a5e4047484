"""The cost of verifying n draft tokens in one target forward, T(n) / T(1), on a MiniCPM4-0.5B-shaped model, and
the decode speed the engine reaches at a given mean accepted length (issue 10's 0.5B benchmark).

    .venv/bin/python benchmarks/spec_verify_cost.py --weights float32 --contexts 512 [--sizes 1,2,4,...,64]
    .venv/bin/python benchmarks/spec_verify_cost.py --weights int4 --contexts 512
    .venv/bin/python benchmarks/spec_verify_cost.py --weights float32 --contexts 32768 --sparse on|off

T(n): one engine step (LLMEngine.step: scheduling, the forward over the root + n - 1 tree nodes through the
engine's paged tree verification, the LM head over every tree row, the acceptance walk, the K/V commit) with a
fixed random draft tree of n nodes (its shape does not change the cost), median over --steps steps, at a
context of C keys. T(1) is the engine's plain decode step at the same context. The context is a synthetic cache
(random K/V in the pages, no prefill: a 32K prefill of a 0.5B model takes many minutes here); InfLLM v2 runs on
those keys as on real ones (its compressed keys are computed from the pages).

A random target cannot be drafted, so the accepted length is not measured here: the decode speed at accepted
length A is DERIVED as A / (T(n) + draft time), with the draft time of a one-layer EAGLE draft measured on
the same model (--draft-layer: the draft's forward + FR-Spec head per tree level, measured), and A taken from
benchmarks/results/spec_decode.json (the default model with its trained draft). Writes
benchmarks/results/spec_verify_cost_<weights>_<context><sparse>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, median, publish  # noqa: E402

from minicpm4.config import MiniCPMConfig  # noqa: E402
from minicpm4.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from minicpm4.engine.sequence import SequenceStatus  # noqa: E402
from minicpm4.model import build_model  # noqa: E402
from minicpm4.speculative.draft_model import build_draft  # noqa: E402
from minicpm4.speculative.eagle import EagleDrafter  # noqa: E402
from minicpm4.speculative.tree import DraftTree, TreeShape, single_node_tree  # noqa: E402

CONFIG_05B = Path(__file__).resolve().parents[1] / "minicpm4" / "assets" / "minicpm4-0.5b" / "config.json"


class FixedTreeDrafter:
    """A tree of n nodes of random tokens (a binary-ish tree: node i's parent is (i - 1) // 2)."""

    def __init__(self, n: int, vocab: int) -> None:
        self.n = n
        self.shape = TreeShape(num_iter=max(1, n.bit_length()), topk_per_iter=2, tree_size=max(n, 1))
        self.g = torch.Generator().manual_seed(0)
        self.vocab = vocab

    def observe(self, *args) -> None:
        pass

    def drop(self, key) -> None:
        pass

    def draft_tree(self, key, token_ids, shape=None) -> DraftTree:
        tree = single_node_tree(token_ids[-1])
        for i in range(1, self.n):
            tree.add((i - 1) // 2, int(torch.randint(3, self.vocab, (1,), generator=self.g)))
        return tree


def start_at_context(engine: LLMEngine, context: int, vocab: int) -> None:
    """One request whose first context - 1 tokens have (random) K/V in the pages: the next step decodes."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (context,), generator=g).tolist()
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=100000, ignore_eos=True))
    seq = engine.requests[rid]
    engine.scheduler.waiting.remove(seq)
    engine.blocks.allocate(seq, context - 1)
    seq.num_computed_tokens = context - 1
    seq.status = SequenceStatus.RUNNING
    engine.scheduler.running.append(seq)
    cache = engine.runner.cache
    for pool in cache.k + cache.v:  # the pages this request holds: random keys/values of a typical scale
        pages = torch.tensor(seq.block_table)
        pool[pages] = (torch.randn(pool[pages].shape, generator=g) * 0.5).to(pool.dtype)


def step_times(model, context: int, n: int, steps: int, kv_tokens: int) -> float:
    drafter = FixedTreeDrafter(n, model.config.vocab_size) if n > 1 else None
    engine = LLMEngine(model, config=EngineConfig(kv_cache_tokens=kv_tokens, max_num_batched_tokens=128),
                       drafter=drafter)
    start_at_context(engine, context, model.config.vocab_size)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return median(times[2:])


def draft_level_time(model, context: int, frspec: int | None, steps: int) -> float:
    """Seconds per tree level of a one-layer EAGLE draft on this model: one draft forward over topk rows + its
    (FR-Spec) head + top-k, as EagleDrafter.draft_tree runs it (with a warm draft KV window)."""
    ids = torch.arange(frspec) if frspec else None
    drafter = EagleDrafter(model, build_draft(model.config, dtype=model.dtype, seed=0), TreeShape(2, 8, 9),
                           frspec_ids=ids, context_len=model.config.max_position_embeddings)
    H = model.config.hidden_size
    window = min(context, drafter.window)
    drafter.observe("s", torch.randn(window, H, dtype=model.dtype), context - window)
    tokens = list(range(context + 1))
    drafter.draft_tree("s", tokens)  # feeds the window
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        drafter.observe("s", torch.randn(1, H, dtype=model.dtype), len(tokens) - 1)
        tokens.append(5)
        drafter.draft_tree("s", tokens)  # feed 1 pair + depth-0 head + 1 level of 8 rows
        times.append(time.perf_counter() - t)
    return median(times[2:]) / 2  # two head calls and two forwards per call: per level


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", choices=["float32", "bfloat16", "int4"], default="float32")
    ap.add_argument("--contexts", default="512")
    ap.add_argument("--sizes", default="1,2,3,4,6,8,12,16,24,32,48,64")
    ap.add_argument("--sparse", choices=["on", "off"], default="off")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--frspec", type=int, default=32768, help="FR-Spec head size of the draft-time estimate")
    ap.add_argument("--accepted", default=None, help="accepted lengths for the derived speed (default: from "
                    "benchmarks/results/spec_decode.json, else 2,3,4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = MiniCPMConfig.from_json(CONFIG_05B)
    config = config.with_sparse(args.sparse == "on")
    dtype = torch.bfloat16 if args.weights in ("bfloat16", "int4") else torch.float32
    model = build_model(config, dtype=dtype, seed=0).eval()
    if args.weights == "int4":
        from minicpm4.quant import Int4WeightOnlyConfig, quantize_

        quantize_(model, Int4WeightOnlyConfig(group_size=128))
    sizes = [int(s) for s in args.sizes.split(",")]
    accepted = [float(a) for a in args.accepted.split(",")] if args.accepted else _measured_accepted()
    results, rows = {}, []
    for C in (int(c) for c in args.contexts.split(",")):
        kv = -(-(C + 256) // 64) * 64
        times = {n: step_times(model, C, n, args.steps, kv) for n in sizes}
        level = draft_level_time(model, C, args.frspec, args.steps)
        base = times[1]
        results[C] = {"step_s": times, "ratio": {n: t / base for n, t in times.items()}, "draft_level_s": level,
                      "plain_tok_s": 1 / base}
        for n in sizes:
            rows.append(f"| {C} | {n} | {fmt(times[n] * 1e3, 2)} | {fmt(times[n] / base, 2)} |")
        derived = {}
        for A in accepted:
            for n, depth in ((4, 3), (8, 3), (12, 2)):
                if n in times:
                    t = times[n] + depth * level
                    derived[f"A={A} n={n}"] = {"tok_s": A / t, "vs_plain": A / t * base}
        results[C]["derived"] = derived
        print(f"context {C}: plain {1 / base:.1f} tok/s; draft level {level * 1e3:.2f} ms; derived "
              + ", ".join(f"{k}: {v['tok_s']:.1f} tok/s ({v['vs_plain']:.2f}x)" for k, v in derived.items()), flush=True)
    table = "\n".join(["| context | n (tree tokens) | step ms | T(n)/T(1) |", "|---|---|---|---|", *rows])
    tag = f"{args.weights}_{'_'.join(args.contexts.split(','))}{'_sparse' if args.sparse == 'on' else ''}"
    publish({"command": command_line(), "machine": machine_info(args.threads), "weights": args.weights,
             "sparse": args.sparse, "accepted_lengths": accepted, "results": results, "table": table,
             "when": time.strftime("%Y-%m-%d %H:%M")}, RESULTS_DIR / f"spec_verify_cost_{tag}.json")


def _measured_accepted() -> list[float]:
    import json

    path = RESULTS_DIR / "spec_decode.json"
    if path.is_file():
        res = json.loads(path.read_text())["results"]
        vals = sorted({round(v["accepted_length"], 2) for w in res.values() for v in w.values()
                       if v.get("accepted_length")})
        if vals:
            return [vals[0], vals[len(vals) // 2], vals[-1]]
    return [2.0, 3.0, 4.0]


if __name__ == "__main__":
    main()
