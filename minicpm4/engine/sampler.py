"""Per-request sampling: every option of minicpm4/sampling.py, a generator per request, logprobs.

Each row is sampled with its own SamplingParams and its own torch.Generator, drawing exactly what the
reference `sample_next` draws for a one-row batch, so a seeded request gives the same text whatever
else is in the batch (and the same as the reference path run alone). Rows that are plain greedy
share one argmax.

Logprobs are of the model's raw distribution (log_softmax of the logits before penalties and
sampling filters), as vLLM reports them by default.
"""

from __future__ import annotations

import torch

from minicpm4.engine.outputs import TokenLogprob
from minicpm4.engine.sequence import Sequence
from minicpm4.sampling import apply_count_penalties, apply_repetition_penalty, filter_logits


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(seed) if seed is not None else None


def penalised(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """logits [1, V] with seq's repetition / frequency / presence penalties applied."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        if seq.seen is None:
            seq.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            seq.seen[torch.tensor(seq.token_ids, device=logits.device)] = True
        logits = apply_repetition_penalty(logits, seq.seen[None], p.repetition_penalty)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        if seq.output_counts is None:
            seq.output_counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
            for t in seq.output_token_ids:
                seq.output_counts[t] += 1
        logits = apply_count_penalties(logits, seq.output_counts[None], p.frequency_penalty, p.presence_penalty)
    return logits


def has_penalties(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [M, V] fp32, one row per sequence -> the next token of each."""
    tokens: list[int | None] = [None] * len(seqs)
    plain = [i for i, s in enumerate(seqs) if s.params.greedy and not has_penalties(s)]
    if plain:
        for i, t in zip(plain, logits[plain].argmax(-1).tolist()):
            tokens[i] = t
    for i, seq in enumerate(seqs):
        if tokens[i] is not None:
            continue
        row = penalised(logits[i:i + 1], seq)
        if seq.params.greedy:
            tokens[i] = int(row.argmax(-1))
        else:
            probs = filter_logits(row, seq.params).softmax(-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens  # type: ignore[return-value]


def record_token(seq: Sequence, token: int) -> None:
    """Update seq's penalty state after `token` was appended to it."""
    if seq.seen is not None:
        seq.seen[token] = True
    if seq.output_counts is not None:
        seq.output_counts[token] += 1


def token_logprobs(logits: torch.Tensor, chosen: list[int], top_n: list[int]) -> list[TokenLogprob]:
    """logits [M, V] -> per row the chosen token's logprob and the top_n[row] most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(1, torch.tensor(chosen, device=logits.device)[:, None])[:, 0].tolist()
    k = max(top_n, default=0)
    top_vals, top_ids = (logp.topk(k, dim=-1) if k > 0 else (None, None))
    out = []
    for row, (token, lp, n) in enumerate(zip(chosen, chosen_lp, top_n)):
        top = list(zip(top_ids[row, :n].tolist(), top_vals[row, :n].tolist())) if n > 0 else []
        out.append(TokenLogprob(token, lp, top))
    return out
