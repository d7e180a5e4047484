"""Speculative decoding on the bundled default model with its shipped EAGLE draft: mean accepted length and
single-stream decode speed vs the engine's own plain decoding, across tree shapes and FR-Spec sizes, at a
chat-length context and at long context (InfLLM v2 sparse attention past the model's dense_len of 1,024).

    .venv/bin/python benchmarks/spec_decode.py [--repeats 3] [--threads 1] [--new-tokens 128]

Workloads (nothing outside the repository): "chat" = dictionary questions in the chat template (what the model
was fine-tuned on); "text" = 64-token windows of the shipped validation tokens (val_tokens.npy) continued
greedily; "long" = one 3,072-token window of them (sparse attention: dense_len 1,024). Greedy, batch size 1
(requests one after another), ignore_eos. Decode speed = generated tokens after the first / time after the
first token, summed over a workload's prompts; mean accepted length = tokens emitted per verification step
(accepted draft tokens + the bonus token, engine counters). Every speculative run's tokens are compared with
plain decoding's (lossless: they must be equal; mismatches are reported, not hidden). Systems are interleaved
per repeat; speed-ups are same-repeat ratios, medians over repeats. FR-Spec indexes: the draft folder's
freq_{N}.pt (minicpm4 frspec-index over the training corpus, `make default-draft`).
Writes benchmarks/results/spec_decode.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, median, publish  # noqa: E402

from minicpm4.api import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR, parse_dtype  # noqa: E402
from minicpm4.checkpoint import load_model  # noqa: E402
from minicpm4.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from minicpm4.speculative.config import SpeculativeConfig  # noqa: E402
from minicpm4.speculative.tree import TreeShape  # noqa: E402
from minicpm4.tokenizer import Tokenizer  # noqa: E402

QUESTIONS = ["What is the meaning of the word harbour?", "Give me a synonym of \"quick\".",
             "What does the word lantern mean?", "Define the noun orchestra.", "What is a glacier?",
             "Give me a synonym of \"angry\".", "What is the meaning of the word velvet?", "What does ancient mean?"]
# (name, shape, FR-Spec size or None): CPM.cu's CLI tree first, then smaller/larger trees, then FR-Spec sizes.
CONFIGS = [("tree 2/10/12", TreeShape(2, 10, 12), None), ("tree 3/4/8", TreeShape(3, 4, 8), None),
           ("tree 4/2/8", TreeShape(4, 2, 8), None), ("tree 2/4/5", TreeShape(2, 4, 5), None),
           ("tree 5/3/16", TreeShape(5, 3, 16), None), ("chain 3", TreeShape(3, 1, 4), None),
           ("tree 3/4/8 + FR 1024", TreeShape(3, 4, 8), 1024), ("tree 3/4/8 + FR 2048", TreeShape(3, 4, 8), 2048),
           ("tree 3/4/8 + FR 4096", TreeShape(3, 4, 8), 4096)]


def workloads(tokenizer: Tokenizer, which: list[str]) -> dict[str, list[list[int]]]:
    val = np.load(DEFAULT_MODEL_DIR / "val_tokens.npy").astype(np.int64)
    out = {}
    if "chat" in which:
        out["chat"] = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    if "text" in which:
        out["text"] = [val[s:s + 64].tolist() for s in range(0, 8 * 4096, 4096)]
    if "long" in which:
        out["long"] = [val[20000:20000 + 3072].tolist()]
    return out


def run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, int]:
    """-> tokens per prompt, decode seconds (after each first token), decode tokens."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    outs, seconds, tokens = [], 0.0, 0
    for p in prompts:
        rid = engine.add_request(p, params)
        result = None
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid and o.finished:
                    result = o
        m = result.metrics
        outs.append(result.token_ids)
        seconds += m.finished_time - m.first_token_time
        tokens += len(result.token_ids) - 1
    return outs, seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default=str(DEFAULT_DRAFT_DIR))
    ap.add_argument("--frspec", default=None, help="folder of freq_{N}.pt (default: the draft folder)")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workloads", default="chat,text,long")
    ap.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "spec_decode.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    model = load_model(DEFAULT_MODEL_DIR, dtype=dtype).eval()
    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    frspec_dir = Path(args.frspec or args.draft)
    configs = [c for c in CONFIGS if args.configs is None or c[0] in args.configs.split(",")]
    engines = {"plain": LLMEngine(model, config=EngineConfig())}
    for name, shape, fr in configs:
        fr_path = frspec_dir / f"freq_{fr}.pt" if fr is not None else None
        if fr_path is not None and not fr_path.is_file():
            print(f"skip {name}: no {fr_path}")
            continue
        spec = SpeculativeConfig(args.draft, shape=shape, frspec=str(fr_path) if fr_path else None)
        engines[name] = LLMEngine(model, config=EngineConfig(speculative=spec))
    loads = workloads(tokenizer, args.workloads.split(","))
    raw: dict[str, dict[str, list]] = {w: {n: [] for n in engines} for w in loads}
    accepted: dict[str, dict[str, float]] = {w: {} for w in loads}
    mismatches: dict[str, dict[str, int]] = {w: {} for w in loads}
    for w, prompts in loads.items():
        for name, engine in engines.items():  # warm-up: kernels built, first-call costs paid
            run(engine, prompts[:1], 8)
        for r in range(args.repeats):
            plain_tokens = None
            for name, engine in engines.items():
                before = (engine.stats.spec_tokens_total, engine.stats.spec_verify_total)
                outs, sec, n = run(engine, prompts, args.new_tokens)
                raw[w][name].append(n / sec)
                if name == "plain":
                    plain_tokens = outs
                else:
                    mismatches[w][name] = mismatches[w].get(name, 0) + sum(a != b for a, b in zip(outs, plain_tokens))
                    t, v = engine.stats.spec_tokens_total - before[0], engine.stats.spec_verify_total - before[1]
                    accepted[w][name] = t / max(v, 1)
                print(f"{w} repeat {r} {name}: {n / sec:.1f} tok/s", flush=True)
    rows, results = [], {}
    for w in loads:
        results[w] = {}
        for name in engines:
            speeds = raw[w][name]
            ratio = median(s / p for s, p in zip(speeds, raw[w]["plain"]))
            results[w][name] = {"tok_s": median(speeds), "runs": speeds, "speedup": ratio,
                                "accepted_length": accepted[w].get(name), "mismatched_outputs": mismatches[w].get(name)}
            rows.append(f"| {w} | {name} | {fmt(median(speeds))} | {fmt(ratio, 2)}x | "
                        f"{fmt(accepted[w].get(name), 2) if name != 'plain' else '1.00'} | "
                        f"{mismatches[w].get(name, 0)} |")
    table = "\n".join(["| workload | system | decode tok/s | vs plain | mean accepted length | outputs != plain |",
                       "|---|---|---|---|---|---|", *rows])
    result = {"command": command_line(), "machine": machine_info(args.threads), "dtype": str(dtype),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "draft": args.draft, "results": results,
              "table": table, "when": time.strftime("%Y-%m-%d %H:%M")}
    publish(result, args.out)


if __name__ == "__main__":
    main()
