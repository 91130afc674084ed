"""Errors in the Anthropic Messages API's shape: ``{"type": "error", "error": {"type", "message"}}``, with
Anthropic's statuses, which its SDK and coding agents act on (529 ``overloaded_error`` is retried).

The gateway raises one ``ApiError`` (OpenAI-shaped) everywhere; requests to an Anthropic path render it
here instead, so each handler and middleware stays shared.
"""

from __future__ import annotations

import json
from typing import Any, Final

from starlette.responses import JSONResponse

from erllama.gateway.errors import ApiError, from_erllama
from erllama.protocol import ErllamaError

ANTHROPIC_PATHS: Final = ("/v1/messages", "/messages")
OVERLOADED_STATUS: Final = 529  # Anthropic's own status for "try again soon"

# OpenAI codes (gateway/errors.py) worth retrying: the service is busy, not broken
_OVERLOADED_CODES: Final = frozenset(
    {"overloaded", "session_busy", "shutting_down", "broker_unavailable", "broker_timeout"}
)
_TYPE_OF_STATUS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def is_anthropic_path(path: str) -> bool:
    return path.startswith(ANTHROPIC_PATHS)


def anthropic_status(err: ApiError) -> tuple[int, str]:
    """(HTTP status, Anthropic error type) for a gateway error."""
    if err.code in _OVERLOADED_CODES:
        return OVERLOADED_STATUS, "overloaded_error"
    if err.status in _TYPE_OF_STATUS:
        return err.status, _TYPE_OF_STATUS[err.status]
    return 500, "api_error"  # a crashed or failed worker, a load failure, our own bug


def anthropic_body(err: ApiError) -> dict[str, Any]:
    _, kind = anthropic_status(err)
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def anthropic_error_response(err: ApiError) -> JSONResponse:
    status, _ = anthropic_status(err)
    return JSONResponse(anthropic_body(err), status_code=status, headers=err.headers)


def anthropic_error_event(err: ErllamaError | ApiError) -> str:
    """An error after the stream started: Anthropic's ``error`` event."""
    api = from_erllama(err) if isinstance(err, ErllamaError) else err
    return f"event: error\ndata: {json.dumps(anthropic_body(api))}\n\n"
