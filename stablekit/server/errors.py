"""Errors in the shape the web UI's API uses: {"error", "detail", "body", "errors"} with a 4xx status.

A handler turns every exception into that shape; anything unexpected becomes a 500 whose message
is one line (never a traceback), and is logged on the server.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("stablekit.server")

MAX_ECHOED_BODY = 2048  # a validation error echoes the request body only when it is this short


class ApiError(ValueError):
    """A refusal with an HTTP status: 400 bad value, 401, 404 unknown thing, 409, 413, 503 busy, ...
    (a ValueError, so the command line reports it as the bad input it is)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None, name: str | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.name = name or {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                             409: "Conflict", 413: "PayloadTooLarge", 422: "UnprocessableEntity",
                             429: "TooManyRequests", 503: "ServiceUnavailable"}.get(status, "Error")


def error_body(error: str, detail: Any, errors: str, body: Any = "") -> dict[str, Any]:
    return {"error": error, "detail": detail, "body": body, "errors": errors}


def _short_body(body: Any) -> Any:
    try:
        text = json.dumps(jsonable_encoder(body))
    except (TypeError, ValueError):
        return ""
    return body if len(text) <= MAX_ECHOED_BODY else ""


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.name, str(e), str(e)), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in e.errors()]
        summary = "; ".join(f"{'.'.join(str(x) for x in p['loc'])}: {p['msg']}" for p in problems)
        return JSONResponse(error_body("RequestValidationError", jsonable_encoder(problems), summary,
                                       jsonable_encoder(_short_body(e.body))), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(type(e).__name__, e.detail, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(ValueError)
    async def _value(request: Request, e: ValueError) -> JSONResponse:  # the engine's and params' refusals
        return JSONResponse(error_body(type(e).__name__, str(e), str(e)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        first = (str(e).strip().splitlines() or [""])[0]
        return JSONResponse(error_body(type(e).__name__, first, first), status_code=500)
