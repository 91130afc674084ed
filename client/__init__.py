"""The erllama client library: ``Client`` (synchronous, thread-safe)."""

from erllama.client.client import Client, InferStream
from erllama.client.results import CompletionResult, Stats, TokenEvent

__all__ = ["Client", "CompletionResult", "InferStream", "Stats", "TokenEvent"]
