"""Errors as HTTP: the CLI's exit-code table (appliance/errors.py) mapped to statuses, in one
JSON shape, OpenAI's: {"error": {"message", "type", "code", "hint"}}. The client maps them back,
so `appliance ...` exits with the same code whether it acted itself or through the API."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance import errors as e


def error_body(message: str, type_: str, hint: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "hint": hint}}


def error_response(
    status: int, message: str, type_: str, hint: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(message, type_, hint, code), status, headers=headers)


def for_exception(exc: BaseException) -> tuple[int, str]:
    for cls, status, type_ in e.HTTP_STATUS:
        if isinstance(exc, cls):
            return status, type_
    return 500, "internal_error"


def install(app: FastAPI) -> None:
    async def _operator(_: Request, exc: Exception) -> JSONResponse:
        status, type_ = for_exception(exc)
        code = getattr(exc, "code", None)
        return error_response(status, str(exc), type_, getattr(exc, "hint", None), code)

    for operator_error in e.OPERATOR_ERRORS:  # ours and the sandbox lifecycle's
        app.add_exception_handler(operator_error, _operator)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid')}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "not_allowed"}
        return error_response(exc.status_code, str(exc.detail), type_.get(exc.status_code, "error"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback by uvicorn's error logger; the caller gets one line.
        import logging

        logging.getLogger("appliance.control").exception("unhandled error")
        return error_response(500, f"{type(exc).__name__}: {exc}", "internal_error")
