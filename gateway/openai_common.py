"""Pieces the OpenAI endpoints share: ids, ``usage``, the finish reason, and the outcome bookkeeping."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from erllama.gateway.backend import Backend
from erllama.protocol import CompletionResult


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


def track(request: Request, model: str, endpoint: str) -> None:
    """Name the model and endpoint of this request, for the error handlers' metrics."""
    request.state.model = model
    request.state.endpoint = endpoint


def usage(result: CompletionResult) -> dict[str, Any]:
    """OpenAI ``usage``; ``cached_tokens`` are the prompt tokens the cache restored."""
    s = result.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": int(result.cache_delta.get("read", 0))},
    }


def finish_reason(result: CompletionResult) -> str:
    """``stop`` or ``length`` (a request cancelled by the gateway's own client never reaches a reply)."""
    return "length" if result.finish_reason == "length" else "stop"
