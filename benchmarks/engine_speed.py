"""Single-stream prefill and decode speed: reference generation vs the engine vs llama.cpp, same weights.

Models: `default` (the bundled default model, minicpm4/assets/default-model) and `0.5b` (a random
MiniCPM4-0.5B-shaped checkpoint: minicpm4/assets/minicpm4-0.5b/config.json, 24 layers, tied 73448-token
head, built with build_model(seed=0) and saved with save_model plus the real tokenizer files into
--workdir). Each model runs in fp32 and bf16; every system gets the same weights in the same dtype:

  reference  minicpm4.generate.generate_tokens (static KV cache, greedy). Prefill time = call -> first
             token out (prefill + first argmax); decode time = first token -> last token.
  engine     minicpm4.engine.LLM(model_dir, dtype=...).generate([ids], SamplingParams(...)); times from
             RequestOutput.metrics (arrival -> first token -> finished).
  llamacpp   llama-cpp-python's low-level API on our GGUF export (F32 file for fp32, BF16 file for bf16;
             KV cache F32 / BF16 to match), n_threads = --threads, the prompt in one llama_decode call,
             then one llama_decode per token with numpy argmax on the logits. Tok/s from llama.cpp's own
             counters (llama_perf_context: t_p_eval_ms over n_p_eval prompt tokens, t_eval_ms over
             n_eval single-token decodes), which exclude Python overhead; wall-clock numbers are in
             the JSON as well (`*_wall`). Flash attention is off by default (--llamacpp-flash-attn):
             llama.cpp's own default (auto, i.e. on for CPU) rounds inside attention to F16, which on the
             0.5B shape moved fp32 logits by ~1% of the largest logit (3e-5 with it off) and changed
             greedy tokens from the first one on.
  bandwidth  the decode speed if each token only had to read the weights once: bytes of every linear
             weight plus the LM head in the dtype (embedding rows and norms ignored) / memory bandwidth
             measured here (a 1 GiB torch tensor copy on --threads threads, counted as read + write,
             median of 5). An upper bound for single-stream decode of a model that does not fit in
             cache; the default model (12 MB fp32) does fit, so its bound is not one.

Settings: --prompt-len random token ids (BOS first, ids above the special tokens), --new-tokens
generated greedily with EOS ignored, --threads torch and llama.cpp threads. Each system first runs one
short warm-up generation (32-token prompt, 8 new tokens). Systems are interleaved within each repeat
(A B C, then B C A, ...), each repeat on a new prompt (the same for all systems, so prefix caching
cannot reuse an earlier repeat), and the table shows medians over --repeats. `match` is how many of
the generated tokens equal the reference's (greedy, so fp32 systems should agree for a while; bf16 rounding
diverges earlier and random-weight logits are nearly tied).

Install llama-cpp-python (builds llama.cpp from the sdist: 9 min on 2 busy cores; not part of .[test],
but `.[bench]` has it with gguf and matplotlib):

    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/pip install "llama-cpp-python>=0.3"

Run:

    .venv/bin/python benchmarks/engine_speed.py                                  # all models, dtypes, systems
    .venv/bin/python benchmarks/engine_speed.py --models default --repeats 3
    .venv/bin/python benchmarks/engine_speed.py --models 0.5b --dtypes bfloat16 --systems reference,llamacpp

Writes benchmarks/results/engine_speed.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import shutil
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, fmt, machine_info, median, publish, workdir_or_temp  # noqa: E402

from minicpm4.config import MiniCPMConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO / "minicpm4" / "assets" / "default-model"
CONFIG_05B_DIR = REPO / "minicpm4" / "assets" / "minicpm4-0.5b"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}
SYSTEMS = ("reference", "engine", "llamacpp")
MODELS = ("default", "0.5b")
FIRST_ORDINARY_ID = 11  # ids 0..10 are MiniCPM4's special tokens (also in the default model's tokenizer)
WARMUP_PROMPT, WARMUP_NEW = 32, 8


# ---- models and files ------------------------------------------------------------------------------

def prepare_model(name: str, workdir: Path) -> Path:
    """The checkpoint folder for a model name (the random 0.5B is built once per workdir)."""
    if name == "default":
        return DEFAULT_MODEL_DIR
    if name != "0.5b":
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    folder = workdir / "minicpm4-0.5b-random"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    from minicpm4.checkpoint import save_model
    from minicpm4.model import build_model

    print(f"building a random MiniCPM4-0.5B-shaped checkpoint in {folder} ...", flush=True)
    config = MiniCPMConfig.from_json(CONFIG_05B_DIR / "config.json")
    model = build_model(config, dtype=torch.float32, seed=0)
    save_model(model, folder)
    del model
    gc.collect()
    for f in TOKENIZER_FILES:
        if (CONFIG_05B_DIR / f).is_file():
            shutil.copy2(CONFIG_05B_DIR / f, folder / f)
    return folder


def gguf_file(model_dir: Path, dtype: str, workdir: Path, tag: str) -> Path:
    """Our GGUF export of model_dir at the dtype's precision (cached in workdir)."""
    from minicpm4.export.gguf import export_model_dir

    out = workdir / f"{tag}-{GGUF_TYPES[dtype]}.gguf"
    if not out.is_file():
        with warnings.catch_warnings():  # the default model has sparse_config: llama.cpp runs it dense
            warnings.filterwarnings("ignore", message=".*dense attention.*")
            export_model_dir(model_dir, out, GGUF_TYPES[dtype])
    return out


def make_prompt(config: MiniCPMConfig, length: int, seed: int = 0) -> list[int]:
    """BOS + random ordinary token ids (no special/added tokens, so no system stops or templates on them)."""
    high = min(config.vocab_size, 73440)  # 73440.. are MiniCPM4's added ChatML tokens
    g = torch.Generator().manual_seed(seed)
    return [config.bos_token_id] + torch.randint(FIRST_ORDINARY_ID, high, (length - 1,), generator=g).tolist()


def decode_weight_bytes(config: MiniCPMConfig, dtype: torch.dtype) -> int:
    """Bytes one decode step must read at least: every linear weight once, plus the LM head once."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    elements = config.num_hidden_layers * per_layer + config.vocab_size * h
    return elements * dtype.itemsize


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Memory bandwidth of a large tensor copy on torch's current threads, bytes/s (read + write)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst (page faults) is not bandwidth
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    del src, dst
    gc.collect()
    t = median(times)
    return {"bytes_per_s": 2 * nbytes / t, "copy_bytes": nbytes, "times_s": times}


# ---- systems -----------------------------------------------------------------------------------------

@dataclass
class Run:
    prompt_len: int
    tokens: list[int]
    prefill_s: float
    decode_s: float
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_len / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 else float("nan")

    def to_dict(self) -> dict:
        return {"prompt_len": self.prompt_len, "new_tokens": len(self.tokens), "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                **self.extra}


class Unavailable(Exception):
    """A system that cannot run here (module missing, not built yet); shown as n/a."""


def sampling_params(new_tokens: int):
    from minicpm4.sampling import SamplingParams

    return SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)


class ReferenceSystem:
    name = "reference"

    def __init__(self, model_dir: Path, dtype: str, threads: int) -> None:
        from minicpm4.checkpoint import load_model

        self.model = load_model(model_dir, dtype=DTYPES[dtype]).eval()
        self.info = {"attention_backend": type(self.model.attention_backend).__name__}

    def run(self, prompt: list[int], new_tokens: int) -> Run:
        from minicpm4.generate import generate_tokens

        tokens: list[int] = []
        t0 = time.perf_counter()
        t1 = None
        for step in generate_tokens(self.model, [prompt], sampling_params(new_tokens)):
            if t1 is None:
                t1 = time.perf_counter()
            tokens.append(step.tokens[0])
        t2 = time.perf_counter()
        return Run(len(prompt), tokens, t1 - t0, t2 - t1)

    def close(self) -> None:
        del self.model


def import_engine():
    from minicpm4.engine import LLM, SamplingParams

    return LLM, SamplingParams


class EngineSystem:
    name = "engine"

    def __init__(self, model_dir: Path, dtype: str, threads: int) -> None:
        LLM, self.SamplingParams = import_engine()
        self.llm = LLM(str(model_dir), dtype=dtype)
        self.info = {}

    def generate(self, prompts: list[list[int]], new_tokens: int):
        params = self.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return self.llm.generate(prompts, params)

    def run(self, prompt: list[int], new_tokens: int) -> Run:
        t0 = time.perf_counter()
        out = self.generate([prompt], new_tokens)[0]
        wall = time.perf_counter() - t0
        m = out.metrics
        return Run(len(prompt), list(out.token_ids), m.first_token_time - m.arrival_time,
                   m.finished_time - m.first_token_time,
                   {"wall_s": wall, "num_cached_tokens": getattr(m, "num_cached_tokens", None)})

    def close(self) -> None:
        close = getattr(self.llm, "close", None) or getattr(self.llm, "shutdown", None)
        if callable(close):
            close()
        del self.llm


# llama.cpp ---------------------------------------------------------------------------------------------

_LLAMA = None
_LOG_CALLBACK = None  # kept alive: llama.cpp holds the C pointer
LLAMA_LOG: deque[str] = deque(maxlen=400)  # llama.cpp's recent log lines, shown when a load fails
GGML_TYPE_BF16 = 30  # ggml.h enum ggml_type; llama-cpp-python 0.3.36 does not export it


def import_llama_cpp():
    """llama_cpp with its backend initialised and its log kept in LLAMA_LOG instead of stderr."""
    global _LLAMA, _LOG_CALLBACK
    if _LLAMA is None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise Unavailable("llama-cpp-python is not installed (see this script's docstring)") from exc
        llama_cpp.llama_backend_init()

        @llama_cpp.llama_log_callback
        def _log(level, text, user_data):
            LLAMA_LOG.append(text.decode(errors="replace"))

        _LOG_CALLBACK = _log
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        _LLAMA = llama_cpp
    return _LLAMA


def _llama_failure(what: str) -> RuntimeError:
    return RuntimeError(what + "; llama.cpp said:\n" + "".join(LLAMA_LOG))


class LlamaCppRunner:
    """A llama.cpp model + context through the C API: batched prompt eval and multi-sequence decode."""

    def __init__(self, gguf: Path, dtype: str, threads: int, n_ctx: int, n_seq_max: int = 1,
                 n_batch: int = 512, flash_attn: str = "off", kv_unified: bool = False) -> None:
        ll = self.ll = import_llama_cpp()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise _llama_failure(f"llama.cpp could not load {gguf}")
        kv_type = {"float32": ll.GGML_TYPE_F32, "bfloat16": getattr(ll, "GGML_TYPE_BF16", GGML_TYPE_BF16)}[dtype]
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = {"auto": ll.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": ll.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        cparams.type_k = cparams.type_v = kv_type
        cparams.no_perf = False
        cparams.kv_unified = kv_unified  # one KV buffer shared by all sequences (llama.cpp default: one each)
        LLAMA_LOG.clear()
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise _llama_failure(f"llama.cpp could not create a context for {gguf} ({dtype} KV cache)")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.n_batch = min(n_batch, n_ctx)  # llama.cpp clamps it so (and aborts the process on a larger batch)
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        self.info = {"gguf": str(gguf), "kv_cache": dtype, "flash_attn": flash_attn, "n_ctx": n_ctx,
                     "n_seq_max": n_seq_max, "kv_unified": kv_unified, "n_batch": n_batch, "llama_cpp_python": ll.__version__,
                     "system_info": ll.llama_print_system_info().decode(errors="replace").strip(),
                     "context_log": [line.strip() for line in LLAMA_LOG
                                     if any(k in line for k in ("flash_attn", "Flash Attention", "n_ctx ", "type_k", "REPACK"))]}

    def reset(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        self.ll.llama_perf_context_reset(self.ctx)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence id, want logits) entries."""
        if len(entries) > self.n_batch:
            raise ValueError(f"{len(entries)} tokens do not fit n_batch {self.n_batch}")
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise _llama_failure(f"llama_decode returned {rc}")

    def argmax(self, i: int) -> int:
        """Greedy token from the logits of batch entry i (of the last decode)."""
        ptr = self.ll.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def perf(self) -> dict:
        p = self.ll.llama_perf_context(self.ctx)
        return {"t_p_eval_ms": p.t_p_eval_ms, "n_p_eval": p.n_p_eval, "t_eval_ms": p.t_eval_ms, "n_eval": p.n_eval}

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


class LlamaCppSystem:
    name = "llamacpp"

    def __init__(self, gguf: Path, dtype: str, threads: int, n_ctx: int, flash_attn: str) -> None:
        self.runner = LlamaCppRunner(gguf, dtype, threads, n_ctx=n_ctx, n_batch=n_ctx, flash_attn=flash_attn)
        self.info = self.runner.info

    def run(self, prompt: list[int], new_tokens: int) -> Run:
        r = self.runner
        r.reset()
        t0 = time.perf_counter()
        r.decode([(tok, pos, 0, pos == len(prompt) - 1) for pos, tok in enumerate(prompt)])
        tokens = [r.argmax(len(prompt) - 1)]
        t1 = time.perf_counter()
        for i in range(new_tokens - 1):
            r.decode([(tokens[-1], len(prompt) + i, 0, True)])
            tokens.append(r.argmax(0))
        t2 = time.perf_counter()
        perf = r.perf()
        if perf["n_p_eval"] != len(prompt) or (new_tokens > 1 and perf["n_eval"] != new_tokens - 1):
            raise RuntimeError(f"llama.cpp counters do not match the run: {perf}")
        prefill_s, decode_s = perf["t_p_eval_ms"] / 1e3, perf["t_eval_ms"] / 1e3
        extra = {"prefill_s_wall": t1 - t0, "decode_s_wall": t2 - t1, "prefill_tok_s_wall": len(prompt) / (t1 - t0),
                 "decode_tok_s_wall": (new_tokens - 1) / (t2 - t1) if new_tokens > 1 else None, "perf": perf}
        return Run(len(prompt), tokens, prefill_s, decode_s, extra)

    def close(self) -> None:
        self.runner.close()


def build_system(name: str, model_dir: Path, dtype: str, args, workdir: Path, tag: str):
    if name == "reference":
        return ReferenceSystem(model_dir, dtype, args.threads)
    if name == "engine":
        return EngineSystem(model_dir, dtype, args.threads)
    if name == "llamacpp":
        import_llama_cpp()
        n_ctx = max(1024, args.prompt_len + args.new_tokens)
        return LlamaCppSystem(gguf_file(model_dir, dtype, workdir, tag), dtype, args.threads, n_ctx,
                              args.llamacpp_flash_attn)
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- the benchmark -------------------------------------------------------------------------------------

def bench_case(model_name: str, dtype: str, args, workdir: Path, bandwidth: float) -> dict:
    model_dir = prepare_model(model_name, workdir)
    config = MiniCPMConfig.from_json(model_dir / "config.json")
    # A fresh prompt per repeat (the same for every system within it): an engine with prefix caching must
    # not serve a repeat's prompt from the previous repeat's KV pages.
    prompts = [make_prompt(config, args.prompt_len, seed=r) for r in range(args.repeats)]
    warm = make_prompt(config, WARMUP_PROMPT, seed=1)
    systems, errors = {}, {}
    for name in args.systems:
        try:
            systems[name] = build_system(name, model_dir, dtype, args, workdir, model_name)
            systems[name].run(warm, WARMUP_NEW)
        except Unavailable as exc:  # llama-cpp-python not installed: that column is n/a
            errors[name] = str(exc)
            systems.pop(name, None)
        if name in errors:
            print(f"[{model_name} {dtype}] {name}: n/a ({errors[name]})", flush=True)

    runs: dict[str, list[Run]] = {name: [] for name in systems}
    order = list(systems)
    for r in range(args.repeats):
        shift = r % len(order) if order else 0
        for name in order[shift:] + order[:shift]:  # rotate the order: no system always runs first
            run = systems[name].run(prompts[r], args.new_tokens)
            run.extra["repeat"] = r
            runs[name].append(run)
            print(f"[{model_name} {dtype}] repeat {r} {name:9s} prefill {run.prefill_tok_s:9.1f} tok/s  "
                  f"decode {run.decode_tok_s:8.2f} tok/s", flush=True)
    for s in systems.values():
        s.close()
    gc.collect()

    ref_tokens = {run.extra["repeat"]: run.tokens for run in runs.get("reference", [])}
    weight_bytes = decode_weight_bytes(config, DTYPES[dtype])
    rows = []
    for name in args.systems:
        rs = runs.get(name, [])
        row = {"model": model_name, "dtype": dtype, "system": name, "threads": args.threads,
               "prefill_tok_s": median(r.prefill_tok_s for r in rs),
               "decode_tok_s": median(r.decode_tok_s for r in rs),
               "repeats": len(rs), "runs": [r.to_dict() for r in rs],
               "info": systems[name].info if name in systems else {}}
        if name in errors and not rs:
            row["error"] = errors[name]
        if name == "llamacpp" and rs:
            row["prefill_tok_s_wall"] = median(r.extra["prefill_tok_s_wall"] for r in rs)
            row["decode_tok_s_wall"] = median(r.extra["decode_tok_s_wall"] for r in rs)
        same = [run for run in rs if run.extra["repeat"] in ref_tokens]
        if same:  # greedy tokens equal to the reference's, from the first (repeat 0's prompt, usually)
            row["match_reference"] = common_prefix(same[0].tokens, ref_tokens[same[0].extra["repeat"]])
        rows.append(row)
    rows.append({"model": model_name, "dtype": dtype, "system": "bandwidth", "threads": args.threads,
                 "prefill_tok_s": None, "decode_tok_s": bandwidth / weight_bytes, "weight_bytes": weight_bytes,
                 "bandwidth_bytes_per_s": bandwidth})
    return {"model": model_name, "model_dir": str(model_dir), "dtype": dtype,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}


def table(cases: list[dict]) -> str:
    lines = ["| model | dtype | system | prefill tok/s | decode tok/s | decode vs reference | of bandwidth bound | match |",
             "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        by = {r["system"]: r for r in case["rows"]}
        ref = by.get("reference", {}).get("decode_tok_s")
        bound = by["bandwidth"]["decode_tok_s"]
        for r in case["rows"]:
            dec = r["decode_tok_s"]
            vs = fmt(dec / ref, 2) + "x" if ref and dec and dec == dec and ref == ref else "n/a"
            share = fmt(100 * dec / bound, 0) + "%" if dec and dec == dec and r["system"] != "bandwidth" else ""
            match = f"{r['match_reference']}/{case['new_tokens']}" if "match_reference" in r and r["system"] != "reference" else ""
            label = r["system"] + (" (bound)" if r["system"] == "bandwidth" else "")
            prefill = "" if r["system"] == "bandwidth" else fmt(r["prefill_tok_s"])
            lines.append(f"| {r['model']} | {r['dtype']} | {label} | {prefill} | "
                         f"{fmt(dec, 2)} | {vs if r['system'] != 'bandwidth' else ''} | {share} | {match} |")
    return "\n".join(lines)


def parse_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return items


def add_run_options(p: argparse.ArgumentParser, systems: tuple[str, ...], prompt_len: int) -> None:
    """The options engine_speed.py and engine_throughput.py share (models, dtypes, systems, sizes, threads)."""
    p.add_argument("--models", default="default,0.5b", type=lambda v: parse_list(v, MODELS, "model"))
    p.add_argument("--dtypes", default="float32,bfloat16", type=lambda v: parse_list(v, tuple(DTYPES), "dtype"))
    p.add_argument("--systems", default=",".join(systems), type=lambda v: parse_list(v, systems, "system"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=prompt_len)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(p, SYSTEMS, prompt_len=512)
    p.add_argument("--llamacpp-flash-attn", choices=["auto", "on", "off"], default="off",
                   help="llama.cpp flash attention; off (default) keeps fp32 attention fp32, auto = llama.cpp's "
                   "own default (on for CPU), which rounds inside attention to F16 (see the docstring)")
    p.add_argument("--workdir", default=None,
                   help="where the random 0.5B checkpoint and GGUF files go (default: a temp folder, removed)")
    p.add_argument("--out", default=str(RESULTS_DIR / "engine_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with workdir_or_temp(args.workdir, "engine-speed-") as workdir:
        bw = copy_bandwidth()
        print(f"copy bandwidth ({args.threads} threads): {bw['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
        cases = []
        for model_name in args.models:
            for dtype in args.dtypes:
                cases.append(bench_case(model_name, dtype, args, workdir, bw["bytes_per_s"]))
                print(table(cases[-1:]), flush=True)

    llama_version = None
    try:
        llama_version = import_llama_cpp().__version__
    except Unavailable:
        pass
    result = {
        "benchmark": "engine_speed",
        "command": command_line(argv),
        "machine": machine_info(args.threads),
        "llama_cpp_python": llama_version,
        "args": {k: v for k, v in vars(args).items()},
        "bandwidth": bw,
        "cases": cases,
        "table": table(cases),
    }
    publish(result, args.out)
    return result


if __name__ == "__main__":
    main()
