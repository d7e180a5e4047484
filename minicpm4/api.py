"""The public Python API: load a model folder with its tokenizer, then generate, chat or stream text.

    import minicpm4
    pipe = minicpm4.from_pretrained("path/to/MiniCPM4-0.5B", dtype="bfloat16")
    print(pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=64))
    for piece in pipe.stream("Once upon a time", temperature=0.7, top_p=0.8):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from minicpm4.checkpoint import load_model
from minicpm4.config import MiniCPMConfig, tiny
from minicpm4.generate import generate_tokens
from minicpm4.model import MiniCPMForCausalLM, build_model
from minicpm4.sampling import SamplingParams
from minicpm4.stop_strings import StopStringFilter
from minicpm4.tokenizer import StreamDecoder, Tokenizer

BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "minicpm4-0.5b"
# The small model trained by `make default-model` (see its README.md model card), when it ships.
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"
# Its EAGLE-2 draft (`make default-draft`, minicpm4/train/draft.py), used by `--draft default`.
DEFAULT_DRAFT_DIR = DEFAULT_MODEL_DIR / "draft"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

Messages = list[dict[str, str]]


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 where the hardware computes it natively (CUDA, AVX-512 CPUs), else fp32.

    Measured on an AVX2-only EPYC: a 1x1024 @ 1024x4096 bf16 matmul took 15 ms vs 2.9 ms in fp32
    (no native bf16, so PyTorch converts on the fly); on AVX-512/AMX CPUs bf16 is the faster one.
    """
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """None keeps the checkpoint's dtype; "auto" picks the fast one for the device."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown value {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("inf")


def generation_defaults(model_dir: Path | None) -> dict[str, Any]:
    """Sampling defaults from a folder's generation_config.json (MINICPM4.md §2.6); greedy if absent."""
    if model_dir is None or not (model_dir / "generation_config.json").is_file():
        return {}
    gc = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    if not gc.get("do_sample", False):
        return {"temperature": 0.0}
    keys = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
    return {k: v for k, v in gc.items() if k in keys and v is not None}


ENGINES = ("engine", "reference")


class Pipeline:
    """A model, its tokenizer and sampling defaults, with text-in / text-out methods.

    engine: "engine" (default) runs requests through the inference engine (minicpm4/engine: paged KV,
    continuous batching, fused fast forward); "reference" through the readable reference path
    (minicpm4/generate.py), the spec the engine is tested against. engine_options: EngineConfig fields.
    """

    def __init__(self, model: MiniCPMForCausalLM, tokenizer: Tokenizer, defaults: dict[str, Any] | None = None,
                 description: str = "", engine: str = "engine", **engine_options: Any) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine: unknown value {engine!r}; choose from {', '.join(ENGINES)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.defaults = defaults or {}
        self.description = description
        self.engine = engine
        self.engine_options = engine_options
        self._llm = None

    @property
    def llm(self):
        """The engine over this pipeline's model, built on first use (it allocates the KV pool)."""
        if self._llm is None:
            from minicpm4.engine import LLM  # the engine imports this module's loaders: import on use

            self._llm = LLM(model=self.model, tokenizer=self.tokenizer, **self.engine_options)
        return self._llm

    @property
    def config(self) -> MiniCPMConfig:
        return self.model.config

    def sampling_params(self, params: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
        if params is not None:
            if overrides:
                raise ValueError("pass either a SamplingParams or keyword overrides, not both")
            return params
        known = {f.name for f in fields(SamplingParams)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return SamplingParams(**values)

    def encode_prompt(self, prompt: str | Messages | list[int]) -> list[int]:
        """Prompt ids: a string (BOS + text), chat messages (the chat template), or ids as they are."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode_chat(prompt, add_generation_prompt=True)

    def generate(self, prompts: str | Messages | Sequence[str | Messages], params: SamplingParams | None = None,
                 **overrides: Any) -> Completion | list[Completion]:
        """Complete one prompt (str or chat messages) or a batch; returns Completion(s)."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        params = self.sampling_params(params, **overrides)
        texts = ["" for _ in batch]
        token_ids: list[list[int]] = [[] for _ in batch]
        reasons = ["length" for _ in batch]
        start = time.perf_counter()
        for row, text, reason in self.stream_batch(batch, params, token_ids):
            texts[row] += text
            if reason is not None:
                reasons[row] = reason
        seconds = time.perf_counter() - start
        out = [Completion(t, ids, r, len(self.encode_prompt(p)), seconds)
               for t, ids, r, p in zip(texts, token_ids, reasons, batch)]
        return out[0] if single else out

    def stream_batch(self, prompts: Sequence[str | Messages], params: SamplingParams,
                     token_ids: list[list[int]] | None = None) -> Iterator[tuple[int, str, str | None]]:
        """Yield (row, new text, finish reason or None) as tokens arrive, for a batch of prompts.
        If `token_ids` is given (one list per prompt), the generated ids are appended to it."""
        ids = [self.encode_prompt(p) for p in prompts]
        if self.engine == "engine":
            for row, out in self.llm.stream_batch(ids, params):
                if token_ids is not None:
                    token_ids[row].extend(out.new_token_ids)
                if out.new_text or out.finished:
                    yield row, out.new_text, out.finish_reason if out.finished else None
            return
        decoders = [StreamDecoder(self.tokenizer, skip_special_tokens=True) for _ in prompts]
        filters = [StopStringFilter(params.stop) for _ in prompts]
        should_stop = (lambda row, _: filters[row].stopped) if params.stop else None
        for step in generate_tokens(self.model, ids, params, should_stop=should_stop):
            for row, (token, reason) in enumerate(zip(step.tokens, step.finish_reasons)):
                text = ""
                if token is not None:
                    if token_ids is not None:
                        token_ids[row].append(token)
                    text = filters[row].push(decoders[row].push(token))
                if reason is not None:
                    text += filters[row].push(decoders[row].flush()) + filters[row].flush()
                if text or reason is not None:
                    yield row, text, reason

    def stream(self, prompt: str | Messages, params: SamplingParams | None = None, **overrides: Any) -> Iterator[str]:
        """Yield text pieces for one prompt as they are generated (never a broken character)."""
        for _, text, _ in self.stream_batch([prompt], self.sampling_params(params, **overrides)):
            if text:
                yield text

    def chat(self, messages: Messages, params: SamplingParams | None = None, **overrides: Any) -> str:
        return self.generate(messages, params, **overrides).text


# Context extensions a user asks for by name instead of editing rope_scaling (MINICPM4.md §2.4).
CONTEXT_EXTENSIONS = {"128k": MiniCPMConfig.with_yarn_128k}


def runtime_config(config: MiniCPMConfig, sparse: bool | None = None, sparse_variant: str | None = None,
                   context_extension: str | None = None) -> MiniCPMConfig:
    """Options that change how a checkpoint runs, not its weights.

    sparse: True / False turns InfLLM v2 on / off for any checkpoint (on: the config's sparse_config,
    else the README defaults); None keeps what config.json says. sparse_variant: an InfLLM v2 semantics
    preset (attention/infllmv2/settings.py), kept as sparse_config["variant"]. context_extension:
    "128k" applies the report's YaRN-extended LongRoPE factors (rope_factors.py).
    """
    if sparse is not None:
        config = config.with_sparse(sparse)
    if sparse_variant is not None:
        if config.sparse_config is None:
            raise ValueError("sparse_variant: sparse attention is off for this model; turn it on (sparse=True, --sparse on)")
        config = config.with_sparse(True, variant=sparse_variant)
    if context_extension is not None:
        if context_extension not in CONTEXT_EXTENSIONS:
            raise ValueError(f"context_extension: unknown value {context_extension!r}; choose from {', '.join(CONTEXT_EXTENSIONS)}")
        config = CONTEXT_EXTENSIONS[context_extension](config)
    return config


def reconfigure(model: MiniCPMForCausalLM, config: MiniCPMConfig) -> MiniCPMForCausalLM:
    """Run a loaded `model` under `config`, which may differ only in weight-free fields (sparse, RoPE)."""
    model.set_runtime_config(config)
    return model


def from_pretrained(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str = "cpu",
                    sparse: bool | None = None, sparse_variant: str | None = None,
                    context_extension: str | None = None, engine: str = "engine", **engine_options: Any) -> Pipeline:
    """Load a Hugging Face MiniCPM4 folder (config.json, safetensors, tokenizer files).
    dtype: "auto" (default: fast for the device), None (as stored), or a dtype name.
    sparse / sparse_variant / context_extension: see `runtime_config`. engine / engine_options: see Pipeline."""
    path = Path(path)
    model = load_model(path, dtype=parse_dtype(dtype, device), device=device)
    reconfigure(model, runtime_config(model.config, sparse, sparse_variant, context_extension))
    tokenizer = Tokenizer.from_pretrained(path)
    return Pipeline(model, tokenizer, generation_defaults(path), description=str(path), engine=engine, **engine_options)


def demo_pipeline(dtype: str | torch.dtype | None = "auto", seed: int = 0, sparse: bool | None = None,
                  sparse_variant: str | None = None, context_extension: str | None = None,
                  engine: str = "engine", **engine_options: Any) -> Pipeline:
    """A tiny RANDOMLY INITIALISED MiniCPM4 with the real MiniCPM4 tokenizer: it runs every code path
    but writes gibberish. It stands in until the trained default model ships (training issue)."""
    cfg = runtime_config(tiny(vocab_size=73448, eos_token_id=[2, 73440]), sparse, sparse_variant, context_extension)
    model = build_model(cfg, dtype=parse_dtype(dtype) or torch.float32, seed=seed)
    tokenizer = Tokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR)
    return Pipeline(model, tokenizer, generation_defaults(BUNDLED_TOKENIZER_DIR),
                    description="tiny random-init demo model (no trained weights yet)", engine=engine, **engine_options)


def has_default_model() -> bool:
    return (DEFAULT_MODEL_DIR / "config.json").is_file()


def default_pipeline(dtype: str | torch.dtype | None = "auto", **runtime: Any) -> Pipeline:
    """The bundled trained default model, or the random-init demo model if none ships yet.
    runtime: sparse / sparse_variant / context_extension (see `runtime_config`), engine (see Pipeline)."""
    if has_default_model():
        pipe = from_pretrained(DEFAULT_MODEL_DIR, dtype=dtype, **runtime)
        pipe.description = "bundled default model (trained by `make default-model`; see its model card)"
        return pipe
    return demo_pipeline(dtype, **runtime)
