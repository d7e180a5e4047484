"""Every failure a client can cause answers 4xx with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`, so the official clients raise their typed exceptions
(BadRequestError, AuthenticationError, NotFoundError, RateLimitError...) with our message in them.
FastAPI's own 422 for a body that fails validation becomes a 400 naming the field, as OpenAI answers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minicpm4.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("minicpm4.server")

# HTTP status -> OpenAI's error `type` for it (the values api.openai.com returns).
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
               500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """Raised anywhere in a handler; answered as `status` with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _location(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages.0.role"; pydantic's union-branch labels are dropped."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    return ".".join(parts) or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = _location(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return f"'{param}' is a required field", param
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return f"{where}{first.get('msg', 'invalid value')}; got {_short(first.get('input'))}{more}", param


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _counted(request: Request, response: JSONResponse) -> JSONResponse:
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is not None:
        ctx.metrics.http_errors.labels(str(response.status_code)).inc()
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _counted(request, error_response(exc.status, exc.message, exc.param, exc.code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return _counted(request, error_response(400, message, param, "invalid_value" if param else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see GET /v1/models and POST /v1/chat/completions"
        return _counted(request, error_response(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, keep serving
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _counted(request, error_response(500, f"internal server error: {type(exc).__name__}: {exc}"))
