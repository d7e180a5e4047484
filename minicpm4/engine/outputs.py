"""What the engine hands back per request and step (streaming deltas plus the running totals)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log-probability under the model's raw distribution (before sampling filters)
    top: list[tuple[int, float]] = field(default_factory=list)  # the N most likely (token id, logprob), best first


@dataclass
class RequestMetrics:
    arrival_time: float  # time.perf_counter() when the request was added
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]  # shared by every output of the request: read-only
    token_ids: list[int]  # every generated token so far (the stop token excluded)
    new_token_ids: list[int]  # generated since the previous output of this request
    text: str  # detokenized output so far (empty without a tokenizer); stop strings cut off
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" once finished
    stop_token_id: int | None = None  # the stop token that ended it (excluded from token_ids), if one did
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when requested
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when requested; set once the prompt is done
    metrics: RequestMetrics | None = None
