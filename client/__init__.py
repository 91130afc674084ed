"""The erllama client library: ``Client`` (synchronous, thread-safe) and ``AsyncClient`` (asyncio)."""

from erllama.client.async_client import AsyncClient, AsyncInferStream
from erllama.client.client import Client, InferStream
from erllama.client.results import CompletionResult, Stats, TokenEvent

__all__ = [
    "AsyncClient",
    "AsyncInferStream",
    "Client",
    "CompletionResult",
    "InferStream",
    "Stats",
    "TokenEvent",
]
