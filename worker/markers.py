"""Thinking and tool-call spans: a per-request automaton over sampled token ids.

A model's markers (``thinking_markers`` start/end, ``tool_call_markers`` start/end and optional
payload_start/payload_end) are tokenized once at load into token-id sequences (``MarkerSpec``).
Each request gets a ``SpanAutomaton``; the scheduler feeds it every sampled token, in order, with
that token's bytes, and gets back ``SpanEvent``s that classify every token exactly once:

    TEXT               an ordinary output token
    THINKING_START     the tokens of a thinking start marker
    THINKING_DELTA     a token inside a thinking block
    THINKING_END       the tokens of a thinking end marker (or none: a synthetic end), with the
                       block's bytes (``span``) and their HMAC-SHA256 ``signature``
    TOOL_CALL_START    the tokens of a tool-call start marker
    TOOL_CALL_DELTA    a token inside a tool call: ``role`` says syntax, payload, or a payload marker
    TOOL_CALL_END      the tokens of a tool-call end marker (or none: synthetic), with ``span`` =
                       every byte of the call from its start marker through its end marker

Markers match as WHOLE token-id sequences. While the tokens seen so far are a proper prefix of a
marker that can start in the current state, they are held back (no event yet); when the next
token completes the marker it fires, and when it diverges the first held token is released as an
ordinary token of the current state and the rest are matched again from scratch. That is exactly
leftmost matching over the whole stream, done online. A marker may have several tokenizations
(``MarkerSpec`` takes alternatives), because a model may spell the same text with other tokens.

The automaton only classifies: every token it is fed stays in the request's token stream and KV
cache; nothing is dropped. Concatenating ``data`` of all events, in order, gives back the bytes
fed, and concatenating ``token_ids`` gives back the ids fed.

``sampler_kind`` tells which sampler picks the NEXT token: ``GREEDY`` inside tool-call syntax
(so names and braces are deterministic), ``REQUEST`` (the request's own sampler) everywhere else,
including tool-call payloads and thinking.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from erllama.protocol import ErllamaError, ErrorCode

TokenSeq = tuple[int, ...]
Held = tuple[int, bytes]


class SpanState(enum.Enum):
    """Where the stream is: it decides which markers can match and how a plain token is classified."""

    TEXT = "text"
    THINKING = "thinking"
    TOOL_SYNTAX = "tool_syntax"
    TOOL_PAYLOAD = "tool_payload"


class MarkerKind(enum.Enum):
    THINKING_START = "thinking_start"
    THINKING_END = "thinking_end"
    TOOL_START = "tool_start"
    TOOL_END = "tool_end"
    PAYLOAD_START = "payload_start"
    PAYLOAD_END = "payload_end"


class EventKind(enum.Enum):
    TEXT = "text"
    THINKING_START = "thinking_start"
    THINKING_DELTA = "thinking_delta"
    THINKING_END = "thinking_end"
    TOOL_CALL_START = "tool_call_start"
    TOOL_CALL_DELTA = "tool_call_delta"
    TOOL_CALL_END = "tool_call_end"


class TokenRole(enum.Enum):
    """What the tokens of one event are."""

    TEXT = "text"
    THINKING = "thinking"
    MARKER = "marker"  # tokens of a marker (any kind)
    TOOL_SYNTAX = "tool_syntax"
    TOOL_PAYLOAD = "tool_payload"


class SamplerKind(enum.Enum):
    REQUEST = "request"  # the request's own sampler chain
    GREEDY = "greedy"  # argmax: tool-call syntax


@dataclass(frozen=True, slots=True)
class SpanEvent:
    """One classified run of tokens. ``data`` is their bytes; aggregates ride on the *_END events."""

    kind: EventKind
    role: TokenRole
    token_ids: TokenSeq = ()
    data: bytes = b""
    span: bytes = b""  # THINKING_END: the block's thinking bytes; TOOL_CALL_END: the whole call's bytes
    signature: bytes = b""  # THINKING_END: HMAC-SHA256(key, span), b"" without a key
    synthetic: bool = False  # an *_END made by the automaton (budget reached, or finish() inside a span)


_STATE_MARKERS: dict[SpanState, tuple[MarkerKind, ...]] = {
    SpanState.TEXT: (MarkerKind.THINKING_START, MarkerKind.TOOL_START),
    SpanState.THINKING: (MarkerKind.THINKING_END,),
    SpanState.TOOL_SYNTAX: (MarkerKind.TOOL_END, MarkerKind.PAYLOAD_START),
    # tool_end also closes a payload: some formats (Kimi-K2's argument section) have no payload end.
    SpanState.TOOL_PAYLOAD: (MarkerKind.PAYLOAD_END, MarkerKind.TOOL_END),
}


_TOOL_KINDS: tuple[MarkerKind, ...] = (
    MarkerKind.TOOL_START,
    MarkerKind.TOOL_END,
    MarkerKind.PAYLOAD_START,
    MarkerKind.PAYLOAD_END,
)
_MARKER_OPTION_KEYS: dict[str, tuple[str, ...]] = {
    "thinking_markers": ("start", "end"),
    "tool_call_markers": ("start", "end", "payload_start", "payload_end"),
}


def _seqs(value: Any, what: str) -> tuple[TokenSeq, ...]:
    """One token sequence, or several alternatives, as a tuple of non-empty int tuples."""
    if value is None:
        return ()
    items = [value] if value and all(isinstance(t, int) for t in value) else list(value)
    out: list[TokenSeq] = []
    for seq in items:
        seq = tuple(seq)
        if not seq or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in seq):
            raise ValueError(f"{what}: a marker is a non-empty sequence of token ids, got {seq!r}")
        if seq not in out:
            out.append(seq)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class MarkerSpec:
    """A model's markers as token-id sequences (each a tuple of alternative tokenizations).

    Build it with ``from_ids`` or ``from_text``. Within one state no marker sequence may be a
    prefix of another (the match would be ambiguous without lookahead); that is a ValueError.
    """

    markers: dict[MarkerKind, tuple[TokenSeq, ...]] = field(default_factory=dict)

    @classmethod
    def from_ids(
        cls,
        *,
        thinking: tuple[Any, Any] | None = None,
        tool_call: tuple[Any, Any, Any, Any] | tuple[Any, Any] | None = None,
    ) -> MarkerSpec:
        """``thinking=(start, end)``, ``tool_call=(start, end[, payload_start, payload_end])``; each
        item is a token-id sequence or a list of alternative sequences."""
        m: dict[MarkerKind, tuple[TokenSeq, ...]] = {}
        if thinking is not None:
            m[MarkerKind.THINKING_START] = _seqs(thinking[0], "thinking start")
            m[MarkerKind.THINKING_END] = _seqs(thinking[1], "thinking end")
            if not m[MarkerKind.THINKING_START] or not m[MarkerKind.THINKING_END]:
                raise ValueError("thinking markers need both start and end")
        if tool_call is not None:
            parts = tuple(tool_call) + (None,) * (4 - len(tool_call))
            for kind, value in zip(_TOOL_KINDS, parts, strict=True):
                seqs = _seqs(value, kind.value)
                if seqs:
                    m[kind] = seqs
            if MarkerKind.TOOL_START not in m or MarkerKind.TOOL_END not in m:
                raise ValueError("tool-call markers need both start and end")
            if MarkerKind.PAYLOAD_END in m and MarkerKind.PAYLOAD_START not in m:
                raise ValueError("a payload end marker needs a payload start marker")
        spec = cls(m)
        spec._check_prefix_free()
        return spec

    @classmethod
    def from_text(
        cls,
        tokenize: Callable[[str], Sequence[int] | Sequence[Sequence[int]]],
        thinking_markers: dict[str, str] | None = None,
        tool_call_markers: dict[str, str] | None = None,
    ) -> MarkerSpec:
        """From erllama-style load options: ``{"start", "end"}`` and ``{"start", "end",
        "payload_start"?, "payload_end"?}``. ``tokenize`` maps a marker's text to its token ids, or
        to a list of alternative spellings (see ``marker_spellings``). Bad options are ``invalid_params``."""

        def toks(opts: dict[str, str], key: str, name: str) -> Any:
            text = opts.get(key)
            if text is None:
                return None
            if not isinstance(text, str) or not text:
                raise ErllamaError(ErrorCode.INVALID_PARAMS, f"{name}.{key}: expected a non-empty string")
            ids = tokenize(text)
            if not ids:
                raise ErllamaError(ErrorCode.INVALID_PARAMS, f"{name}.{key}: {text!r} tokenizes to nothing")
            return ids

        for name, opts in (("thinking_markers", thinking_markers), ("tool_call_markers", tool_call_markers)):
            if opts is not None and not isinstance(opts, dict):
                raise ErllamaError(ErrorCode.INVALID_PARAMS, f"{name}: expected a map")
            unknown = sorted(str(k) for k in (opts or {}) if k not in _MARKER_OPTION_KEYS[name])
            if unknown:
                raise ErllamaError(ErrorCode.INVALID_PARAMS, f"{name}: unknown key {unknown[0]!r}")
        try:
            th = tc = None
            if thinking_markers:
                th = (
                    toks(thinking_markers, "start", "thinking_markers"),
                    toks(thinking_markers, "end", "thinking_markers"),
                )
            if tool_call_markers:
                keys = _MARKER_OPTION_KEYS["tool_call_markers"]
                tc = tuple(toks(tool_call_markers, k, "tool_call_markers") for k in keys)
            return cls.from_ids(thinking=th, tool_call=tc)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"markers: {exc}") from None

    @property
    def has_thinking(self) -> bool:
        return MarkerKind.THINKING_START in self.markers

    @property
    def has_tool_calls(self) -> bool:
        return MarkerKind.TOOL_START in self.markers

    def _check_prefix_free(self) -> None:
        for state, kinds in _STATE_MARKERS.items():
            seqs = [(k, s) for k in kinds for s in self.markers.get(k, ())]
            for i, (ka, a) in enumerate(seqs):
                for kb, b in seqs[i + 1 :]:
                    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
                    if long_[: len(short)] == short:
                        raise ValueError(
                            f"markers {ka.value} {a} and {kb.value} {b} are ambiguous in state {state.value}: "
                            "one is a prefix of the other"
                        )


@dataclass(slots=True)
class _Table:
    """The markers that can match in one state: complete sequences and their proper prefixes."""

    full: dict[TokenSeq, MarkerKind]
    prefixes: frozenset[TokenSeq]


def _table(markers: dict[MarkerKind, tuple[TokenSeq, ...]], kinds: Sequence[MarkerKind]) -> _Table:
    full = {seq: k for k in kinds for seq in markers.get(k, ())}
    prefixes = frozenset(seq[:n] for seq in full for n in range(1, len(seq)))
    return _Table(full, prefixes)


MAX_SPELLINGS = 512


def marker_spellings(
    text: str, canonical: Sequence[int], pieces: dict[bytes, list[int]], limit: int = MAX_SPELLINGS
) -> list[TokenSeq]:
    """Every token sequence that spells ``text`` exactly, the canonical tokenization first.

    A model need not emit a marker the way the tokenizer would write it: sampling (a grammar
    above all) can pick ``<`` ``th`` ``ink`` ``>`` where the tokenizer says ``<`` ``think`` ``>``.
    A marker is therefore matched as any whole token sequence whose pieces concatenate to its
    bytes. ``pieces`` maps token bytes to the ids that have them; the shortest spellings are kept
    when there are more than ``limit``.
    """
    data = text.encode()
    # paths[i]: the spellings of data[:i]
    paths: list[list[TokenSeq]] = [[] for _ in range(len(data) + 1)]
    paths[0] = [()]
    for i in range(len(data)):
        if not paths[i]:
            continue
        for j in range(i + 1, len(data) + 1):
            for tok in pieces.get(data[i:j], ()):
                paths[j].extend(p + (tok,) for p in paths[i])
        paths[i + 1 :] = [sorted(ps, key=len)[: limit * 4] for ps in paths[i + 1 :]]
    out = [tuple(canonical)] if canonical else []
    out += [p for p in sorted(paths[-1], key=len) if p != tuple(canonical)]
    return out[:limit]


def sign_thinking(key: bytes, thinking: bytes) -> bytes:
    """HMAC-SHA256 of a thinking block's bytes; b"" when no key is configured."""
    return hmac.new(key, thinking, hashlib.sha256).digest() if key else b""


@dataclass(slots=True)
class SpanAutomaton:
    """Per-request span classifier. Not thread-safe (one scheduler thread drives it).

    ``thinking``: the request opted in; without it thinking markers are ordinary text.
    ``tool_calls``: tool-call markers are recognised (default on when the model has them).
    ``thinking_budget_tokens``: after this many thinking tokens (over the whole request) the block
    is closed by a synthetic THINKING_END; later thinking-looking output, including the model's own
    end marker, is ordinary text and no block opens again. None means no cap.
    ``start_in_thinking``: the prompt already opened a thinking block (templates that end the
    generation prompt with the start marker).
    """

    spec: MarkerSpec
    thinking: bool = False
    tool_calls: bool = True
    thinking_budget_tokens: int | None = None
    signing_key: bytes = b""
    start_in_thinking: bool = False
    state: SpanState = field(default=SpanState.TEXT, init=False)
    thinking_tokens: int = field(default=0, init=False)  # thinking content tokens so far (the budget's count)
    capped: bool = field(default=False, init=False)
    finished: bool = field(default=False, init=False)
    _held: list[Held] = field(default_factory=list, init=False)
    _tables: dict[SpanState, _Table] = field(default_factory=dict, init=False)
    _thinking_buf: bytearray = field(default_factory=bytearray, init=False)
    _tool_buf: bytearray = field(default_factory=bytearray, init=False)

    def __post_init__(self) -> None:
        b = self.thinking_budget_tokens
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError("thinking_budget_tokens must be a positive integer or None")
        self._build_tables()
        if self.start_in_thinking and self.thinking and self.spec.has_thinking:
            self.state = SpanState.THINKING

    # --- public ----------------------------------------------------------------------------------------

    @property
    def sampler_kind(self) -> SamplerKind:
        """The sampler for the next token."""
        return SamplerKind.GREEDY if self.state is SpanState.TOOL_SYNTAX else SamplerKind.REQUEST

    @property
    def held_tokens(self) -> int:
        """Tokens fed but not yet classified (a possible marker in progress)."""
        return len(self._held)

    def feed(self, token_id: int, token_bytes: bytes) -> list[SpanEvent]:
        """Classify one sampled token; returns the events it completes (possibly none, possibly
        several: a diverging marker prefix releases held tokens)."""
        if self.finished:
            raise RuntimeError("feed() after finish()")
        out: list[SpanEvent] = []
        self._run(deque([(token_id, token_bytes)]), out)
        return out

    def finish(self) -> list[SpanEvent]:
        """End of generation: release held tokens and close an open span with a synthetic end."""
        if self.finished:
            return []
        out: list[SpanEvent] = []
        while self._held:
            first, rest = self._held[0], self._held[1:]
            self._held = []
            self._ordinary(first, out)
            self._run(deque(rest), out)
        if self.state is SpanState.THINKING:
            self._close_thinking((), b"", out, synthetic=True)
        elif self.state in (SpanState.TOOL_SYNTAX, SpanState.TOOL_PAYLOAD):
            self._close_tool((), b"", out, synthetic=True)
        self.finished = True
        return out

    # --- matching --------------------------------------------------------------------------------------

    def _build_tables(self) -> None:
        m = self.spec.markers
        text_kinds: list[MarkerKind] = []
        if self.thinking and not self.capped:
            text_kinds.append(MarkerKind.THINKING_START)
        if self.tool_calls:
            text_kinds.append(MarkerKind.TOOL_START)
        self._tables = {
            SpanState.TEXT: _table(m, text_kinds),
            SpanState.THINKING: _table(m, _STATE_MARKERS[SpanState.THINKING]),
            SpanState.TOOL_SYNTAX: _table(m, _STATE_MARKERS[SpanState.TOOL_SYNTAX]),
            SpanState.TOOL_PAYLOAD: _table(m, _STATE_MARKERS[SpanState.TOOL_PAYLOAD]),
        }

    def _run(self, queue: deque[Held], out: list[SpanEvent]) -> None:
        while queue:
            self._held.append(queue.popleft())
            ids = tuple(t for t, _ in self._held)
            table = self._tables[self.state]
            kind = table.full.get(ids)
            if kind is not None:
                data = b"".join(d for _, d in self._held)
                self._held = []
                self._fire(kind, ids, data, out)
            elif ids in table.prefixes:
                continue
            else:
                # The held run is no marker: its first token is ordinary; the rest may still start one.
                first, rest = self._held[0], self._held[1:]
                self._held = []
                self._ordinary(first, out)
                queue.extendleft(reversed(rest))

    def _fire(self, kind: MarkerKind, ids: TokenSeq, data: bytes, out: list[SpanEvent]) -> None:
        if kind is MarkerKind.THINKING_START:
            self.state = SpanState.THINKING
            self._thinking_buf = bytearray()
            out.append(SpanEvent(EventKind.THINKING_START, TokenRole.MARKER, ids, data))
        elif kind is MarkerKind.THINKING_END:
            self._close_thinking(ids, data, out, synthetic=False)
        elif kind is MarkerKind.TOOL_START:
            self.state = SpanState.TOOL_SYNTAX
            self._tool_buf = bytearray(data)
            out.append(SpanEvent(EventKind.TOOL_CALL_START, TokenRole.MARKER, ids, data))
        elif kind is MarkerKind.TOOL_END:
            self._close_tool(ids, data, out, synthetic=False)
        else:  # payload markers are part of the call's bytes
            self.state = SpanState.TOOL_PAYLOAD if kind is MarkerKind.PAYLOAD_START else SpanState.TOOL_SYNTAX
            self._tool_buf += data
            out.append(SpanEvent(EventKind.TOOL_CALL_DELTA, TokenRole.MARKER, ids, data))

    def _ordinary(self, tok: Held, out: list[SpanEvent]) -> None:
        tid, data = tok
        if self.state is SpanState.TEXT:
            out.append(SpanEvent(EventKind.TEXT, TokenRole.TEXT, (tid,), data))
        elif self.state is SpanState.THINKING:
            self._thinking_buf += data
            self.thinking_tokens += 1
            out.append(SpanEvent(EventKind.THINKING_DELTA, TokenRole.THINKING, (tid,), data))
            if (
                self.thinking_budget_tokens is not None
                and self.thinking_tokens >= self.thinking_budget_tokens
            ):
                self.capped = True
                self._close_thinking((), b"", out, synthetic=True)
                self._build_tables()  # no thinking block opens again
        else:
            role = TokenRole.TOOL_SYNTAX if self.state is SpanState.TOOL_SYNTAX else TokenRole.TOOL_PAYLOAD
            self._tool_buf += data
            out.append(SpanEvent(EventKind.TOOL_CALL_DELTA, role, (tid,), data))

    def _close_thinking(self, ids: TokenSeq, data: bytes, out: list[SpanEvent], *, synthetic: bool) -> None:
        span = bytes(self._thinking_buf)
        self._thinking_buf = bytearray()
        self.state = SpanState.TEXT
        out.append(
            SpanEvent(
                EventKind.THINKING_END,
                TokenRole.MARKER,
                ids,
                data,
                span=span,
                signature=sign_thinking(self.signing_key, span),
                synthetic=synthetic,
            )
        )

    def _close_tool(self, ids: TokenSeq, data: bytes, out: list[SpanEvent], *, synthetic: bool) -> None:
        self._tool_buf += data
        span = bytes(self._tool_buf)
        self._tool_buf = bytearray()
        self.state = SpanState.TEXT
        out.append(
            SpanEvent(EventKind.TOOL_CALL_END, TokenRole.MARKER, ids, data, span=span, synthetic=synthetic)
        )
