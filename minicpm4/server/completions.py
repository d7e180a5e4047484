"""POST /v1/completions: text or token-id prompts, n choices, echo, legacy-format logprobs.

`echo` with `logprobs` returns the prompt's own token logprobs (first token: null), which is how
lm-evaluation-harness's `local-completions` model scores loglikelihood tasks (`max_tokens` 0 or 1,
`echo: true`, `logprobs: 1`). Tokenization runs in the server's thread (see chat.py on the cores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request

from minicpm4.engine import RequestOutput
from minicpm4.server.context import ServerContext
from minicpm4.server.errors import ApiError
from minicpm4.server.generation import Generation
from minicpm4.server.logprobs import OffsetTracker, completion_logprobs
from minicpm4.server.params import check_model, make_jobs, max_new_tokens, new_id
from minicpm4.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                      Usage)
from minicpm4.server.streaming import SSE_DONE, collect, sse, sse_error, sse_response, start

OPENAI_DEFAULT_MAX_TOKENS = 16


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo returns: the prompt as sent, or the decoded ids


def read_prompts(ctx: ServerContext, body: CompletionRequest) -> list[Prompt]:
    p = body.prompt
    if isinstance(p, str):
        p = [p]
    if p and isinstance(p[0], int):
        p = [p]
    prompts = []
    for i, item in enumerate(p):
        if isinstance(item, str):
            ids = ctx.tokenizer.encode(item)
            if not ids:
                raise ApiError(400, f"prompt {i} is empty (and the tokenizer adds no BOS)", "prompt")
            prompts.append(Prompt(ids, item))
        else:
            vocab = ctx.llm.engine.model.config.vocab_size
            bad = [t for t in item if t >= vocab]
            if bad:
                raise ApiError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
            prompts.append(Prompt(list(item), ctx.tokenizer.decode(item, skip_special_tokens=True)))
    return prompts


async def completions(ctx: ServerContext, request: Request, body: CompletionRequest):
    check_model(ctx, body)
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "'best_of' other than n is not supported (choices are not ranked server-side)", "best_of")
    if body.suffix:
        raise ApiError(400, "'suffix' (insertion) is not supported", "suffix")
    prompts = read_prompts(ctx, body)
    budgets = [max_new_tokens(ctx, len(p.ids), body.max_tokens, OPENAI_DEFAULT_MAX_TOKENS, "prompt") for p in prompts]
    # echo + logprobs with max_tokens 0 (lm-eval's loglikelihood): the engine runs the prompt for its logprobs.
    want_prompt_lp = body.echo and body.logprobs is not None
    request_id = new_id("cmpl")
    jobs = make_jobs(ctx, body, request_id, [p.ids for p in prompts], budgets, logprobs=body.logprobs,
                     prompt_logprobs=body.logprobs if want_prompt_lp else None)
    gen = await start(ctx, request, jobs)
    created = int(time.time())
    views = {job.index: _ChoiceView(ctx, body, prompts[job.prompt_index]) for job in jobs}
    prompt_tokens = sum(len(p.ids) for p in prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(ctx, gen, views, request_id, created, prompt_tokens, include_usage))
    finals = await collect(ctx, request, gen)
    choices = [views[i].whole(i, finals[i]) for i in sorted(finals)]
    completion_tokens = sum(v.completion_tokens(finals[i]) for i, v in views.items())
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    return CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices, usage=usage)


class _ChoiceView:
    """Turns one choice's engine outputs into completion text + logprobs, whole or as stream deltas."""

    def __init__(self, ctx: ServerContext, body: CompletionRequest, prompt: Prompt) -> None:
        self.ctx, self.body, self.prompt = ctx, body, prompt
        self.echo_pending = body.echo
        start = len(prompt.text) if body.echo else 0
        self.offsets = OffsetTracker(ctx.tokenizer, start)  # generated tokens, offsets into the choice's text

    def completion_tokens(self, final: RequestOutput) -> int:
        return len(final.token_ids)

    def _prompt_part(self, out: RequestOutput) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        if out.prompt_logprobs is None:
            raise ApiError(500, "the engine returned no prompt logprobs for this request")
        return completion_logprobs(out.prompt_logprobs, self.prompt.ids, self.ctx.texts,
                                   OffsetTracker(self.ctx.tokenizer), self.body.logprobs)

    def _generated_part(self, token_ids: list[int], records) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        return completion_logprobs(records or [], token_ids, self.ctx.texts, self.offsets, self.body.logprobs)

    def whole(self, index: int, final: RequestOutput) -> CompletionChoice:
        text = self.prompt.text if self.body.echo else ""
        logprobs = self._prompt_part(final) if self.body.echo else None
        text += final.text
        logprobs = _join(logprobs, self._generated_part(final.token_ids, final.logprobs))
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=self.finish_reason(final))

    def delta(self, index: int, out: RequestOutput) -> CompletionChoice | None:
        """The stream chunk choice of one output delta (None: nothing to send)."""
        text, logprobs = "", None
        if self.echo_pending and (self.body.logprobs is None or out.prompt_logprobs is not None or out.finished):
            self.echo_pending = False
            text, logprobs = self.prompt.text, self._prompt_part(out)
        text += out.new_text
        logprobs = _join(logprobs, self._generated_part(out.new_token_ids, out.new_logprobs)
                         if out.new_token_ids else None)
        if not text and logprobs is None and not out.finished:
            return None
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=self.finish_reason(out) if out.finished else None)

    def finish_reason(self, final: RequestOutput) -> str | None:
        return final.finish_reason


def _join(a: CompletionLogprobs | None, b: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if a is None or b is None:
        return a or b
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


async def _stream(ctx: ServerContext, gen: Generation, views: dict[int, _ChoiceView], request_id: str, created: int,
                  prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                      usage=usage))

    completion_tokens = 0
    try:
        async for index, out in gen.events():
            choice = views[index].delta(index, out)
            if choice is not None:
                yield chunk([choice])
            if out.finished:
                completion_tokens += views[index].completion_tokens(out)
                ctx.metrics.observe_finished(out)
        if include_usage:
            yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens))
        yield SSE_DONE
    except RuntimeError as e:
        yield sse_error(503, str(e))
    except ApiError as e:
        yield sse_error(e.status, e.message)
    finally:
        await gen.close()
