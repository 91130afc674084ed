"""What a request streams: reply text, thinking deltas and tool-call deltas, from sampled tokens.

Without span markers every token is reply text (``textstream.py`` holds back split characters
and possible stop strings). With markers, a ``SpanAutomaton`` (``markers.py``) classifies each
token first: reply text goes through the stop-string stream, thinking and tool-call bytes
through UTF-8 decoders of their own, and each closed span adds one end event (a thinking
block's HMAC signature, or a tool call's exact bytes). Every token stays in the request's
context whatever its span: the automaton classifies, it never removes.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Final

from erllama.worker.markers import EventKind, SamplerKind, SpanAutomaton, SpanEvent
from erllama.worker.textstream import TextStream

TEXT: Final = "text"
THINKING: Final = "thinking"
TOOL_CALL: Final = "tool_call"
THINKING_END: Final = "thinking_end"
TOOL_CALL_END: Final = "tool_call_end"


@dataclass(slots=True)
class OutEvent:
    """One streamed event: ``kind`` is text, thinking or tool_call (deltas), or thinking_end /
    tool_call_end (``text`` is the whole tool call; ``signature`` signs a thinking block)."""

    kind: str
    text: str
    token_ids: list[int]
    signature: bytes = b""


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


@dataclass(slots=True)
class RequestOutput:
    text: TextStream
    spans: SpanAutomaton | None = None
    thinking: list[str] = field(default_factory=list)  # each closed thinking block
    tool_calls: list[str] = field(default_factory=list)  # each tool call's exact text
    _thinking_dec: codecs.IncrementalDecoder = field(default_factory=_decoder)
    _tool_dec: codecs.IncrementalDecoder = field(default_factory=_decoder)

    @property
    def greedy_next(self) -> bool:
        """Tool-call syntax is sampled greedily, so a call is byte-deterministic from its prefix."""
        return self.spans is not None and self.spans.sampler_kind is SamplerKind.GREEDY

    @property
    def matched_stop(self) -> str | None:
        return self.text.matched_stop

    def feed(self, token: int, piece: bytes) -> list[OutEvent]:
        if self.spans is None:
            return [OutEvent(TEXT, self.text.feed(piece), [token])]
        out: list[OutEvent] = []
        for ev in self.spans.feed(token, piece):
            self._convert(ev, out)
        return out

    def finish(self) -> list[OutEvent]:
        """Close what is open at the end of generation: a span the model never closed, held text."""
        out: list[OutEvent] = []
        if self.spans is not None:
            for ev in self.spans.finish():
                self._convert(ev, out)
        tail = self.text.flush()
        if tail:
            out.append(OutEvent(TEXT, tail, []))
        return out

    def _convert(self, ev: SpanEvent, out: list[OutEvent]) -> None:
        ids = list(ev.token_ids)
        if ev.kind is EventKind.TEXT:
            out.append(OutEvent(TEXT, self.text.feed(ev.data), ids))
        elif ev.kind in (EventKind.THINKING_START, EventKind.THINKING_DELTA):
            # The markers' own bytes are not thinking content; their token ids are still reported.
            text = self._thinking_dec.decode(ev.data) if ev.kind is EventKind.THINKING_DELTA else ""
            out.append(OutEvent(THINKING, text, ids))
        elif ev.kind is EventKind.THINKING_END:
            out.append(OutEvent(THINKING, self._thinking_dec.decode(b"", final=True), ids))
            block = ev.span.decode("utf-8", errors="replace")
            self.thinking.append(block)
            out.append(OutEvent(THINKING_END, block, [], ev.signature))
        elif ev.kind in (EventKind.TOOL_CALL_START, EventKind.TOOL_CALL_DELTA):
            out.append(OutEvent(TOOL_CALL, self._tool_dec.decode(ev.data), ids))
        elif ev.kind is EventKind.TOOL_CALL_END:
            # Deltas include the markers, so together they are exactly the call's bytes.
            out.append(OutEvent(TOOL_CALL, self._tool_dec.decode(ev.data, final=True), ids))
            call = ev.span.decode("utf-8", errors="replace")
            self.tool_calls.append(call)
            out.append(OutEvent(TOOL_CALL_END, call, []))
