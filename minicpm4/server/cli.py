"""`minicpm4 serve`: the OpenAI-compatible server on one model, with the chat page at /.

    minicpm4 serve --model path/to/MiniCPM4-0.5B --port 8000
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Requests that omit temperature / top_p get the model's generation_config.json values (greedy if it
has none). SIGTERM or Ctrl-C stops accepting, lets running replies finish, then stops the engine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cores_for_the_model() -> int:
    # Every core: measured on a quiet 2-core machine (benchmarks/server_throughput.py, 0.5B shape, bf16),
    # 2 engine threads beat 1 by 1.76x at one client and 1.29x at 16, although the event loop
    # (tokenizing, detokenizing, SSE) shares those cores; the kernel's thread pool takes work back from a
    # thread the HTTP side has descheduled, so sharing costs little.
    return max(1, os.cpu_count() or 1)


def register(sub: argparse._SubParsersAction) -> None:
    from minicpm4.cli import add_model_options  # minicpm4.cli is loaded: it is the one calling register

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat + completions, streaming) and a chat page",
                       description=__doc__.split("\n\n")[0])
    add_model_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("MINICPM4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MINICPM4_API_KEY; none = open)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id in /v1/models and responses (default: the folder name, or minicpm4-default)")
    g.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413")
    g.add_argument("--default-max-tokens", type=int, default=1024,
                   help="completion budget of a chat request that sets no max_tokens (completions: 16, as OpenAI)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    e = p.add_argument_group("engine")
    e.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests at most; more get 429 (retry later) instead of waiting unboundedly")
    e.add_argument("--kv-cache-tokens", type=int, default=32768, help="KV cache size in tokens (all requests)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="requests batched together at most")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens at most (default: the model's, capped by the KV cache)")
    e.add_argument("--no-prefix-caching", action="store_true",
                   help="recompute every prompt (no KV page reuse); needed today for echo + logprobs on prompts "
                   "that share a prefix longer than a KV page (lm-eval loglikelihood tasks): the engine skips "
                   "prompt logprobs on prefix-cache hits")
    e.add_argument("--threads", type=int, default=_cores_for_the_model(),
                   help="torch threads of the engine (default: every core; see benchmarks/server_throughput.py)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from minicpm4.cli import load_pipeline
    from minicpm4.errors import UserError

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if not _importable(m)]
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}: pip install 'minicpm4[serve]'")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: not a port number")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: needs at least 1")
    if getattr(args, "engine", "engine") != "engine":
        raise UserError("--engine reference: the server always runs the engine (batching needs it)")
    import uvicorn

    from minicpm4.engine import LLM, AsyncLLM
    from minicpm4.server.app import create_app

    import torch

    # Before the engine is built: its fast decode kernel sizes its thread pool from torch's setting then.
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args)
    llm = LLM(model=pipe.model, tokenizer=pipe.tokenizer, kv_cache_tokens=args.kv_cache_tokens,
              max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting, max_model_len=args.max_model_len,
              enable_prefix_caching=not args.no_prefix_caching,
              speculative=pipe.engine_options.get("speculative"))
    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "minicpm4-default")
    app = create_app(AsyncLLM(llm, threads=args.threads), name, api_key=args.api_key or None,
                     max_request_bytes=args.max_request_bytes, defaults=pipe.defaults,
                     default_chat_max_tokens=args.default_max_tokens)
    print(f"serving {name} ({pipe.description}) on http://{args.host}:{args.port}  "
          f"[chat page: /, API: /v1, metrics: /metrics{', API key required' if args.api_key else ''}]",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
