"""The OpenAI-compatible HTTP server around an AsyncLLM.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   (Bearer key when one is set)
    GET /health                 GET /metrics (Prometheus)  GET / (the chat page)

    app = create_app(AsyncLLM(LLM(model_dir)), "minicpm4-0.5b")
    uvicorn.run(app, host="127.0.0.1", port=8000)

The engine runs continuous batching in its worker thread, so concurrent calls share steps (CPM.cu's
server serialised them behind a global lock, MINICPM4.md §4.7-4.8). On SIGTERM uvicorn stops accepting,
lets the open responses finish, then the lifespan shutdown drains the engine (`shutdown(drain=True)`).
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from minicpm4.engine import AsyncLLM
from minicpm4.server.chat import chat_completions
from minicpm4.server.completions import completions
from minicpm4.server.context import ServerContext
from minicpm4.server.errors import ApiError, error_response, install_error_handlers
from minicpm4.server.logprobs import TokenTexts
from minicpm4.server.metrics import ServerMetrics
from minicpm4.server.middleware import BodySizeLimit
from minicpm4.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                      CompletionResponse, ErrorResponse, ModelCard, ModelList)

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
# 4 MiB: a 32K-token prompt is ~130 KB of text or ~200 KB as token ids; lm-eval batches a few of them.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503)}


def create_app(async_llm: AsyncLLM, model_name: str, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, defaults: dict[str, Any] | None = None,
               default_chat_max_tokens: int = 1024, shutdown_engine: bool = True,
               drain_timeout: float = 30.0) -> FastAPI:
    """defaults: sampling values for fields a request omits (api.generation_defaults of the model folder).
    shutdown_engine: the app owns the engine and drains + stops it at shutdown (False: several apps share one)."""
    if async_llm.tokenizer is None:
        raise ValueError("create_app: the engine has no tokenizer; the server needs one (text in, text out)")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    ctx = ServerContext(llm=async_llm, tokenizer=async_llm.tokenizer, model_name=model_name,
                        defaults=dict(defaults or {}), metrics=ServerMetrics(async_llm),
                        texts=TokenTexts(async_llm.tokenizer), default_chat_max_tokens=default_chat_max_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ctx.draining = True
        if shutdown_engine:
            await async_llm.shutdown(drain=True, timeout=drain_timeout)

    app = FastAPI(title="minicpm4", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for MiniCPM4 (chat completions, completions, models).")
    app.state.ctx = ctx
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    install_error_handlers(app)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>' with the key the "
                           "server was started with (--api-key or MINICPM4_API_KEY)", code="invalid_api_key")

    v1 = [Depends(authorize)]

    @app.post("/v1/chat/completions", dependencies=v1, response_model=None,
              responses={200: {"model": ChatCompletionResponse, "description": "JSON, or an SSE stream"}, **ERRORS})
    async def _chat(request: Request, body: ChatCompletionRequest):
        return await chat_completions(ctx, request, body)

    @app.post("/v1/completions", dependencies=v1, response_model=None,
              responses={200: {"model": CompletionResponse, "description": "JSON, or an SSE stream"}, **ERRORS})
    async def _completions(request: Request, body: CompletionRequest):
        return await completions(ctx, request, body)

    @app.get("/v1/models", dependencies=v1, response_model=ModelList, responses=ERRORS)
    async def _models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=ctx.created, max_model_len=ctx.max_model_len)])

    @app.get("/health")
    async def _health():
        if not async_llm.is_alive:
            return error_response(503, f"the engine stopped: {async_llm.error!r}", code="engine_stopped")
        if ctx.draining:
            return error_response(503, "the server is shutting down", code="server_shutting_down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def _metrics() -> Response:
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    page = CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def _page() -> HTMLResponse:
        return HTMLResponse(page)

    return app
