"""POST /v1/chat/completions: ChatML prompt, n choices, streaming or not, chat-format logprobs.

Tokenization (encode_chat) and the per-token strings of logprobs run here, in the server's event-loop
thread, while the model runs in the engine's worker thread: on a 2-core machine the two compete for
the cores (the engine's torch threads should leave one for the server: `minicpm4 serve --threads`).
"""

from __future__ import annotations

import time
from typing import AsyncIterator

import jinja2
from fastapi import Request

from minicpm4.server.context import ServerContext
from minicpm4.server.errors import ApiError
from minicpm4.server.generation import Generation
from minicpm4.server.logprobs import chat_logprobs
from minicpm4.server.params import check_model, make_jobs, max_new_tokens, new_id
from minicpm4.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                      ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessage,
                                      ChatResponseMessage, Usage)
from minicpm4.server.streaming import SSE_DONE, collect, sse, sse_error, sse_response, start


def render_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


async def chat_completions(ctx: ServerContext, request: Request, body: ChatCompletionRequest):
    check_model(ctx, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    try:
        prompt = ctx.tokenizer.encode_chat(render_messages(body.messages), add_generation_prompt=True)
    except (ValueError, jinja2.TemplateError) as e:
        raise ApiError(400, f"cannot render the messages with the chat template: {e}", "messages") from e
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    budget = max_new_tokens(ctx, len(prompt), requested, ctx.default_chat_max_tokens, "messages", param)
    top_n = body.top_logprobs or 0
    request_id = new_id("chatcmpl")
    jobs = make_jobs(ctx, body, request_id, [prompt], [budget], logprobs=top_n if body.logprobs else None)
    gen = await start(ctx, request, jobs)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(ctx, gen, body, request_id, created, len(prompt), top_n, include_usage))
    finals = await collect(ctx, request, gen)
    choices = []
    for index in sorted(finals):
        out = finals[index]
        lp = ChatLogprobs(content=chat_logprobs(out.logprobs or [], ctx.texts, top_n)) if body.logprobs else None
        choices.append(ChatChoice(index=index, message=ChatResponseMessage(content=out.text), logprobs=lp,
                                  finish_reason=out.finish_reason))
    completion_tokens = sum(len(o.token_ids) for o in finals.values())
    usage = Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                  total_tokens=len(prompt) + completion_tokens)
    return ChatCompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices, usage=usage)


async def _stream(ctx: ServerContext, gen: Generation, body: ChatCompletionRequest, request_id: str, created: int,
                  prompt_tokens: int, top_n: int, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                       usage=usage))

    completion_tokens = 0
    try:
        for job in gen.jobs:  # the role first, as OpenAI streams it
            yield chunk([ChatChunkChoice(index=job.index, delta=ChatDelta(role="assistant", content=""))])
        async for index, out in gen.events():
            logprobs = None
            if body.logprobs and out.new_logprobs:
                logprobs = ChatLogprobs(content=chat_logprobs(out.new_logprobs, ctx.texts, top_n))
            if out.new_text or logprobs is not None or out.finished:
                delta = ChatDelta(content=out.new_text or None)
                reason = out.finish_reason if out.finished else None
                yield chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)])
            if out.finished:
                completion_tokens += len(out.token_ids)
                ctx.metrics.observe_finished(out)
        if include_usage:
            yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens))
        yield SSE_DONE
    except RuntimeError as e:  # the engine died mid-stream: the 200 is sent, so say it in the stream
        yield sse_error(503, str(e))
    finally:
        await gen.close()
