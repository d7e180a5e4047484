"""Request body -> engine jobs: the prompt-length checks, max_tokens, SamplingParams per choice.

Every check here answers 400 naming the parameter; the engine checks again (its ValueError is also a
400), so nothing a client sends reaches the worker thread unchecked.
"""

from __future__ import annotations

import uuid

from minicpm4.sampling import SamplingParams
from minicpm4.server.context import ServerContext
from minicpm4.server.errors import ApiError
from minicpm4.server.generation import Job
from minicpm4.server.protocol import SamplingFields

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty")
UINT64 = 2**64


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(ctx: ServerContext, body: SamplingFields) -> None:
    if body.model is not None and body.model != ctx.model_name:
        raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{ctx.model_name}' "
                       f"(GET /v1/models)", "model", "model_not_found")


def max_new_tokens(ctx: ServerContext, prompt_len: int, requested: int | None, default: int, what: str,
                   param: str = "max_tokens") -> int:
    """The completion budget of one prompt; a prompt or request that cannot fit the context is a 400.
    what: "messages" or "prompt" (named in the message); param: the field `requested` came from."""
    limit = ctx.max_model_len
    if prompt_len >= limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens, but the {what} have "
                       f"{prompt_len} tokens (the prompt must leave room for at least one generated token). "
                       f"Shorten the {what}.", "messages" if what == "messages" else "prompt",
                       "context_length_exceeded")
    if requested is None:
        return min(default, limit - prompt_len)
    if prompt_len + requested > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the completion). "
                       f"Reduce the {what} or the completion length.", param, "context_length_exceeded")
    return requested


def sampling_params(ctx: ServerContext, body: SamplingFields, max_tokens: int, seed: int | None,
                    logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    values = {name: getattr(body, name) for name in SAMPLING_FIELDS}
    for name, value in ctx.defaults.items():  # the model's generation_config.json fills what the body leaves out
        if name in values and values[name] is None:
            values[name] = value
    values = {k: v for k, v in values.items() if v is not None}
    if values.get("top_k") == -1:
        values["top_k"] = 0  # vLLM's spelling of "off"
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(max_new_tokens=max_tokens, seed=seed, stop=stop, stop_token_ids=_stop_ids(ctx, body),
                              ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **values)
    except ValueError as e:  # a range the protocol models do not know (a model default out of range, say)
        raise ApiError(400, str(e)) from e


def _stop_ids(ctx: ServerContext, body: SamplingFields) -> list[int] | None:
    if body.stop_token_ids is None:
        return None
    eos = ctx.llm.engine.model.config.eos_token_ids  # extra stop ids add to EOS, as in vLLM
    return sorted(set(eos) | set(body.stop_token_ids))


def choice_seed(seed: int | None, i: int) -> int | None:
    """Choice i of n samples with seed + i (mod 2**64: the generator's range), so choices differ but repeat."""
    return None if seed is None else (seed + i) % UINT64


def make_jobs(ctx: ServerContext, body: SamplingFields, request_id: str, prompts: list[list[int]],
              budgets: list[int], logprobs: int | None = None, prompt_logprobs: int | None = None) -> list[Job]:
    jobs = []
    for p, (ids, budget) in enumerate(zip(prompts, budgets)):
        for i in range(body.n):
            index = p * body.n + i
            params = sampling_params(ctx, body, budget, choice_seed(body.seed, i), logprobs, prompt_logprobs)
            jobs.append(Job(index, p, ids, params, f"{request_id}-{index}"))
    return jobs
