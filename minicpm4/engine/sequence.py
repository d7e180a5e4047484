"""One request's state inside the engine: its tokens, how many have KV in the cache, its pages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from minicpm4.engine.outputs import TokenLogprob
from minicpm4.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    stop_token_ids: frozenset[int]
    arrival_time: float
    generator: torch.Generator | None = None  # per request: seeded sampling is independent of the batch
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (or in reused prefix pages)
    num_cached_tokens: int = 0  # of those, taken from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)  # page ids, in position order
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_token_id: int | None = None  # the stop token that finished it (not in token_ids), if one did
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # first prompt token: None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    # Penalty state over the generated tokens, allocated on first use ([V] on the model's device).
    output_counts: torch.Tensor | None = None
    seen: torch.Tensor | None = None  # [V] bool, prompt + generated (repetition penalty)
    # The prompt, sliced once: every RequestOutput of this request shares it (read-only).
    prompt_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = self.token_ids[:self.num_prompt_tokens]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """More than one token is waiting for its K/V (a prompt, or a preempted sequence's whole text)."""
        return self.num_tokens - self.num_computed_tokens > 1
