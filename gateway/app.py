"""The app factory: routes (each with and without ``/v1``), middlewares, error handlers, and the shared
``Backend`` opened and closed with the app's lifespan.

Another API family (the Anthropic Messages API, say) adds a module with its handlers and a line in
``ROUTES``; it gets the shared client, metrics, auth, body limit and error mapping for free, and may
register its own error rendering for its paths in ``create_app``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from erllama.gateway import (
    anthropic_messages,
    health,
    openai_chat,
    openai_completions,
    openai_embeddings,
    openai_models,
)
from erllama.gateway.anthropic_errors import anthropic_error_response, is_anthropic_path
from erllama.gateway.auth import BearerAuth, BodyLimit
from erllama.gateway.backend import Backend
from erllama.gateway.config import GatewayConfig
from erllama.gateway.errors import ApiError, error_response, from_erllama
from erllama.gateway.streaming import ClientGone
from erllama.protocol import ErllamaError

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

# (path under /v1, methods, handler): each is served at /v1<path> and at <path>
OPENAI_ROUTES: Final[list[tuple[str, list[str], Handler]]] = [
    ("/chat/completions", ["POST"], openai_chat.chat_completions),
    ("/completions", ["POST"], openai_completions.completions),
    ("/embeddings", ["POST"], openai_embeddings.embeddings),
    ("/models", ["GET"], openai_models.list_models),
    ("/models/{model:path}", ["GET"], openai_models.get_model),
    # the Anthropic Messages API: its errors render in Anthropic's shape (gateway/anthropic_errors.py)
    ("/messages", ["POST"], anthropic_messages.messages),
    ("/messages/count_tokens", ["POST"], anthropic_messages.count_tokens),
]
CLIENT_CLOSED_REQUEST: Final = 499  # nginx's status for a client that left; nobody reads it


def routes() -> list[Route]:
    out = [
        Route("/health", health.health, methods=["GET"]),
        Route("/metrics", health.metrics, methods=["GET"]),
    ]
    for path, methods, handler in OPENAI_ROUTES:
        out.append(Route(f"/v1{path}", handler, methods=methods))
        out.append(Route(path, handler, methods=methods))
    return out


def _count_failure(request: Request, code: str) -> None:
    model = getattr(request.state, "model", None)
    if model is not None:
        request.app.state.backend.metrics.failed(model, request.state.endpoint, code)


def _render(request: Request, err: ApiError) -> Response:
    return anthropic_error_response(err) if is_anthropic_path(request.url.path) else error_response(err)


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    _count_failure(request, exc.code or str(exc.status))
    return _render(request, exc)


async def _on_erllama_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ErllamaError)
    _count_failure(request, exc.code)
    return _render(request, from_erllama(exc))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _render(request, ApiError(exc.status_code, str(exc.detail), code=code))


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    _count_failure(request, "client_gone")
    return JSONResponse({}, status_code=CLIENT_CLOSED_REQUEST)


async def _on_bug(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s", request.url.path, exc_info=exc)
    return _render(request, ApiError(500, "Internal error in the gateway.", "server_error", code="internal"))


def create_app(cfg: GatewayConfig) -> Starlette:
    """The gateway's ASGI app for ``cfg``."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.backend = Backend(cfg)
        try:
            yield
        finally:
            await app.state.backend.close()

    return Starlette(
        routes=routes(),
        middleware=[
            Middleware(BodyLimit, max_bytes=cfg.max_body_bytes),
            Middleware(BearerAuth, keys=cfg.api_keys),
        ],
        exception_handlers={
            ApiError: _on_api_error,
            ErllamaError: _on_erllama_error,
            HTTPException: _on_http_error,
            ClientGone: _on_client_gone,
            Exception: _on_bug,
        },
        lifespan=lifespan,
    )
