"""Turning sampled token bytes into streamed text: whole UTF-8 characters, stop strings cut.

Two things hold text back. A multi-byte character split across tokens is held until it is
complete (the incremental decoder does this), so every event is valid UTF-8. And the tail of
the text that could still be the beginning of a stop string is held until it either completes
the stop (then it and everything after it are dropped) or can no longer match (then it is
released). Nothing else is delayed.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass(slots=True)
class TextStream:
    stops: tuple[str, ...] = ()
    emitted: list[str] = field(default_factory=list)
    matched_stop: str | None = None
    _held: str = ""
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that may be sent now (possibly empty)."""
        if self.matched_stop is not None:
            return ""
        text = self._held + self._decoder.decode(piece)
        if not self.stops:
            self._held = ""
            return self._emit(text)
        cut, stop = self._leftmost_stop(text)
        if stop is not None:
            self.matched_stop = stop
            self._held = ""
            return self._emit(text[:cut])
        keep = self._stop_prefix_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return self._emit(text[: len(text) - keep])

    def flush(self) -> str:
        """At the end of generation: release what was held for a stop that never completed."""
        if self.matched_stop is not None:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return self._emit(text)

    @property
    def text(self) -> str:
        return "".join(self.emitted)

    def _emit(self, text: str) -> str:
        if text:
            self.emitted.append(text)
        return text

    def _leftmost_stop(self, text: str) -> tuple[int, str | None]:
        """The earliest occurrence of any stop; at equal positions the longest stop wins."""
        best_at, best = len(text) + 1, None
        for stop in self.stops:
            at = text.find(stop)
            if at != -1 and (at < best_at or (at == best_at and best is not None and len(stop) > len(best))):
                best_at, best = at, stop
        return best_at, best

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
