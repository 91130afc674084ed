"""What a finished request returns, and what a stream yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0  # waiting in the broker's queue for a free sequence
    ttft_ms: float = 0.0  # broker receipt to the first sampled token
    prefill_ms: float = 0.0
    generation_ms: float = 0.0

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Stats:
        return cls(**{k: d[k] for k in cls.__slots__ if k in d})  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """The outcome of ``complete()`` (and of a stream, once it has ended).

    ``context_tokens`` are exactly the tokens whose KV state the worker held at the end: the
    prompt plus every generated token except the last one sampled, which was never decoded.
    """

    reply: str
    generated: list[int]
    context_tokens: list[int]
    committed_tokens: int
    finish_reason: str  # stop | length | cancelled
    stop_sequence: str | None
    finish_key: str | None
    cache_hit_kind: str | None  # exact | partial | sticky | shared (from a running request) | cold
    cache_delta: dict[str, int] = field(default_factory=dict)  # read: tokens restored or shared; created: saved
    cache_tier: str | None = None  # where a restored row came from: ram, shm or disk
    thinking: list[str] = field(default_factory=list)  # each closed thinking block
    tool_calls: list[str] = field(default_factory=list)  # each tool call's exact text
    stats: Stats = field(default_factory=Stats)
    verify: dict[str, Any] | None = None  # a speculative verify: accepted, next_token, eos

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CompletionResult:
        fk = d.get("finish_key")
        return cls(
            reply=d.get("reply", ""),
            generated=list(d.get("generated", [])),
            context_tokens=list(d.get("context_tokens", [])),
            committed_tokens=int(d.get("committed_tokens", 0)),
            finish_reason=d.get("finish_reason", ""),
            stop_sequence=d.get("stop_sequence"),
            finish_key=fk.hex() if isinstance(fk, bytes) else fk,
            cache_hit_kind=d.get("cache_hit_kind"),
            cache_delta=dict(d.get("cache_delta") or {}),
            cache_tier=d.get("cache_tier"),
            thinking=list(d.get("thinking") or []),
            tool_calls=list(d.get("tool_calls") or []),
            stats=Stats.from_wire(d.get("stats") or {}),
            verify=d.get("verify"),
        )


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
