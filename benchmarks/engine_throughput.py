"""Serving throughput at 1, 4, 16, 32 concurrent requests: the engine vs static batching vs llama.cpp.

Every request has its own --prompt-len random prompt (different ids per request) and asks for
--new-tokens greedy tokens with EOS ignored; all N requests are submitted at once. Systems:

  engine     minicpm4.engine.LLM(model_dir, dtype=...).generate(list_of_prompts, SamplingParams(...));
             per-request times from RequestOutput.metrics.
  reference  minicpm4.generate.generate_tokens on all N prompts as one static batch (the baseline the
             engine replaces): every request gets its first token when the batched prefill ends.
  llamacpp   llama-cpp-python's C API on our GGUF export (F32 / BF16, KV cache to match), N sequences in
             one context (n_seq_max = N): all prompts in one llama_decode call, then one llama_decode
             of N tokens (one per sequence) per step, numpy argmax per sequence. Wall-clock times.

Reported per (model, dtype, system, N), medians over --repeats for throughput, percentiles over all
requests of all repeats for latencies:
  total decode tok/s = sum over requests of (tokens - 1) / (last finish - first first-token)
  total tok/s        = all generated tokens / (last finish - submission): end to end
  TTFT               = first_token_time - arrival_time, p50 / p99
  per-token latency  = (finished_time - first_token_time) / (tokens - 1), p50 / p99
and, per system, the ratio of total decode tok/s at 16 requests to 1 request.

Models as in engine_speed.py: `default` (bundled) and `0.5b` (random MiniCPM4-0.5B-shaped checkpoint).
llama-cpp-python is optional (install command in engine_speed.py's docstring).

    .venv/bin/python benchmarks/engine_throughput.py --models 0.5b --dtypes bfloat16
    .venv/bin/python benchmarks/engine_throughput.py --models default --systems reference,llamacpp --repeats 1

Writes benchmarks/results/engine_throughput.json and .png (or --out / --plot), prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, median, percentile, publish, pyplot, save_figure, TimedRequest, workdir_or_temp  # noqa: E402
from engine_speed import (  # noqa: E402
    DTYPES, LlamaCppRunner, Unavailable, gguf_file, import_engine, import_llama_cpp, make_prompt,
    add_run_options, prepare_model, sampling_params,
)

from minicpm4.config import MiniCPMConfig  # noqa: E402

SYSTEMS = ("engine", "reference", "llamacpp")
WARMUP_PROMPT, WARMUP_NEW = 16, 4


@dataclass
class Request(TimedRequest):
    cached_tokens: int = 0  # prompt tokens an engine served from its prefix cache (should stay 0 here)


def summarise_run(reqs: list[Request], submitted: float) -> dict:
    decode_window = max(r.finished for r in reqs) - min(r.first_token for r in reqs)
    return {
        "total_decode_tok_s": sum(r.tokens - 1 for r in reqs) / decode_window if decode_window > 0 else float("nan"),
        "total_tok_s": sum(r.tokens for r in reqs) / (max(r.finished for r in reqs) - submitted),
        "requests": [{"tokens": r.tokens, "ttft_s": r.ttft, "per_token_s": r.per_token, "cached_tokens": r.cached_tokens}
                     for r in reqs],
    }


class ReferenceBatch:
    name = "reference"

    def __init__(self, model_dir: Path, dtype: str, args) -> None:
        from minicpm4.checkpoint import load_model

        self.model = load_model(model_dir, dtype=DTYPES[dtype]).eval()

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[Request], float]:
        from minicpm4.generate import generate_tokens

        n = len(prompts)
        counts, first, done = [0] * n, [None] * n, [None] * n
        t0 = time.perf_counter()
        for step in generate_tokens(self.model, prompts, sampling_params(new_tokens)):
            now = time.perf_counter()
            for row, (tok, reason) in enumerate(zip(step.tokens, step.finish_reasons)):
                if tok is not None:
                    counts[row] += 1
                    if first[row] is None:
                        first[row] = now
                if reason is not None:
                    done[row] = now
        return [Request(counts[i], t0, first[i], done[i]) for i in range(n)], t0

    def close(self) -> None:
        del self.model


class EngineBatch:
    name = "engine"

    def __init__(self, model_dir: Path, dtype: str, args) -> None:
        LLM, self.SamplingParams = import_engine()
        self.llm = LLM(str(model_dir), dtype=dtype)

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[Request], float]:
        params = self.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        reqs = [Request(len(o.token_ids), o.metrics.arrival_time, o.metrics.first_token_time, o.metrics.finished_time,
                        getattr(o.metrics, "num_cached_tokens", 0) or 0) for o in outs]
        return reqs, min([t0] + [r.arrival for r in reqs])

    def close(self) -> None:
        close = getattr(self.llm, "close", None) or getattr(self.llm, "shutdown", None)
        if callable(close):
            close()
        del self.llm


class LlamaCppBatch:
    """One llama.cpp context per concurrency level (n_seq_max = N), made on first use."""

    name = "llamacpp"

    def __init__(self, model_dir: Path, dtype: str, args, workdir: Path, tag: str) -> None:
        import_llama_cpp()
        self.gguf = gguf_file(model_dir, dtype, workdir, tag)
        self.dtype, self.args = dtype, args
        self.runners: dict[tuple[int, int, int], LlamaCppRunner] = {}

    def runner(self, n: int, per_seq: int, n_batch: int) -> LlamaCppRunner:
        key = (n, per_seq, n_batch)
        if key not in self.runners:
            for r in self.runners.values():  # one context at a time: KV caches for 32 sequences add up
                r.close()
            self.runners = {key: LlamaCppRunner(self.gguf, self.dtype, self.args.threads, n_ctx=n * per_seq, n_seq_max=n,
                                                n_batch=n_batch, flash_attn=self.args.llamacpp_flash_attn,
                                                kv_unified=self.args.llamacpp_kv_unified)}
        return self.runners[key]

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[Request], float]:
        n, plen = len(prompts), max(len(p) for p in prompts)
        per_seq = max(256, -(-(plen + new_tokens) // 256) * 256)
        r = self.runner(n, per_seq, n * max(plen, self.args.prompt_len))  # every prompt in one llama_decode
        r.reset()
        t0 = time.perf_counter()
        entries = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        r.decode(entries)
        last = {s: i for i, (_, _, s, want) in enumerate(entries) if want}
        tokens = [[r.argmax(last[s])] for s in range(n)]
        t1 = time.perf_counter()
        for step in range(new_tokens - 1):
            r.decode([(tokens[s][-1], len(prompts[s]) + step, s, True) for s in range(n)])
            for s in range(n):
                tokens[s].append(r.argmax(s))
        t2 = time.perf_counter()
        return [Request(len(t), t0, t1, t2) for t in tokens], t0

    def close(self) -> None:
        for r in self.runners.values():
            r.close()
        self.runners = {}


def build(name: str, model_dir: Path, dtype: str, args, workdir: Path, tag: str):
    if name == "engine":
        return EngineBatch(model_dir, dtype, args)
    if name == "reference":
        return ReferenceBatch(model_dir, dtype, args)
    return LlamaCppBatch(model_dir, dtype, args, workdir, tag)


def bench_case(model_name: str, dtype: str, args, workdir: Path) -> dict:
    model_dir = prepare_model(model_name, workdir)
    config = MiniCPMConfig.from_json(model_dir / "config.json")
    systems, errors = {}, {}
    for name in args.systems:
        try:
            systems[name] = build(name, model_dir, dtype, args, workdir, model_name)
            systems[name].run([make_prompt(config, WARMUP_PROMPT, seed=10_000)], WARMUP_NEW)
        except Unavailable as exc:  # llama-cpp-python not installed: that column is n/a
            errors[name] = str(exc)
            systems.pop(name, None)
        if name in errors:
            print(f"[{model_name} {dtype}] {name}: n/a ({errors[name]})", flush=True)

    runs: dict[tuple[str, int], list[dict]] = {}
    order = list(systems)
    for n in args.concurrency:
        for rep in range(args.repeats):
            # a different prompt per request, per repeat and per N: nothing for a prefix cache to reuse
            prompts = [make_prompt(config, args.prompt_len, seed=1 + i + 1000 * n + 1_000_000 * rep) for i in range(n)]
            shift = rep % len(order) if order else 0
            for name in order[shift:] + order[:shift]:
                reqs, submitted = systems[name].run(prompts, args.new_tokens)
                s = summarise_run(reqs, submitted)
                runs.setdefault((name, n), []).append(s)
                print(f"[{model_name} {dtype}] N={n:2d} repeat {rep} {name:9s} decode {s['total_decode_tok_s']:8.1f} "
                      f"tok/s total  TTFT p50 {percentile([q.ttft for q in reqs], 50):7.2f} s", flush=True)
    for s in systems.values():
        s.close()
    gc.collect()

    rows = []
    for name in args.systems:
        for n in args.concurrency:
            rs = runs.get((name, n), [])
            reqs = [q for r in rs for q in r["requests"]]
            row = {"model": model_name, "dtype": dtype, "system": name, "concurrency": n, "repeats": len(rs),
                   "total_decode_tok_s": median(r["total_decode_tok_s"] for r in rs),
                   "total_tok_s": median(r["total_tok_s"] for r in rs),
                   "ttft_p50_s": percentile([q["ttft_s"] for q in reqs], 50),
                   "ttft_p99_s": percentile([q["ttft_s"] for q in reqs], 99),
                   "per_token_p50_s": percentile([q["per_token_s"] for q in reqs], 50),
                   "per_token_p99_s": percentile([q["per_token_s"] for q in reqs], 99),
                   "runs": rs}
            if not rs and name in errors:
                row["error"] = errors[name]
            rows.append(row)
    ratios = {}
    for name in args.systems:
        by_n = {r["concurrency"]: r["total_decode_tok_s"] for r in rows if r["system"] == name}
        if 1 in by_n and 16 in by_n and by_n[1] == by_n[1] and by_n[16] == by_n[16]:
            ratios[name] = by_n[16] / by_n[1]
    return {"model": model_name, "dtype": dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "rows": rows, "ratio_16_vs_1": ratios, "errors": errors}


def table(cases: list[dict]) -> str:
    lines = ["| model | dtype | system | N | total decode tok/s | total tok/s | TTFT p50 / p99 s | "
             "per-token p50 / p99 ms | 16 vs 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        for r in case["rows"]:
            ratio = case["ratio_16_vs_1"].get(r["system"])
            ratio_cell = fmt(ratio, 2) + "x" if ratio is not None and r["concurrency"] == 16 else ""
            ms = [1e3 * r[k] if r[k] == r[k] else float("nan") for k in ("per_token_p50_s", "per_token_p99_s")]
            lines.append(f"| {r['model']} | {r['dtype']} | {r['system']} | {r['concurrency']} | "
                         f"{fmt(r['total_decode_tok_s'])} | {fmt(r['total_tok_s'])} | "
                         f"{fmt(r['ttft_p50_s'], 2)} / {fmt(r['ttft_p99_s'], 2)} | "
                         f"{fmt(ms[0])} / {fmt(ms[1])} | {ratio_cell} |")
    return "\n".join(lines)


def _number(v) -> bool:
    return v is not None and v == v  # not None, not NaN


def plot(cases: list[dict], path: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    all_ns: set[int] = set()
    for case in cases:
        for name in dict.fromkeys(r["system"] for r in case["rows"]):
            rows = [r for r in case["rows"] if r["system"] == name and _number(r["total_decode_tok_s"])]
            if not rows:
                continue
            label = f"{name}, {case['model']}, {case['dtype']}"
            ns = [r["concurrency"] for r in rows]
            all_ns.update(ns)
            style = {"color": {"engine": "C0", "reference": "C1", "llamacpp": "C2"}.get(name),
                     "marker": "o" if case["model"] == "default" else "s",
                     "linestyle": "-" if case["dtype"] == "bfloat16" else "--", "label": label}
            ax_tp.plot(ns, [r["total_decode_tok_s"] for r in rows], **style)
            ax_ttft.plot(ns, [r["ttft_p50_s"] for r in rows], **style)
    for ax, ylabel in ((ax_tp, "total decode tokens/s"), (ax_ttft, "time to first token, p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(all_ns)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_tp.legend(fontsize=7)
    return save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(p, SYSTEMS, prompt_len=128)
    p.add_argument("--concurrency", default="1,4,16,32", type=lambda v: [int(x) for x in v.split(",") if x.strip()])
    p.add_argument("--llamacpp-flash-attn", choices=["auto", "on", "off"], default="off",
                   help="llama.cpp flash attention (see engine_speed.py's docstring)")
    p.add_argument("--llamacpp-kv-unified", action="store_true",
                   help="one KV buffer for all llama.cpp sequences (llama-server's default) instead of one each")
    p.add_argument("--workdir", default=None, help="random 0.5B checkpoint and GGUF files (default: temp, removed)")
    p.add_argument("--out", default=str(RESULTS_DIR / "engine_throughput.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with workdir_or_temp(args.workdir, "engine-throughput-") as workdir:
        cases = []
        for model_name in args.models:
            for dtype in args.dtypes:
                cases.append(bench_case(model_name, dtype, args, workdir))
                print(table(cases[-1:]), flush=True)

    machine = machine_info(args.threads)
    llama_version = None
    try:
        llama_version = import_llama_cpp().__version__
    except Unavailable:
        pass
    result = {"benchmark": "engine_throughput", "command": command_line(argv), "machine": machine,
              "llama_cpp_python": llama_version, "args": vars(args), "cases": cases, "table": table(cases)}
    title = f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens each, greedy; {args.threads} threads, {machine['cpu']}"
    publish(result, args.out, lambda png: plot(cases, png, title), args.plot)
    return result


if __name__ == "__main__":
    main()
