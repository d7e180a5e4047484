"""The asyncio API the server uses: the engine steps in one worker thread; requests stream back to
coroutines. Only the worker thread touches LLMEngine; others talk to it through a command queue.

    llm = AsyncLLM(LLM(model_dir))
    async for out in llm.generate(prompt_ids, SamplingParams(max_new_tokens=64)):
        print(out.new_text, end="")

Leaving the `async for` early (a client that disconnected) aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import AsyncIterator, Callable

import torch

from minicpm4.engine.llm import LLM
from minicpm4.engine.llm_engine import EngineStats, QueueFullError
from minicpm4.engine.outputs import RequestOutput
from minicpm4.sampling import SamplingParams

_Command = Callable[[], None]


class AsyncLLM:
    def __init__(self, llm: LLM, threads: int | None = None) -> None:
        """threads: torch threads of the worker (the model's compute); None keeps torch's setting."""
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams and stats snapshots
        self._wake = threading.Event()
        self._stopping = False  # refuse new requests
        self._stop_worker = False  # end the worker loop
        self._threads = threads
        self.last_step_tokens_per_s = 0.0
        self.error: BaseException | None = None  # a crash of the worker, surfaced to every caller
        self._worker = threading.Thread(target=self._run, name="minicpm4-engine", daemon=True)
        self._worker.start()

    # ---- public ------------------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request. Raises ValueError (bad request) or QueueFullError at the start."""
        if self._stopping:
            raise QueueFullError("the server is shutting down")
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error!r}")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()

        def add() -> None:
            try:
                self.engine.add_request(prompt_token_ids, params, request_id)
            except BaseException as exc:  # handed to the caller, never kills the worker
                loop.call_soon_threadsafe(_set_exception, added, exc)
                return
            with self._lock:
                self._streams[request_id] = (loop, outputs)
            loop.call_soon_threadsafe(_set_result, added, None)

        self._submit(add)
        await added
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine stopped: {item!r}")
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        def do() -> None:
            self.engine.abort(request_id)

        self._submit(do)

    def stats(self) -> EngineStats:
        with self._lock:
            s = self.engine.stats
            return EngineStats(**vars(s))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_alive(self) -> bool:
        """The worker thread runs and has not crashed (the server's /health)."""
        return self._worker.is_alive() and self.error is None

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Refuse new requests; with drain, wait (up to timeout) for the running ones; then stop the worker."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while drain and self.engine.has_unfinished() and time.monotonic() < deadline and self._worker.is_alive():
            await asyncio.sleep(0.05)
        self._stop_worker = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._worker.join, timeout)

    # ---- worker ------------------------------------------------------------------------------------------
    def _submit(self, command: _Command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        try:
            while not self._stop_worker:
                while True:
                    try:
                        self._commands.get_nowait()()
                    except queue.Empty:
                        break
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                start = time.perf_counter()
                outputs = self.engine.step()
                elapsed = time.perf_counter() - start
                with self._lock:
                    produced = sum(len(o.new_token_ids) for o in outputs)
                    self.last_step_tokens_per_s = produced / elapsed if elapsed > 0 else 0.0
                    targets = [(self._streams.get(o.request_id), o) for o in outputs]
                    for o in outputs:
                        if o.finished:
                            self._streams.pop(o.request_id, None)
                for target, out in targets:
                    if target is not None:
                        loop, q = target
                        loop.call_soon_threadsafe(q.put_nowait, out)
        except BaseException as exc:  # report to every waiting stream instead of hanging them
            self.error = exc
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            for loop, q in streams:
                loop.call_soon_threadsafe(q.put_nowait, exc)
            raise


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
