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
                                      ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatResponseMessage, Usage)
from minicpm4.server.streaming import SSE_DONE, collect, sse, sse_error, sse_response, start
from minicpm4.server.tools import active_tools, delta_calls, render_messages, reply_message, reply_prefix


async def chat_completions(ctx: ServerContext, request: Request, body: ChatCompletionRequest):
    check_model(ctx, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    tools = active_tools(body)
    prefix = reply_prefix(body)
    try:
        prompt = ctx.tokenizer.encode_chat(render_messages(body.messages, tools), add_generation_prompt=True)
    except (ValueError, jinja2.TemplateError) as e:
        raise ApiError(400, f"cannot render the messages with the chat template: {e}", "messages") from e
    if prefix:  # a forced call: the assistant turn starts with the marker (and the function's name)
        prompt = prompt + ctx.tokenizer.encode(prefix, add_bos=False)
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
        return sse_response(_stream(ctx, gen, body, request_id, created, len(prompt), top_n, include_usage, tools,
                                    prefix))
    finals = await collect(ctx, request, gen)
    choices = []
    for index in sorted(finals):
        out = finals[index]
        lp = ChatLogprobs(content=chat_logprobs(out.logprobs or [], ctx.texts, top_n)) if body.logprobs else None
        content, calls = reply_message(out.text, tools, prefix)
        reason = "tool_calls" if calls else out.finish_reason
        choices.append(ChatChoice(index=index, message=ChatResponseMessage(content=content, tool_calls=calls),
                                  logprobs=lp, finish_reason=reason))
    completion_tokens = sum(len(o.token_ids) for o in finals.values())
    usage = Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                  total_tokens=len(prompt) + completion_tokens)
    return ChatCompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices, usage=usage)


async def _stream(ctx: ServerContext, gen: Generation, body: ChatCompletionRequest, request_id: str, created: int,
                  prompt_tokens: int, top_n: int, include_usage: bool, tools: list[dict] | None = None,
                  prefix: str = "") -> AsyncIterator[str]:
    """With tools, a choice's text is held back until it finishes (a call can only be parsed whole), then sent as
    one content delta and/or one tool_calls delta; without tools, text streams as it comes."""
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
            if tools is not None:
                if out.finished:
                    content, calls = reply_message(out.text, tools, prefix)
                    delta = ChatDelta(content=content, tool_calls=delta_calls(calls) if calls else None)
                    reason = "tool_calls" if calls else out.finish_reason
                    yield chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)])
                elif logprobs is not None:
                    yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), logprobs=logprobs)])
            elif out.new_text or logprobs is not None or out.finished:
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
