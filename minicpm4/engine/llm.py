"""The facade: `LLM(model_dir).generate(prompts, SamplingParams)`, a streaming iterator, and the engine
behind `Pipeline`, `minicpm4 generate/chat` and the server (through AsyncLLM).

    from minicpm4.engine import LLM, SamplingParams
    llm = LLM("path/to/MiniCPM4-0.5B")
    for out in llm.generate(["Hello", "The capital of France is"], SamplingParams(max_new_tokens=32)):
        print(out.text)
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterator, Sequence

import torch

from minicpm4.engine.config import EngineConfig
from minicpm4.engine.llm_engine import LLMEngine
from minicpm4.engine.outputs import RequestOutput
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.sampling import SamplingParams
from minicpm4.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def engine_config(config: EngineConfig | None, overrides: dict) -> EngineConfig:
    known = {f.name for f in fields(EngineConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown engine option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if config is not None and overrides:
        raise ValueError("pass either an EngineConfig or engine options, not both")
    return config or EngineConfig(**overrides)


class LLM:
    def __init__(self, model_dir: str | Path | None = None, *, model: MiniCPMForCausalLM | None = None,
                 tokenizer: Tokenizer | None = None, dtype: str | torch.dtype | None = "auto", device: str = "cpu",
                 config: EngineConfig | None = None, sparse: bool | None = None, sparse_variant: str | None = None,
                 context_extension: str | None = None, **engine_options) -> None:
        """Load a Hugging Face MiniCPM4 folder, or wrap a loaded `model` (+ optional tokenizer).
        Engine options are EngineConfig fields (block_size, kv_cache_tokens, max_num_seqs, ...)."""
        if (model_dir is None) == (model is None):
            raise ValueError("LLM: pass a model folder or a loaded model (model=...), exactly one")
        if model_dir is not None:
            from minicpm4.api import from_pretrained  # the api imports the engine: import on use

            pipe = from_pretrained(model_dir, dtype=dtype, device=device, sparse=sparse, sparse_variant=sparse_variant,
                                   context_extension=context_extension)
            model, tokenizer = pipe.model, tokenizer or pipe.tokenizer
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, engine_config(config, engine_options))

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _add(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None) -> list[str]:
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
        return [self.engine.add_request(self.encode(p), sp) for p, sp in zip(prompts, params)]

    def stream_batch(self, prompts: Sequence[Prompt],
                     params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (prompt index, output delta) as the engine steps, until every prompt has finished.
        Closing the iterator early aborts what is still running."""
        ids = self._add(list(prompts), params)
        index = {rid: i for i, rid in enumerate(ids)}
        left = set(ids)
        try:
            while left:
                for out in self.engine.step():
                    if out.request_id in index:
                        if out.finished:
                            left.discard(out.request_id)
                        yield index[out.request_id], out
        finally:
            for rid in left:  # the iterator was closed early: nobody will read these requests' outputs
                self.engine.abort(rid, notify=False)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        for _, out in self.stream_batch([prompt], params):
            yield out

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (text or token ids) to completion; one final RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        final: list[RequestOutput | None] = [None] * len(prompts)
        for i, out in self.stream_batch(prompts, params):  # type: ignore[arg-type]
            if out.finished:
                final[i] = out
        return final  # type: ignore[return-value]
