"""Run one API call's engine requests (n choices x prompts) together and merge their output streams.

`start()` returns once every request has been admitted and produced its first output, or raises the
first admission error (ValueError -> 400, QueueFullError -> 429) after aborting the requests already
admitted: so an error is an HTTP status, never a 200 stream that breaks. `close()` cancels what still
runs; cancelling a pump cancels its `AsyncLLM.generate` loop, whose `finally` aborts the engine
request and frees its KV pages (that is how a client that disconnects stops costing anything).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from minicpm4.engine import AsyncLLM, RequestOutput, SamplingParams

_DONE = object()


@dataclass
class Job:
    index: int  # the choice index in the response (prompt_index * n + i, as OpenAI numbers them)
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


class Generation:
    def __init__(self, llm: AsyncLLM, jobs: list[Job]) -> None:
        self.llm = llm
        self.jobs = jobs
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffer: list[tuple[int, RequestOutput]] = []

    async def _pump(self, job: Job) -> None:
        try:
            async for out in self.llm.generate(job.prompt_ids, job.params, job.request_id):
                self._queue.put_nowait((job.index, out))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # ValueError / QueueFullError / a crashed engine: the consumer decides
            self._queue.put_nowait((job.index, exc))
            return
        self._queue.put_nowait((job.index, _DONE))

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(job)) for job in self.jobs]
        waiting = {job.index for job in self.jobs}
        try:
            while waiting:
                index, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                waiting.discard(index)
                self._buffer.append((index, item))
        except BaseException:
            await self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output delta) in arrival order, until every request has finished."""
        running = len(self.jobs)
        while running:
            index, item = self._buffer.pop(0) if self._buffer else await self._queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise RuntimeError(f"the engine stopped: {item!r}") from item
            else:
                yield index, item

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
