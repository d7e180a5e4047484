"""The `minicpm4` command. Each subcommand is a thin wrapper over a typed function of the package;
errors a user can fix are printed as one line (exit status 2), never as a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Sequence

from minicpm4.config import PRESETS, read_config
from minicpm4.errors import UserError, run_command

# Subcommands that live beside their feature: each module defines `register(subparsers)` and raises
# UserError / ValueError for problems a user can fix. Heavy imports stay inside the handlers.
COMMAND_MODULES = (
    "minicpm4.data.cli",  # data build-corpus | shards | build-sft, tokenizer train
    "minicpm4.train.cli",  # train pretrain | long | sft | export
    "minicpm4.train.tunnel_cli",  # tunnel (ModelTunnel muP LR search)
    "minicpm4.server.cli",  # serve (OpenAI-compatible server + chat page)
    "minicpm4.quant.cli",  # quantize (INT4 RTN / GPTQ / P-GPTQ / S-P-GPTQ, ternary)
    "minicpm4.apps.mcp_cli",  # mcp (MCP host: tool use over stdio servers) | mcp eval | mcp synth
    "minicpm4.apps.survey.cli",  # survey (plan-retrieve-write) | survey eval | survey build-kb
)


# ---- shared options --------------------------------------------------------------------------

def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", metavar="DIR", help="Hugging Face MiniCPM4 folder (config.json, "
                   "safetensors, tokenizer). Default: the bundled demo model")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weight dtype; auto = bfloat16 on CUDA and AVX-512 CPUs, float32 elsewhere (faster there)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--engine", choices=["engine", "reference"], default="engine",
                   help="engine: the inference engine (paged KV, batching, fast forward); reference: the readable "
                   "reference path (minicpm4/generate.py) the engine is tested against")
    add_runtime_options(p)
    add_speculative_options(p)


def add_speculative_options(p: argparse.ArgumentParser) -> None:
    from minicpm4.speculative.tree import DEFAULT_NUM_ITER, DEFAULT_TOPK_PER_ITER, DEFAULT_TREE_SIZE

    g = p.add_argument_group("speculative decoding (engine only; lossless: greedy output is unchanged)")
    g.add_argument("--draft", metavar="DIR", default=None,
                   help="EAGLE-2 draft folder (MiniCPM4 Eagle format), or with --draft-mode chain a small MiniCPM "
                   "model folder; 'default' = the draft shipped with the bundled default model")
    g.add_argument("--draft-mode", choices=["eagle", "chain"], default="eagle")
    g.add_argument("--frspec", metavar="PATH", default=None,
                   help="FR-Spec index: a freq_{N}.pt file, a folder of them, or frspec.json (minicpm4 frspec-index)")
    g.add_argument("--frspec-size", type=int, default=None, metavar="N", help="which freq_{N}.pt of a folder")
    g.add_argument("--tree-size", type=int, default=DEFAULT_TREE_SIZE, help="nodes verified per step, root included")
    g.add_argument("--spec-num-iter", type=int, default=DEFAULT_NUM_ITER, help="draft forwards per tree (its depth)")
    g.add_argument("--spec-topk", type=int, default=DEFAULT_TOPK_PER_ITER, help="children per expanded node")
    g.add_argument("--spec-window", type=int, default=1024, help="the EAGLE draft's sliding attention window")


def speculative_options(args: argparse.Namespace) -> dict:
    """{"speculative": SpeculativeConfig} when --draft is given, else {}."""
    draft = getattr(args, "draft", None)
    if draft is None:
        for flag in ("frspec", "frspec_size"):
            if getattr(args, flag, None) is not None:
                raise UserError(f"--{flag.replace('_', '-')} needs --draft")
        return {}
    if getattr(args, "engine", "engine") != "engine":
        raise UserError("--draft: speculative decoding runs in the engine; drop --engine reference")
    from minicpm4.speculative.config import SpeculativeConfig
    from minicpm4.speculative.tree import TreeShape

    if draft == "default":
        from minicpm4.api import DEFAULT_DRAFT_DIR

        if not (DEFAULT_DRAFT_DIR / "config.json").is_file():
            raise UserError("--draft default: no draft ships with the bundled default model")
        draft = str(DEFAULT_DRAFT_DIR)
    elif not Path(draft).is_dir():
        raise UserError(f"--draft {draft}: not a folder")
    try:
        shape = TreeShape(args.spec_num_iter, args.spec_topk, args.tree_size)
        return {"speculative": SpeculativeConfig(draft, args.draft_mode, shape, args.frspec, args.frspec_size,
                                                 args.spec_window)}
    except ValueError as e:
        raise UserError(f"speculative decoding: {e}") from e


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention and context (no weights change; any checkpoint)")
    g.add_argument("--sparse", choices=["on", "off", "auto"], default="auto",
                   help="InfLLM v2 sparse attention; auto = whatever config.json says (on when it has sparse_config), "
                   "on without sparse_config = the README defaults")
    g.add_argument("--sparse-variant", metavar="NAME", default=None,
                   help="InfLLM v2 semantics preset (block budget / local window rules), implies --sparse on")
    g.add_argument("--context", choices=["128k"], default=None,
                   help="128k: the report's YaRN-extended LongRoPE factors (max 131072 tokens) instead of editing rope_scaling")


def runtime_options(args: argparse.Namespace) -> dict:
    sparse = {"on": True, "off": False, "auto": None}[args.sparse]
    if args.sparse_variant is not None:
        if sparse is False:
            raise UserError("--sparse-variant needs sparse attention; drop --sparse off")
        sparse = True
    return {"sparse": sparse, "sparse_variant": args.sparse_variant, "context_extension": args.context,
            "engine": getattr(args, "engine", "engine"), **speculative_options(args)}


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json, else greedy)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=128)
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")


def sampling_overrides(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed, "stop": args.stop}


def load_pipeline(args: argparse.Namespace):
    from minicpm4.api import default_pipeline, from_pretrained, has_default_model

    if args.model is None:
        if has_default_model():
            print("note: no --model given: using the bundled default model, a ~3M-parameter MiniCPM4 trained on "
                  "this machine's CPU (see minicpm4/assets/default-model/README.md for what it can and cannot do)",
                  file=sys.stderr)
        else:
            print("note: no --model given and no trained default model ships yet: using a tiny RANDOMLY "
                  "INITIALISED MiniCPM4 with the real MiniCPM4 tokenizer. It exercises every code path but "
                  "writes gibberish.", file=sys.stderr)
        return default_pipeline(args.dtype, **runtime_options(args))
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UserError(f"--model {args.model}: not a folder")
    return from_pretrained(model_dir, dtype=args.dtype, device=args.device, **runtime_options(args))


# ---- subcommands -----------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise UserError("empty prompt: pass PROMPT or pipe text on stdin")
    target = [{"role": "user", "content": prompt}] if args.chat else prompt
    params = pipe.sampling_params(**sampling_overrides(args))
    start = time.perf_counter()
    n_tokens = 0
    prompt_tokens = len(pipe.encode_prompt(target))
    token_ids: list[list[int]] = [[]]
    for _, text, _ in pipe.stream_batch([target], params, token_ids):
        print(text, end="", flush=True)
    n_tokens = len(token_ids[0])
    seconds = time.perf_counter() - start
    print()
    spec = ""
    if pipe.engine == "engine" and pipe.engine_options.get("speculative") is not None:
        st = pipe.llm.engine.stats
        spec = f", {st.spec_tokens_total / max(st.spec_verify_total, 1):.2f} tokens per verification"
    print(f"[{prompt_tokens} prompt tokens, {n_tokens} generated in {seconds:.2f} s: "
          f"{n_tokens / max(seconds, 1e-9):.1f} tokens/s{spec}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace, stdin=None) -> None:
    stdin = stdin or sys.stdin
    pipe = load_pipeline(args)
    params = pipe.sampling_params(**sampling_overrides(args))
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    print("chat: /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = "".join(piece for piece in _print_stream(pipe.stream(history, params)))
        print()
        history.append({"role": "assistant", "content": reply})


def _print_stream(pieces):
    for piece in pieces:
        print(piece, end="", flush=True)
        yield piece


def cmd_info(args: argparse.Namespace) -> None:
    from minicpm4.model_info import summarize

    from minicpm4.quant.format import with_quantize_config

    cfg = read_config(args.target)
    if Path(args.target).is_dir():  # an AutoGPTQ release keeps its quantization in quantize_config.json
        cfg = with_quantize_config(cfg, Path(args.target))
    print("\n".join(summarize(cfg).lines()))


def cmd_convert(args: argparse.Namespace) -> None:
    from minicpm4.export.gguf import export_model_dir

    src = Path(args.model_dir)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (expected a Hugging Face MiniCPM4 folder)")
    out = Path(args.out) if args.out else src / f"model-{args.outtype}.gguf"
    path = export_model_dir(src, out, args.outtype)
    print(f"wrote {path} ({path.stat().st_size / 1024**2:.1f} MiB)")


def cmd_demo(args: argparse.Namespace) -> None:
    print("minicpm4 demo: the bundled default model answers one chat turn (ChatML, sampling, streaming).",
          file=sys.stderr)
    args.model, args.chat = None, True
    args.seed = 0 if args.seed is None else args.seed  # the demo prints the same text every run
    args.prompt = args.prompt or "What does the word \"lantern\" mean?"
    cmd_generate(args)


# ---- parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpm4", description="MiniCPM4 in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("generate", help="complete a prompt and print tokens/s")
    p.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn in ChatML")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps history and streams replies")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="config summary, parameter count, memory per dtype")
    p.add_argument("target", metavar="MODEL_DIR", help=f"model folder, config.json, or a preset ({', '.join(PRESETS)})")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="export a model folder to another format")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--to", required=True, choices=["gguf"], help="target format")
    p.add_argument("--outtype", choices=["f32", "bf16", "q8_0", "q4_0", "tq1_0", "tq2_0"], default="bf16",
                   help="f32 / bf16, or a llama.cpp quantized type: q8_0, q4_0, tq1_0 / tq2_0 (ternary; exact for "
                   "ternary weights with one scale per 256 inputs); norms stay F32, the embedding Q8_0")
    p.add_argument("--out", "-o", default=None, help="output file (default: MODEL_DIR/model-OUTTYPE.gguf)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="run the main job on the bundled default model")
    p.add_argument("prompt", nargs="?", default=None, help="the user turn (default: a definition question)")
    add_sampling_options(p)
    p.set_defaults(func=cmd_demo, dtype="auto", device="cpu", sparse="auto", sparse_variant=None, context=None)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not name.startswith(e.name or "\0"):  # a missing dependency inside the module: let it show
                raise
            continue  # that feature is not written yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "raw_argv", False):
        # A command that parses its own arguments (set_defaults(raw_argv=True)) gets all of them, in order.
        args.argv = argv[argv.index(args.command) + 1:]
    elif extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    return run_command(args.func, args, f"minicpm4 {args.command}")


if __name__ == "__main__":
    sys.exit(main())
