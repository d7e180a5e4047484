"""Synthesis throughput per track (`minicpm4 data synth`) against a live OpenAI-compatible server: records/s,
requests/s and rejection rates, at concurrency 1 (the baseline) and at --concurrency N, with the ratio.

Without --base-url the bundled default model is served in this process (uvicorn in a background thread around
the engine, as `minicpm4 serve` runs it; real HTTP on 127.0.0.1) and the synthesis talks to it through
EndpointBackend, so the number includes HTTP and JSON. Each (track, concurrency) runs into a fresh output file
for --seeds seed items with --max-tokens per model turn; the near-duplicate filter, review queue and stats file
are on, as in a real run. The bundled ~3M model fails most verifiers, so rejection rates say more about the
model than about the pipeline; the per-reason counts show where each track stops.

    .venv/bin/python benchmarks/synth_throughput.py --seeds 4
    .venv/bin/python benchmarks/synth_throughput.py --base-url http://127.0.0.1:8000/v1 --seeds 50 --max-tokens 512

Writes benchmarks/results/synth_throughput.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, machine_info, write_results  # noqa: E402


class CountingBackend:
    """Counts the requests a backend answers (the runner groups them into complete_batch calls)."""

    def __init__(self, inner) -> None:
        self.inner, self.requests = inner, 0
        self.base_url = getattr(inner, "base_url", None)
        self._lock = threading.Lock()

    def complete(self, messages, tools=None, sampling=None, prefix=""):
        with self._lock:
            self.requests += 1
        return self.inner.complete(messages, tools, sampling, prefix)

    def complete_batch(self, conversations, tools=None, sampling=None, prefix=""):
        with self._lock:
            self.requests += len(conversations)
        return self.inner.complete_batch(conversations, tools, sampling, prefix)


def serve_default_model(dtype: str):
    """(base_url, stop) for the bundled default model served in this process."""
    import uvicorn

    from minicpm4.api import default_pipeline
    from minicpm4.engine import LLM, AsyncLLM
    from minicpm4.server import create_app

    pipe = default_pipeline(dtype=dtype)
    app = create_app(AsyncLLM(LLM(model=pipe.model, tokenizer=pipe.tokenizer, kv_cache_tokens=32768), threads=1),
                     "minicpm4-default", shutdown_engine=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)

    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", str(pipe.model.model.embed_tokens.weight.dtype), stop


def run_one(track_name: str, base_url: str, concurrency: int, args, workdir: Path) -> dict:
    from minicpm4.apps.chat_backend import EndpointBackend, Sampling
    from minicpm4.data.synth.cli import TrackOptions, build_tracks, parse_length_range
    from minicpm4.data.synth.runner import RunConfig, run_synthesis
    from minicpm4.data.synth.track import TrackContext

    ctx = TrackContext(data_seed=args.data_seed, samples=args.samples)
    [track] = build_tracks([track_name], ctx, TrackOptions(code=not args.no_code,
                                                           length_range=parse_length_range(args.length_range)))
    backend = CountingBackend(EndpointBackend(base_url, concurrency=concurrency))
    out = workdir / f"{track_name}-c{concurrency}.jsonl"
    t0 = time.perf_counter()
    stats = run_synthesis([track], backend, Sampling(args.max_tokens, args.temperature, 0.95, 0),
                          RunConfig(out=out, limit=args.seeds, concurrency=concurrency, show_progress=False))
    seconds = time.perf_counter() - t0
    s = stats["tracks"][track_name]
    return {"track": track_name, "concurrency": concurrency, "seeds": args.seeds, "records": s["generated"],
            "kept": s["kept"], "rejected": s["rejected"], "seconds": round(seconds, 3),
            "records_per_s": round(s["generated"] / seconds, 3), "requests": backend.requests,
            "requests_per_s": round(backend.requests / seconds, 3),
            "rejection_rate": round(s["rejected"] / max(1, s["generated"]), 3),
            "rejected_by_reason": s["rejected_by_reason"], "info": s["info"]}


def main(argv: list[str] | None = None) -> None:
    from minicpm4.data.synth.records import TRACKS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracks", default=",".join(TRACKS))
    ap.add_argument("--seeds", type=int, default=4, help="seed items per track (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=8, help="compared with concurrency 1 (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--samples", type=int, default=4, help="instruction track samples (default: %(default)s)")
    ap.add_argument("--length-range", default="256,1024", help="longctx (default: %(default)s, chars/4)")
    ap.add_argument("--no-code", action="store_true")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--base-url", default=None, help="a running server (default: serve the bundled model here)")
    ap.add_argument("--dtype", default="float32", help="bundled model dtype when served here (default: %(default)s)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "synth_throughput.json"))
    args = ap.parse_args(argv)

    stop, dtype = None, None
    base_url = args.base_url
    if base_url is None:
        base_url, dtype, stop = serve_default_model(args.dtype)
    rows = []
    try:
        from minicpm4.apps.chat_backend import EndpointBackend, Sampling

        EndpointBackend(base_url).complete([{"role": "user", "content": "warm up"}], sampling=Sampling(8))
        with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
            for name in [t.strip() for t in args.tracks.split(",") if t.strip()]:
                for c in dict.fromkeys((1, args.concurrency)):
                    rows.append(run_one(name, base_url, c, args, Path(tmp)))
                    r = rows[-1]
                    print(f"{name} c={c}: {r['records']} records in {r['seconds']} s, {r['records_per_s']} rec/s, "
                          f"rejected {r['rejection_rate']:.0%}", file=sys.stderr)
    finally:
        if stop is not None:
            stop()

    lines = ["| track | records | rec/s c=1 | rec/s c=N | ratio | req/s c=N | rejected | top reasons |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in dict.fromkeys(r["track"] for r in rows):
        base = next(r for r in rows if r["track"] == name and r["concurrency"] == 1)
        best = next(r for r in rows if r["track"] == name and r["concurrency"] == args.concurrency)
        ratio = best["records_per_s"] / base["records_per_s"] if base["records_per_s"] else None
        summary[name] = {"records_per_s": best["records_per_s"], "records_per_s_c1": base["records_per_s"],
                         "speedup_vs_c1": round(ratio, 2) if ratio else None, "rejection_rate": best["rejection_rate"],
                         "rejected_by_reason": best["rejected_by_reason"]}
        reasons = ", ".join(f"{k} {v}" for k, v in list(best["rejected_by_reason"].items())[:3])
        lines.append(f"| {name} | {best['records']} | {base['records_per_s']:.2f} | {best['records_per_s']:.2f} | "
                     f"{ratio or float('nan'):.2f}x | {best['requests_per_s']:.2f} | {best['rejection_rate']:.0%} | "
                     f"{reasons} |")
    table = "\n".join(lines)
    result = {"benchmark": "synth_throughput", "command": command_line(argv), "machine": machine_info(),
              "server": args.base_url or "bundled default model, served in this process", "dtype": dtype,
              "seeds_per_track": args.seeds, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "summary": summary, "runs": rows, "table": table}
    print()
    print(table)
    print(f"wrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
