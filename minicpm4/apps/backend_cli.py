"""Command-line options shared by the apps: which model answers (a local folder or an OpenAI-compatible
endpoint) and how it samples, turned into a ChatBackend (chat_backend.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minicpm4.errors import UserError


def add_backend_options(p: argparse.ArgumentParser, temperature: float = 0.0, top_p: float = 1.0,
                        max_tokens: int = 256) -> None:
    from minicpm4.cli import add_model_options

    add_model_options(p)
    g = p.add_argument_group("remote model (instead of --model)")
    g.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--remote-model", default=None, help="model name to request (default: the endpoint's first)")
    g.add_argument("--api-key", default=None)
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=temperature)
    s.add_argument("--top-p", type=float, default=top_p)
    s.add_argument("--max-tokens", type=int, default=max_tokens, help="per model turn")
    s.add_argument("--seed", type=int, default=None)


def make_backend(args: argparse.Namespace, default_model: Path | None = None, default_note: str = ""):
    """The backend the options name. default_model: used when neither --model nor --base-url is given and it
    exists (else the bundled default model); default_note says so on stderr."""
    from minicpm4.apps.chat_backend import EndpointBackend, LocalBackend

    if args.base_url:
        if args.model:
            raise UserError("give --model or --base-url, not both")
        return EndpointBackend(args.base_url, args.remote_model, args.api_key)
    from minicpm4.cli import load_pipeline

    if args.model is None and default_model is not None and (default_model / "config.json").is_file():
        print(f"note: no --model given: using {default_model}{default_note}", file=sys.stderr)
        args.model = str(default_model)
    return LocalBackend(load_pipeline(args))


def sampling_from_args(args: argparse.Namespace):
    from minicpm4.apps.chat_backend import Sampling

    if args.max_tokens < 1:
        raise UserError("--max-tokens: must be >= 1")
    if args.temperature < 0:
        raise UserError("--temperature: must be >= 0")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p: must be in (0, 1]")
    return Sampling(args.max_tokens, args.temperature, args.top_p, args.seed)
