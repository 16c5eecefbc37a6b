"""Every error leaves as one JSON shape: {"error": {code, message, type, param}}."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.dialects.anthropic.errors import anthropic_body, anthropic_status, is_anthropic
from server.api.guard import is_ollama
from server.errors import BadRequestError, HostlerError, NotFoundError

log = logging.getLogger("hostler.api")

_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


def error_response(exc: HostlerError, path: str = "") -> JSONResponse:
    """The error as JSON: OpenAI's shape, Anthropic's on its routes, Ollama's
    `{"error": "message"}` on Ollama's."""
    if is_anthropic(path):
        body = anthropic_body(exc)
        return JSONResponse(body, status_code=anthropic_status(exc), headers=exc.headers)
    if is_ollama(path):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=exc.headers)


def _param(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        if p.isdigit():
            out += f"[{p}]"
        elif p.startswith(("function-", "tagged-union")) or p in ("str", "list[str]"):
            continue
        else:
            out += ("." if out else "") + p
    return out or None


def validation_error(errors: Sequence[Any]) -> BadRequestError:
    """A pydantic validation failure as a 400 naming the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return BadRequestError("the request body is not valid JSON")
    if first.get("type") in ("model_attributes_type", "dict_type") and loc in (("body",), ()):
        return BadRequestError("the request body must be a JSON object")
    param = _param(loc)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"{param}: {msg}" if param else msg
    return BadRequestError(message, param=param)


def install(app: FastAPI) -> None:
    @app.exception_handler(HostlerError)
    async def _hostler(request: Request, exc: HostlerError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(ValidationError)
    async def _invalid_inner(request: Request, exc: ValidationError) -> JSONResponse:
        # A request re-read in another shape (a dialect's body as a text completion):
        # still the client's data, so still a 400 naming the field.
        return error_response(validation_error(exc.errors()), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError("no such endpoint"), request.url.path)
        if is_anthropic(request.url.path):
            return error_response(BadRequestError(str(exc.detail)), request.url.path)
        if is_ollama(request.url.path):
            plain = {"error": str(exc.detail)}
            return JSONResponse(plain, status_code=exc.status_code, headers=exc.headers)
        body = {
            "error": {
                "code": exc.status_code,
                "message": str(exc.detail),
                "type": _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                "param": None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(HostlerError("internal server error"), request.url.path)
