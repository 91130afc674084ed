"""Errors as OpenAI error objects: ``{"error": {"message", "type", "param", "code"}}``, with the HTTP
status a client's retry logic expects (400 bad input, 404 unknown model, 429/503 with ``Retry-After``
when it is worth retrying, 500 for our own bugs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.responses import JSONResponse

from erllama.protocol import ErllamaError, ErrorCode

RETRY_AFTER_S: Final = 1

INVALID_REQUEST: Final = "invalid_request_error"
SERVER_ERROR: Final = "server_error"


@dataclass(slots=True)
class ApiError(Exception):
    """One HTTP error response; raised anywhere in a handler, rendered by ``error_response``."""

    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str, message: str, code: str | None = None) -> ApiError:
    """A 400 naming the offending request field."""
    return ApiError(400, message, param=param, code=code)


# erllama code -> (HTTP status, OpenAI error type, OpenAI code, retry after)
_MAPPING: Final[dict[str, tuple[int, str, str, bool]]] = {
    ErrorCode.INVALID_PARAMS: (400, INVALID_REQUEST, "invalid_value", False),
    ErrorCode.INVALID_GRAMMAR: (400, INVALID_REQUEST, "invalid_grammar", False),
    ErrorCode.INVALID_CONTENT: (400, INVALID_REQUEST, "invalid_content", False),
    ErrorCode.TEMPLATE_FAILED: (400, INVALID_REQUEST, "template_failed", False),
    ErrorCode.NO_TEMPLATE: (400, INVALID_REQUEST, "no_template", False),
    ErrorCode.NOT_SUPPORTED: (400, INVALID_REQUEST, "not_supported", False),
    ErrorCode.CONTEXT_OVERFLOW: (400, INVALID_REQUEST, "context_length_exceeded", False),
    ErrorCode.MODEL_NOT_FOUND: (404, INVALID_REQUEST, "model_not_found", False),
    ErrorCode.STICKY_BUSY: (409, INVALID_REQUEST, "session_busy", True),
    ErrorCode.OVERLOADED: (429, "rate_limit_error", "overloaded", True),
    ErrorCode.WORKER_CRASHED: (503, SERVER_ERROR, "worker_crashed", True),
    ErrorCode.MODEL_FAILED: (503, SERVER_ERROR, "model_failed", True),
    ErrorCode.HOST_DOWN: (503, SERVER_ERROR, "host_down", True),
    ErrorCode.SHUTTING_DOWN: (503, SERVER_ERROR, "shutting_down", True),
    ErrorCode.BROKER_LOST: (503, SERVER_ERROR, "broker_unavailable", True),
    ErrorCode.TIMEOUT: (503, SERVER_ERROR, "broker_timeout", True),
    ErrorCode.LOAD_FAILED: (500, SERVER_ERROR, "load_failed", False),
}


def from_erllama(err: ErllamaError) -> ApiError:
    """The HTTP error for an erllama error (an unknown code is a 500)."""
    status, kind, code, retry = _MAPPING.get(err.code, (500, SERVER_ERROR, err.code, False))
    param = err.detail.get("key") if isinstance(err.detail.get("key"), str) else None
    if err.code == ErrorCode.MODEL_NOT_FOUND:
        param = "model"
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else {}
    return ApiError(status, err.message, kind, param, code, headers)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse_error(err: ErllamaError | ApiError) -> str:
    """An error after a stream started: one ``data:`` event carrying the error object."""
    api = from_erllama(err) if isinstance(err, ErllamaError) else err
    return f"data: {json.dumps(api.body())}\n\n"
