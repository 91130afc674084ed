"""Two ASGI middlewares in front of every route: ``Authorization: Bearer`` keys and the body size limit."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from erllama.gateway.anthropic_errors import anthropic_body, anthropic_status, is_anthropic_path
from erllama.gateway.errors import ApiError

OPEN_PATHS = frozenset({"/health"})  # probes need no key


async def _send_error(send: Send, err: ApiError, path: str) -> None:
    anthropic = is_anthropic_path(path)
    body = json.dumps(anthropic_body(err) if anthropic else err.body()).encode()
    status = anthropic_status(err)[0] if anthropic else err.status
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """Refuse a request whose bearer token (or ``x-api-key``, as Anthropic's clients send it) is not one
    of ``keys`` (401, OpenAI's ``invalid_api_key``)."""

    def __init__(self, app: ASGIApp, keys: frozenset[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        token = given[7:].strip() if given[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        # compare_digest against every key: no early exit tells how much of a key matched
        if not any(hmac.compare_digest(token, k) for k in self.keys):
            err = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
            await _send_error(send, err, scope["path"])
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a body over ``max_bytes`` (413) by its Content-Length, or while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(413, f"The request body exceeds {self.max_bytes} bytes.", code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(send, too_big, scope["path"])
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_big
            return message

        await self.app(scope, limited, send)
