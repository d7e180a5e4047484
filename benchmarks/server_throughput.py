"""Streaming throughput of `minicpm4 serve` at 1 and 16 concurrent clients, per `--threads`, vs the engine direct.

The question: on a 2-core machine the server's HTTP / JSON / SSE work runs in the event-loop thread while
the model steps in the engine worker thread with `--threads N` torch threads (default cores - 1). Which N
serves better, and what does the HTTP path cost against calling the engine in-process on the same work?

For each model and each N in --threads:

  http    `.venv/bin/minicpm4 serve [--model DIR] --port P --threads N --dtype D` as a subprocess (the
          default model: --model omitted, so the server loads the bundled one itself); wait for GET /health;
          one warm-up round; then, per concurrency C and repeat, C streaming POST /v1/completions clients
          started at once (asyncio + httpx in this process), each with its own --prompt-len prompt,
          max_tokens = --max-tokens, temperature 0, top_p 1, `ignore_eos: true` (our extension: exactly
          max_tokens tokens each), stream_options.include_usage (the token count). Then SIGTERM.
  direct  the engine without HTTP: a fresh child process per N and mode (as every server is a fresh process)
          loads the model the way `minicpm4 serve` does (default_pipeline / from_pretrained at --dtype,
          LLM(model=..., tokenizer=...) with the server's engine options), runs the same warm-up, then
          LLM.generate on the same prompts with the same SamplingParams. --direct-modes:
            worker  (`direct`) the server's threading: the LLM built at the process's default torch threads,
                    generate called in one worker thread that first sets torch.set_num_threads(N), as
                    AsyncLLM._run does. The HTTP/direct ratio uses this one.
            main    (`direct-main`) torch.set_num_threads(N) before the LLM is built, generate in the main
                    thread (engine_throughput.py's --threads). FastDecoder's C++ decode kernel takes its
                    thread count from torch.get_num_threads() when the LLM is built, so only here does N reach
                    it; in the server and in `worker` it gets torch's default (cores). The JSON records
                    kernel_threads per direct run.

Prompts (--prompt-format): `ids` (default) sends the token ids as the completions prompt, so both paths run
identical ids; `text` sends tokenizer.decode(ids) and the server tokenizes it (the direct path then passes the
same text to LLM.generate, which encodes it in-process). Every request, repeat and C gets its own prompt.

Figures per (model, N, C, path); throughput is the median over --repeats, latencies pool all requests:
  total tok/s        = generated tokens / (last token out - submission of the first request)
  decode tok/s       = sum(tokens - 1) / (last token out - first first-token)
  TTFT p50 / p99     = first token out - submission. http: the first SSE chunk carrying a choice, seen by
                       the client (a token whose text is still an incomplete UTF-8 piece sends no chunk, so
                       this can be a token late); direct: RequestOutput.metrics.first_token_time - t0
  per-token p50/p99  = (last token out - first token out) / (tokens - 1), per request
  http also: inter-chunk gap p50 / p99 over every consecutive pair of chunks of every request, and whether
  each request's streamed text equals the direct run's text (greedy; bf16 batches may diverge).
`HTTP / this` is http total tok/s over the row's; `vs first --threads` is the row's total tok/s over the same
path's at the first --threads value and the same C.

The HTTP clients run in this process on the same cores as the server (a real client would sit elsewhere),
so their JSON parsing is part of the measured HTTP cost; the direct phase runs after the server has exited.

    .venv/bin/python benchmarks/server_throughput.py --models default --repeats 1
    .venv/bin/python benchmarks/server_throughput.py --models 0.5b --concurrency 1 --max-tokens 16

Writes benchmarks/results/server_throughput.json and .png (or --out / --plot), prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, median, percentile, publish, pyplot, save_figure, TimedRequest, workdir_or_temp, write_results  # noqa: E402
from engine_speed import MODELS, REPO, make_prompt, parse_list, prepare_model  # noqa: E402

from minicpm4.config import MiniCPMConfig  # noqa: E402

DIRECT_MODES = ("worker", "main")
PATH_OF_MODE = {"worker": "direct", "main": "direct-main"}
WARMUP_PROMPT, WARMUP_NEW = 16, 4
# what `minicpm4 serve` passes to LLM by default (minicpm4/server/cli.py); the direct engine gets the same
SERVER_ENGINE_OPTIONS = {"kv_cache_tokens": 32768, "max_num_seqs": 64, "max_waiting": 1024, "max_model_len": None,
                         "enable_prefix_caching": True}


@dataclass
class Req(TimedRequest):  # arrival = when the client sent the request
    text: str = ""
    chunk_times: list[float] = field(default_factory=list)


def summarise(reqs: list[Req], submitted: float) -> dict:
    last = max(r.finished for r in reqs)
    window = last - min(r.first_token for r in reqs)
    gaps = [b - a for r in reqs for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    return {"total_tok_s": sum(r.tokens for r in reqs) / (last - submitted),
            "decode_tok_s": sum(r.tokens - 1 for r in reqs) / window if window > 0 else float("nan"),
            "wall_s": last - submitted,
            "gap_p50_s": percentile(gaps, 50), "gap_p99_s": percentile(gaps, 99),
            "requests": [{"tokens": r.tokens, "ttft_s": r.ttft, "per_token_s": r.per_token,
                          "chunks": len(r.chunk_times)} for r in reqs]}


# ---- the server ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def minicpm4_executable() -> str:
    here = Path(sys.executable).parent / "minicpm4"
    return str(here if here.is_file() else REPO / ".venv" / "bin" / "minicpm4")


class Server:
    """`minicpm4 serve` in a subprocess; its output goes to a log file (shown when it fails)."""

    def __init__(self, model_name: str, model_dir: Path, threads: int, dtype: str, log_dir: Path,
                 startup_timeout: float, log_level: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [minicpm4_executable(), "serve", "--port", str(self.port), "--threads", str(threads),
                    "--dtype", dtype, "--log-level", log_level]
        if model_name != "default":
            self.cmd[2:2] = ["--model", str(model_dir)]
        self.log_path = log_dir / f"serve-{model_name}-t{threads}-{self.port}.log"
        self.log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before /health answered:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"no healthy server after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.closed:
            self.log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def banner(self) -> str:
        """The server's 'serving NAME (DESCRIPTION) on URL' line."""
        self.log.flush()
        return next((line for line in self.log_path.read_text(errors="replace").splitlines()
                     if line.startswith("serving ")), "")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the server drains, then exits); SIGKILL if it does not exit within timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"server pid {self.proc.pid} did not exit {timeout:.0f} s after SIGTERM: killing it",
                      file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def _stream_one(client, url: str, body: dict) -> Req:
    submitted = time.perf_counter()
    text, times, tokens = [], [], None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                break
            now = time.perf_counter()
            obj = json.loads(payload)
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            if obj.get("choices"):
                times.append(now)
                text.append(obj["choices"][0].get("text") or "")
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    if not times or tokens is None:
        raise RuntimeError(f"a stream ended with {len(times)} chunks and usage {tokens}")
    return Req(tokens, submitted, times[0], times[-1], "".join(text), times)


async def _http_round(url: str, bodies: list[dict]) -> tuple[list[Req], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0), limits=limits) as client:
        t0 = time.perf_counter()
        reqs = await asyncio.gather(*(_stream_one(client, url + "/v1/completions", b) for b in bodies))
    return list(reqs), t0


def http_round(server: Server, prompts: list, max_tokens: int) -> tuple[list[Req], float]:
    bodies = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
    return asyncio.run(_http_round(server.url, bodies))


# ---- the engine without HTTP -----------------------------------------------------------------------------

class Direct:
    """The model loaded as `minicpm4 serve` loads it (same pipeline, same engine options), driven with LLM.generate.

    mode "worker": the server's threading. The LLM is built in the main thread at the process's default torch
    threads (as cmd_serve builds it before AsyncLLM exists), and every generate call runs in one worker thread that
    first calls torch.set_num_threads(N) (as AsyncLLM._run does). Note: FastDecoder's C++ kernel takes its thread
    count from torch.get_num_threads() when the LLM is built, so in the server (and here) `--threads` does not
    reach the decode kernel; `kernel_threads` in the JSON records what it got.
    mode "main": torch.set_num_threads(N) before the LLM is built, generate in the main thread: the engine set to
    N threads throughout (what engine_throughput.py's --threads does)."""

    def __init__(self, model_name: str, model_dir: Path, threads: int, dtype: str, mode: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from minicpm4.api import default_pipeline, from_pretrained
        from minicpm4.engine import LLM

        self.mode = mode
        self.main_threads_default = torch.get_num_threads()
        if mode == "main":
            torch.set_num_threads(threads)
        pipe = default_pipeline(dtype) if model_name == "default" else from_pretrained(model_dir, dtype=dtype)
        self.dtype = str(pipe.model.dtype).removeprefix("torch.")
        self.description = pipe.description
        self.llm = LLM(model=pipe.model, tokenizer=pipe.tokenizer, **SERVER_ENGINE_OPTIONS)
        fast = getattr(self.llm.engine.runner, "fast", None)
        kernel = getattr(fast, "kernel", None)
        self.kernel_threads = getattr(kernel, "threads", None)
        self.pool = None
        if mode == "worker":
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="direct-engine", initializer=torch.set_num_threads,
                                           initargs=(threads,))
        self.step_threads = self._call(torch.get_num_threads)

    def _call(self, fn, *a):
        return fn(*a) if self.pool is None else self.pool.submit(fn, *a).result()

    def round(self, prompts: list, max_tokens: int) -> tuple[list[Req], float]:
        from minicpm4.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0, ignore_eos=True)

        def go():
            t0 = time.perf_counter()
            return self.llm.generate(list(prompts), params), t0

        outs, t0 = self._call(go)
        return [Req(len(o.token_ids), t0, o.metrics.first_token_time, o.metrics.finished_time, o.text)
                for o in outs], t0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def direct_child(args) -> None:
    """--direct-child MODE: one direct measurement in this (fresh) process; results to --out as JSON."""
    model_name, threads = args.models[0], args.threads[0]
    model_dir = prepare_model(model_name, Path(args.workdir))
    config = MiniCPMConfig.from_json(model_dir / "config.json")
    tokenizer = _tokenizer(model_name, model_dir) if args.prompt_format == "text" else None
    path = PATH_OF_MODE[args.direct_child]
    d = Direct(model_name, model_dir, threads, args.dtype, args.direct_child)
    d.round(warmup_prompts(config, tokenizer, args), WARMUP_NEW)
    runs: dict = {}
    texts = run_path(path, d.round, model_name, threads, lambda n, rep: workload(config, tokenizer, args, n, rep),
                     args, runs)
    d.close()
    write_results(args.out, {"dtype_resolved": d.dtype, "description": d.description, "kernel_threads": d.kernel_threads,
                             "main_threads_default": d.main_threads_default, "step_threads": d.step_threads,
                             "runs": [[n, s] for (_, _, n), rs in runs.items() for s in rs],
                             "texts": [[n, rep, t] for (n, rep), t in texts.items()]})


def run_direct(model_name: str, threads: int, mode: str, args, workdir: Path) -> dict:
    """One direct measurement in a fresh child process, as each server gets a fresh process."""
    out = workdir / f"direct-{model_name}-{mode}-t{threads}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--direct-child", mode, "--models", model_name,
           "--threads", str(threads), "--concurrency", ",".join(map(str, args.concurrency)),
           "--max-tokens", str(args.max_tokens), "--prompt-len", str(args.prompt_len),
           "--prompt-format", args.prompt_format, "--dtype", args.dtype, "--repeats", str(args.repeats),
           "--workdir", str(workdir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"the direct child ({mode}, threads {threads}) exited with {proc.returncode}")
    return json.loads(out.read_text())


# ---- the benchmark ------------------------------------------------------------------------------------

def workload(config: MiniCPMConfig, tokenizer, args, n: int, rep: int) -> list:
    """A different prompt per request, per repeat and per C: nothing for a prefix cache to reuse."""
    ids = [make_prompt(config, args.prompt_len, seed=1 + i + 1000 * n + 1_000_000 * rep) for i in range(n)]
    if args.prompt_format == "text":
        return [tokenizer.decode(p, skip_special_tokens=True) for p in ids]
    return ids


def warmup_prompts(config: MiniCPMConfig, tokenizer, args) -> list:
    ids = [make_prompt(config, WARMUP_PROMPT, seed=10_000 + i) for i in range(max(args.concurrency))]
    return [tokenizer.decode(p, skip_special_tokens=True) for p in ids] if args.prompt_format == "text" else ids


def run_path(path: str, runner, model_name: str, threads: int, prompts_for, args, runs: dict) -> dict:
    """Every (C, repeat) round of one path; returns each round's texts, keyed by (C, repeat)."""
    texts = {}
    for n in args.concurrency:
        for rep in range(args.repeats):
            reqs, t0 = runner(prompts_for(n, rep), args.max_tokens)
            bad = [r.tokens for r in reqs if r.tokens != args.max_tokens]
            if bad:
                print(f"warning: {path} C={n}: requests produced {bad} tokens, not {args.max_tokens}", file=sys.stderr)
            s = summarise(reqs, t0)
            texts[(n, rep)] = [r.text for r in reqs]
            runs.setdefault((path, threads, n), []).append(s)
            print(f"[{model_name}] threads={threads} C={n:2d} repeat {rep} {path:11s} total {s['total_tok_s']:8.1f} "
                  f"tok/s  TTFT p50 {percentile([q.ttft for q in reqs], 50):7.3f} s  per-token p50 "
                  f"{1e3 * percentile([q.per_token for q in reqs], 50):7.2f} ms", flush=True)
    return texts


def bench_model(model_name: str, args, workdir: Path) -> dict:
    model_dir = prepare_model(model_name, workdir)
    config = MiniCPMConfig.from_json(model_dir / "config.json")
    tokenizer = _tokenizer(model_name, model_dir) if args.prompt_format == "text" else None
    prompts_for = lambda n, rep: workload(config, tokenizer, args, n, rep)  # noqa: E731
    paths = ["http"] + [PATH_OF_MODE[m] for m in args.direct_modes]
    runs: dict[tuple[str, int, int], list[dict]] = {}
    servers, directs, errors, resolved_dtype, description = {}, {}, {}, None, None
    for threads in args.threads:
        http_texts = {}
        # http: the server subprocess, stopped (SIGTERM) before the direct runs
        try:
            server = Server(model_name, model_dir, threads, args.dtype, workdir, args.startup_timeout,
                            args.server_log_level)
        except Exception as exc:
            errors[f"http threads={threads}"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            server = None
        if server is not None:
            info = {"command": server.cmd, "startup_s": server.startup_s, "banner": server.banner()}
            try:
                http_round(server, warmup_prompts(config, tokenizer, args), WARMUP_NEW)
                http_texts = run_path("http", lambda p, m: http_round(server, p, m), model_name, threads, prompts_for,
                                      args, runs)
            except Exception as exc:
                errors[f"http threads={threads}"] = f"{type(exc).__name__}: {exc}\n{server.log_tail()}"
                traceback.print_exc()
            finally:
                info["exit_code"] = server.stop()  # -15: uvicorn re-raises SIGTERM after a clean shutdown
                info["clean_shutdown"] = "Application shutdown complete" in server.log_tail(10)
            servers[threads] = info
        # direct: the engine without HTTP, each mode in a fresh process, after the server has exited
        for mode in args.direct_modes:
            path = PATH_OF_MODE[mode]
            try:
                child = run_direct(model_name, threads, mode, args, workdir)
            except Exception as exc:
                errors[f"{path} threads={threads}"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                continue
            resolved_dtype, description = child["dtype_resolved"], child["description"]
            directs[f"{path} threads={threads}"] = {k: child[k] for k in ("kernel_threads", "main_threads_default",
                                                                          "step_threads")}
            for n, s in child["runs"]:
                runs.setdefault((path, threads, n), []).append(s)
            texts = {(n, rep): t for n, rep, t in child["texts"]}
            if mode == args.direct_modes[0]:  # greedy: the streamed text should equal the direct text
                for n in args.concurrency:
                    for rep, s in enumerate(runs.get(("http", threads, n), [])):
                        if (n, rep) in texts and (n, rep) in http_texts:
                            s["text_matches_direct"] = sum(a == b for a, b in zip(http_texts[(n, rep)], texts[(n, rep)]))
        gc.collect()

    rows = []
    for threads in args.threads:
        for n in args.concurrency:
            for path in paths:
                rs = runs.get((path, threads, n), [])
                reqs = [q for r in rs for q in r["requests"]]
                row = {"model": model_name, "dtype": args.dtype, "dtype_resolved": resolved_dtype, "threads": threads,
                       "concurrency": n, "path": path, "repeats": len(rs),
                       "total_tok_s": median(r["total_tok_s"] for r in rs),
                       "decode_tok_s": median(r["decode_tok_s"] for r in rs),
                       "ttft_p50_s": percentile([q["ttft_s"] for q in reqs], 50),
                       "ttft_p99_s": percentile([q["ttft_s"] for q in reqs], 99),
                       "per_token_p50_s": percentile([q["per_token_s"] for q in reqs], 50),
                       "per_token_p99_s": percentile([q["per_token_s"] for q in reqs], 99),
                       "runs": rs}
                if path == "http":
                    row["gap_p50_s"] = median(r["gap_p50_s"] for r in rs)
                    row["gap_p99_s"] = median(r["gap_p99_s"] for r in rs)
                    matched = [r["text_matches_direct"] for r in rs if "text_matches_direct" in r]
                    row["text_matches_direct"] = f"{sum(matched)}/{n * len(matched)}" if matched else None
                rows.append(row)

    def find(path, threads, n):
        return next(r for r in rows if (r["path"], r["threads"], r["concurrency"]) == (path, threads, n))

    for row in rows:
        http = find("http", row["threads"], row["concurrency"])["total_tok_s"]
        row["http_vs_this"] = _ratio(http, row["total_tok_s"]) if row["path"] != "http" else float("nan")
        row["vs_first_threads"] = _ratio(row["total_tok_s"],
                                         find(row["path"], args.threads[0], row["concurrency"])["total_tok_s"])
    return {"model": model_name, "dtype": args.dtype, "dtype_resolved": resolved_dtype, "description": description,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "prompt_format": args.prompt_format,
            "servers": servers, "directs": directs, "rows": rows, "errors": errors}


def _ratio(a, b) -> float:
    return a / b if _number(a) and _number(b) and b > 0 else float("nan")


def _tokenizer(model_name: str, model_dir: Path):
    from minicpm4.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model_dir)  # prepare_model("default") is the bundled model's folder


def _number(v) -> bool:
    return v is not None and v == v


def table(cases: list[dict]) -> str:
    lines = ["| model | dtype | --threads | C | path | total tok/s | HTTP / this | vs first --threads | TTFT p50 / p99 s | "
             "per-token p50 / p99 ms | chunk gap p50 / p99 ms | same text as direct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first = None
    for case in cases:
        first = case["rows"][0]["threads"] if case["rows"] else None
        for r in case["rows"]:
            ms = lambda k: fmt(1e3 * r[k], 2) if _number(r.get(k)) else "n/a"  # noqa: E731
            gap = f"{ms('gap_p50_s')} / {ms('gap_p99_s')}" if r["path"] == "http" else ""
            lines.append(
                f"| {r['model']} | {r['dtype_resolved'] or r['dtype']} | {r['threads']} | {r['concurrency']} | "
                f"{r['path']} | {fmt(r['total_tok_s'])} | "
                f"{fmt(r['http_vs_this'], 2) + 'x' if r['path'] != 'http' else ''} | "
                f"{fmt(r['vs_first_threads'], 2) + 'x' if r['threads'] != first else ''} | "
                f"{fmt(r['ttft_p50_s'], 3)} / {fmt(r['ttft_p99_s'], 3)} | {ms('per_token_p50_s')} / {ms('per_token_p99_s')} | "
                f"{gap} | {r.get('text_matches_direct') or ''} |")
    return "\n".join(lines)


def plot(cases: list[dict], path: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import ScalarFormatter
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for i, threads in enumerate(dict.fromkeys(r["threads"] for r in case["rows"])):
            rows = [r for r in case["rows"] if r["threads"] == threads]
            ns = list(dict.fromkeys(r["concurrency"] for r in rows))
            for path_name, style in (("http", "-"), ("direct", "--"), ("direct-main", ":")):
                ys = [r["total_tok_s"] for r in rows if r["path"] == path_name]
                if ys:
                    ax.plot(ns, [y if _number(y) else float("nan") for y in ys], linestyle=style, marker="o",
                            color=f"C{i}", label=f"{path_name}, --threads {threads}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["concurrency"] for r in case["rows"]}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel("total generated tokens/s")
        ax.set_title(f"{case['model']} ({case['dtype_resolved'] or case['dtype']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def int_list(value: str) -> list[int]:
    items = [int(x) for x in value.split(",") if x.strip()]
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a comma list of positive integers")
    return items


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,0.5b", type=lambda v: parse_list(v, MODELS, "model"))
    p.add_argument("--threads", default="1,2", type=int_list, help="`minicpm4 serve --threads` values (and direct)")
    p.add_argument("--concurrency", default="1,16", type=int_list, help="concurrent streaming clients")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request (EOS ignored)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                   help="ids: token-id prompts (identical work on both paths); text: the server tokenizes")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--direct-modes", default="worker,main", type=lambda v: parse_list(v, DIRECT_MODES, "direct mode"),
                   help="worker: `direct`, the server's threading; main: `direct-main`, N threads set before the "
                   "LLM is built (see Direct); the first is the one HTTP text is compared with")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for GET /health")
    p.add_argument("--server-log-level", default="info", help="`minicpm4 serve --log-level` (info: its default)")
    p.add_argument("--workdir", default=None, help="random 0.5B checkpoint and server logs (default: temp, removed)")
    p.add_argument("--out", default=str(RESULTS_DIR / "server_throughput.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--direct-child", choices=DIRECT_MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.direct_child:
        return direct_child(args)

    with workdir_or_temp(args.workdir, "server-throughput-") as workdir:
        cases = []
        for model_name in args.models:
            cases.append(bench_model(model_name, args, workdir))
            print(table(cases[-1:]), flush=True)

    machine = machine_info()
    machine["threads"] = args.threads  # the --threads values compared (server and direct)
    machine["load_average"] = os.getloadavg()
    result = {"benchmark": "server_throughput", "command": command_line(argv), "machine": machine,
              "args": vars(args), "cases": cases, "table": table(cases)}
    title = (f"{args.prompt_len}-token prompts, {args.max_tokens} tokens each, greedy, streaming /v1/completions\n"
             f"{machine['cpu_count']} cores, {machine['cpu']}, load average {machine['load_average'][0]:.1f}")
    publish(result, args.out, lambda png: plot(cases, png, title), args.plot)
    return result


if __name__ == "__main__":
    main()
