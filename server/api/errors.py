"""Every error leaves as one JSON shape: {"error": {code, message, type, param}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import BadRequestError, HostlerError, NotFoundError

log = logging.getLogger("hostler.api")

_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


def error_response(exc: HostlerError) -> JSONResponse:
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


def install(app: FastAPI) -> None:
    @app.exception_handler(HostlerError)
    async def _hostler(_: Request, exc: HostlerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ValidationError)
    async def _invalid_inner(request: Request, exc: ValidationError) -> JSONResponse:
        # A request re-read in another shape (a dialect's body as a text completion):
        # still the client's data, so still a 400 naming the field.
        return await _invalid(request, RequestValidationError(exc.errors()))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return error_response(BadRequestError("the request body is not valid JSON"))
        if first.get("type") in ("model_attributes_type", "dict_type") and loc in (("body",), ()):
            return error_response(BadRequestError("the request body must be a JSON object"))
        param = _param(loc)
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
        return error_response(BadRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError("no such endpoint"))
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
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(HostlerError("internal server error"))
