"""The readable reference generation path: prefill(), decode_one_token(), generate() over a static
KV cache (DESIGN §5). The engine must produce exactly what this produces under greedy decoding.

Batches of prompts with different lengths are right-padded; every row's tokens sit at slots equal to
their positions, so the cache needs no padding mask (see kv_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from minicpm4.kv_cache import StaticKVCache
from minicpm4.model import MiniCPMForCausalLM
from minicpm4.sampling import SamplingParams, sample_next

# Called after each new token of a row with (row, generated ids so far); True ends that row.
StopCallback = Callable[[int, list[int]], bool]


@dataclass
class GenerationOutput:
    token_ids: list[int]  # generated tokens, without the prompt and without the stop token
    finish_reason: str  # "stop" (eos / stop token / stop callback) or "length"


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [B, T_max] right-padded, lengths [B]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    return ids, lengths


def prefill(model: MiniCPMForCausalLM, input_ids: torch.Tensor, lengths: torch.Tensor, kv_cache: StaticKVCache,
            start: int = 0, chunk_size: int | None = None) -> torch.Tensor:
    """Run input_ids [B, T] (right-padded, real lengths `lengths` [B] counted from `start`) through the
    model at positions start.., in chunks of `chunk_size` tokens on top of the cache. Returns the logits of
    each row's last real token, [B, V]."""
    B, T = input_ids.shape
    chunk_size = chunk_size or T
    last = lengths - 1  # index of each row's last real token inside input_ids
    out = None
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        positions = torch.arange(start + s, start + e, device=input_ids.device).expand(B, e - s)
        in_chunk = (last >= s) & (last < e)
        logit_index = (last - s).clamp(0, e - s - 1)[:, None]  # [B, 1]
        logits = model(input_ids[:, s:e], positions=positions, kv_cache=kv_cache, logit_indices=logit_index)[:, 0]
        out = logits if out is None else torch.where(in_chunk[:, None], logits, out)
    return out


def decode_one_token(model: MiniCPMForCausalLM, tokens: torch.Tensor, positions: torch.Tensor,
                     kv_cache: StaticKVCache) -> torch.Tensor:
    """tokens [B], positions [B] -> next-token logits [B, V]."""
    return model(tokens[:, None], positions=positions[:, None], kv_cache=kv_cache)[:, 0]


@dataclass
class Step:
    """One decoding step: the new token of each row (None if the row produced none) and, for rows that
    finished at this step, why ("stop" or "length")."""

    tokens: list[int | None]
    finish_reasons: list[str | None]


def generate_tokens(model: MiniCPMForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams,
                    should_stop: StopCallback | None = None, prefill_chunk_size: int | None = None,
                    ) -> Iterator[Step]:
    """Yield one Step per decoding step until every row has finished.

    A row finishes on a stop token (params.stop_token_ids, default the model's eos list; the stop
    token is not emitted), when `should_stop` says so, or after max_new_tokens.
    """
    if params.max_new_tokens == 0:
        return
    device = model.device
    stop_ids = params.stop_token_set(model.config.eos_token_ids)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    input_ids, lengths = pad_prompts(prompts, pad_id, device)
    B = len(prompts)
    cache = StaticKVCache.for_model(model, B, int(lengths.max()) + params.max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, list(prompt)] = True

    generated: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    with torch.inference_mode():
        logits = prefill(model, input_ids, lengths, cache, chunk_size=prefill_chunk_size)
        positions = lengths.clone()
        while True:
            tokens = sample_next(logits, params, seen, generator)
            step = Step([None] * B, [None] * B)
            for row, token in enumerate(tokens.tolist()):
                if finished[row]:
                    continue
                if token in stop_ids:
                    step.finish_reasons[row] = "stop"
                else:
                    generated[row].append(token)
                    step.tokens[row] = token
                    if should_stop is not None and should_stop(row, generated[row]):
                        step.finish_reasons[row] = "stop"
                    elif len(generated[row]) >= params.max_new_tokens:
                        step.finish_reasons[row] = "length"
                finished[row] = step.finish_reasons[row] is not None
            yield step
            if all(finished):
                return
            if seen is not None:
                seen[torch.arange(B, device=device), tokens] = True
            logits = decode_one_token(model, tokens, positions, cache)
            positions = positions + 1


def generate(model: MiniCPMForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
             should_stop: StopCallback | None = None, prefill_chunk_size: int | None = None) -> list[GenerationOutput]:
    """Generate for a batch of token-id prompts; returns one GenerationOutput per prompt."""
    params = params or SamplingParams()
    outputs = [GenerationOutput([], "length") for _ in prompts]
    for step in generate_tokens(model, prompts, params, should_stop, prefill_chunk_size):
        for row, (token, reason) in enumerate(zip(step.tokens, step.finish_reasons)):
            if token is not None:
                outputs[row].token_ids.append(token)
            if reason is not None:
                outputs[row].finish_reason = reason
    return outputs
