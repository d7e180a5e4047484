"""What both completion endpoints share: starting a Generation with errors mapped to HTTP statuses,
collecting a non-streamed result while watching for a client that left, and Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from minicpm4.engine import QueueFullError, RequestOutput
from minicpm4.server.context import ServerContext
from minicpm4.server.errors import ApiError, error_body
from minicpm4.server.generation import Generation, Job

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.25  # how soon a non-streamed request notices its client left (and frees its pages)


async def start(ctx: ServerContext, request: Request, jobs: list[Job]) -> Generation:
    """Admit every job and wait for its first output (a queued request waits here: a client that leaves
    meanwhile gets its requests aborted, so it does not keep a queue slot)."""
    if ctx.draining:
        raise ApiError(503, "the server is shutting down; retry on another instance", code="server_shutting_down")
    gen = Generation(ctx.llm, jobs)
    try:
        await until_disconnected(request, gen.start())
    except QueueFullError as e:
        raise ApiError(429, f"{e}; retry later", code="rate_limit_exceeded") from e
    except ValueError as e:  # the engine's own request checks
        raise ApiError(400, str(e)) from e
    except RuntimeError as e:  # the engine worker died
        raise ApiError(503, str(e), code="engine_stopped") from e
    return gen


async def collect(ctx: ServerContext, request: Request, gen: Generation) -> dict[int, RequestOutput]:
    """The final output of every choice. A client that disconnects meanwhile gets its requests aborted."""

    async def drain() -> dict[int, RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for index, out in gen.events():
            last[index] = out
            if out.finished:
                ctx.metrics.observe_finished(out)
        return last

    try:
        return await until_disconnected(request, drain())
    except RuntimeError as e:
        raise ApiError(503, str(e), code="engine_stopped") from e
    finally:
        await gen.close()


async def until_disconnected(request: Request, coro: Awaitable[T]) -> T:
    """Await coro, polling the connection; if the client leaves first, cancel coro and answer 499."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "the client disconnected", code="client_disconnected")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def sse_error(status: int, message: str) -> str:
    """A failure after the 200 was sent: an error event the OpenAI clients raise as APIError."""
    return f"data: {json.dumps(error_body(status, message))}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and X-Accel-Buffering keep proxies (nginx) from holding tokens back
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
