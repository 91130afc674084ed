"""erllama: llama.cpp models served with a token-exact KV cache that outlives requests,
processes and reboots.

``from erllama import Client`` (or ``AsyncClient`` for asyncio) is the entry point for applications; the processes are
``erllama-broker``, ``erllama-worker`` and ``erllama-cachestore``.
"""

from erllama.protocol import ErllamaError, ErrorCode

__version__ = "0.1.0"

from erllama.client import (
    AsyncClient,
    AsyncInferStream,
    Client,
    CompletionResult,
    InferStream,
    Stats,
    TokenEvent,
)

__all__ = [
    "AsyncClient",
    "AsyncInferStream",
    "Client",
    "CompletionResult",
    "ErllamaError",
    "ErrorCode",
    "InferStream",
    "Stats",
    "TokenEvent",
    "__version__",
]
