"""What a finished request returns, and what a stream yields.

``CompletionResult`` and ``Stats`` are the wire's own types (``erllama.protocol.messages``): the worker
builds the result, the broker relays it, and the client returns it as decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from erllama.protocol import CompletionResult, Stats, VerifyOutcome

__all__ = ["CompletionResult", "Stats", "TokenEvent", "VerifyOutcome"]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One streamed step. ``kind`` is ``text`` (reply text; valid UTF-8, possibly empty while a stop
    string may still match), ``thinking`` or ``tool_call`` (deltas of those spans), or
    ``thinking_end`` (``signature``: HMAC-SHA256 of the block) / ``tool_call_end`` (``text``: the
    call's exact bytes), each sent once per span."""

    text: str
    token_ids: list[int]
    sent_ns: int | None = None  # the worker's CLOCK_MONOTONIC when it sent the event
    received_ns: int = 0  # this process's CLOCK_MONOTONIC when the event arrived
    kind: str = "text"
    signature: bytes = b""

    @property
    def latency_ms(self) -> float | None:
        """Worker-to-client transit time; meaningful only when both run on the same host."""
        return None if self.sent_ns is None else (self.received_ns - self.sent_ns) / 1e6
