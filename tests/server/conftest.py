"""A live uvicorn server in a background thread around the bundled default model (fp32), for the
server tests: real HTTP on 127.0.0.1, a free port, the official `openai` client on the other side."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

# nothing here imports the serve extra at import time: the test modules skip themselves without it


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: object
    server: object
    thread: threading.Thread

    @property
    def base_url(self) -> str:  # what openai.OpenAI(base_url=...) takes
        return self.url + "/v1"

    @property
    def llm(self):
        return self.app.state.ctx.llm

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop within 30 s"


def serve(app) -> LiveServer:
    """Run `app` with uvicorn on a free loopback port until .stop() (lifespan on: shutdown drains the engine)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app, server, thread)


def load_pipe():
    from minicpm4.api import default_pipeline

    # as shipped: sparse_config on (the prompts here stay below its dense_len, 1024, so queries run dense
    # inside the InfLLM v2 backend; tests/engine covers the sparse side)
    return default_pipeline(dtype="float32")


@pytest.fixture(scope="session")
def pipe():
    return load_pipe()


def make_engine(threads: int = 1, **options):
    """An AsyncLLM with its own copy of the model, KV pool and queue, with the engine's defaults (the fast
    forward the server runs). Its own copy: with fast_forward=False the runner swaps the model's attention
    backend per call, so two engine threads must not share a model then."""
    from minicpm4.engine import LLM, AsyncLLM

    p = load_pipe()
    options = {"kv_cache_tokens": 4096, **options}
    return AsyncLLM(LLM(model=p.model, tokenizer=p.tokenizer, **options), threads=threads)


@pytest.fixture(scope="module")
def servers():
    """Factory for this module's servers and engines; every server is stopped when the module ends
    (an app made with shutdown_engine=True drains and stops its engine then)."""
    started: list[LiveServer] = []

    class Servers:
        engine = staticmethod(make_engine)

        @staticmethod
        def start(app) -> LiveServer:
            live = serve(app)
            started.append(live)
            return live

    yield Servers()
    for live in reversed(started):
        live.stop()
