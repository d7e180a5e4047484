"""The OpenAI-compatible server (FastAPI + uvicorn) over the engine's AsyncLLM, and its chat page.

    protocol.py    request / response bodies (pydantic)   app.py        create_app: routes, auth, lifespan
    chat.py        /v1/chat/completions                   completions.py  /v1/completions (echo, logprobs)
    params.py      body -> SamplingParams + length checks  generation.py  n engine requests, merged streams
    streaming.py   start / collect / SSE helpers           logprobs.py   token strings, logprobs formats
    errors.py      OpenAI error bodies, 400 for bad bodies middleware.py request-size limit (413)
    metrics.py     Prometheus registry per app             cli.py        `minicpm4 serve`
    static/chat.html  the chat page at GET /

Needs the `serve` extra: pip install 'minicpm4[serve]'.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    # Lazy: `minicpm4 serve --help` (and the rest of the CLI) must work without the serve extra installed.
    if name == "create_app":
        from minicpm4.server.app import create_app

        return create_app
    raise AttributeError(f"module 'minicpm4.server' has no attribute {name!r}")
