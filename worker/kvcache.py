"""The worker's side of the KV cache: finding a cached prefix at admission, and saving rows
without ever stalling a decode.

Lookups and loads run on the scheduler thread (a lookup is answered from the store's memory
in well under a millisecond; a load maps a file). Saves are split: the scheduler thread
copies the sequence's KV out (``llama_state_seq_get_data``, about 6 GB/s), and a saver thread
hands the bytes to the store (reserve, write, commit). A store that is slow or down costs
cache misses and dropped saves, both counted, never a stuck request: after a timeout the
store is left alone for a while.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from erllama.cachestore.client import CacheClient, LoadedRow
from erllama.cachestore.codec import row_key
from erllama.logsetup import CURRENT_REQUEST, about_request
from erllama.protocol import CacheHitKind, ErllamaError, SaveOutcome, SaveReason

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S: Final = 0.5
SAVE_TIMEOUT_S: Final = 10.0
STORE_BACKOFF_S: Final = 5.0  # after a timeout, how long the store is not asked again
MAX_PENDING_SAVE_BYTES: Final = 512 * 1024 * 1024  # KV copies waiting for the saver thread


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """What a model saves, validated at load (see ``LoadOptions``)."""

    min_tokens: int
    cold_trim_tokens: int
    cold_align_tokens: int
    continued_interval_tokens: int

    def cold_boundary(self, n_prompt: int) -> int:
        """Where a cold prompt is saved: trimmed (its last tokens may re-tokenize differently once
        text is appended) and aligned down, so a later prompt that shares the prefix but continues
        differently still finds it. 0 means no cold save."""
        b = (n_prompt - self.cold_trim_tokens) // self.cold_align_tokens * self.cold_align_tokens
        return b if b >= self.min_tokens else 0

    def cold_save_at(self, n_prompt: int, n_cached: int) -> int:
        """Where prefill pauses for a cold save of a prompt whose first ``n_cached`` tokens came from
        the cache (0: none). A prompt restored but for a few tokens is not saved again there: the
        finish save, or the first continued save, follows within ``continued_interval_tokens`` and
        covers more, and every save of a long context copies tens of MB on the decode thread (in a
        multi-turn benchmark, dropping it took mean TTFT from 0.23 to 1/6 of the cache-off run)."""
        b = self.cold_boundary(n_prompt)
        if b <= n_cached or (n_cached > 0 and b - n_cached < self.continued_interval_tokens):
            return 0
        return b


@dataclass(slots=True)
class Found:
    """A row to restore: its first ``common`` tokens equal the prompt's."""

    row: LoadedRow
    common: int
    kind: CacheHitKind


@dataclass(slots=True)
class CacheCounters:
    lookups: int = 0
    hits_exact: int = 0
    hits_partial: int = 0
    hits_parent: int = 0
    misses: int = 0
    lookup_errors: int = 0
    restore_failures: int = 0
    saves_queued: int = 0
    saves_stored: int = 0
    saves_already_present: int = 0
    saves_dropped: int = 0
    restored_tokens: int = 0


@dataclass(slots=True)
class _Save:
    tokens: list[int]
    payload: bytes | bytearray
    reason: SaveReason
    rid: int | None = field(default_factory=CURRENT_REQUEST.get)  # the request it saves, for the logs


class KVCache:
    """One model's view of the cache store. Not thread-safe except ``save`` and ``counters``."""

    def __init__(self, endpoint: str, fingerprint: bytes, policy: CachePolicy):
        self.endpoint = endpoint
        self.fingerprint = fingerprint
        self.policy = policy
        self.counters = CacheCounters()
        self._lookups = CacheClient(endpoint, timeout_s=LOOKUP_TIMEOUT_S)
        self._down_until = 0.0
        self._queue: deque[_Save] = deque()
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._saver = threading.Thread(target=self._save_loop, name="erllama-cache-saver", daemon=True)
        self._saver.start()

    # --- admission -----------------------------------------------------------------------------------------

    def key_hex(self, tokens: list[int]) -> str:
        return row_key(self.fingerprint, tokens).hex()

    def find(self, prompt: list[int], parent_key: str | None) -> Found | None:
        """The longest cached prefix of ``prompt``, leased and mapped; the caller restores it and
        closes the row. ``parent_key`` (an earlier ``finish_key``) is tried first; when it is gone
        or does not prefix the prompt the longest-prefix lookup follows, never straight to cold."""
        if time.monotonic() < self._down_until:
            return None
        self.counters.lookups += 1
        try:
            if parent_key is not None:
                found = self._from_parent(prompt, bytes.fromhex(parent_key))
                if found is not None:
                    self.counters.hits_parent += 1
                    return found
            hit = self._lookups.longest_prefix(self.fingerprint, prompt, self.policy.min_tokens)
            row = self._lookups.load(hit.key) if hit is not None else None
        except ErllamaError as err:
            self._store_trouble(err)
            return None
        if hit is None or row is None:
            self.counters.misses += 1
            return None
        if row.tokens[: hit.common_len] != prompt[: hit.common_len] or row.fingerprint != self.fingerprint:
            log.error("the store answered a row that does not match the prompt; ignoring it")
            row.close()
            self.counters.misses += 1
            return None
        kind = CacheHitKind.EXACT if hit.common_len >= len(prompt) else CacheHitKind.PARTIAL
        if kind is CacheHitKind.EXACT:
            self.counters.hits_exact += 1
        else:
            self.counters.hits_partial += 1
        return Found(row, hit.common_len, kind)

    def _from_parent(self, prompt: list[int], key: bytes) -> Found | None:
        row = self._lookups.load(key)
        if row is None:
            return None
        n = len(row.tokens)
        if row.fingerprint != self.fingerprint or n > len(prompt) or prompt[:n] != row.tokens:
            row.close()
            return None
        return Found(row, n, CacheHitKind.EXACT if n == len(prompt) else CacheHitKind.PARTIAL)

    def _store_trouble(self, err: ErllamaError) -> None:
        self.counters.lookup_errors += 1
        self._down_until = time.monotonic() + STORE_BACKOFF_S
        log.warning("cache store unavailable (%s); serving without it for %.0f s", err, STORE_BACKOFF_S)

    # --- saves ---------------------------------------------------------------------------------------------

    def accepting(self, nbytes_hint: int = 0) -> bool:
        """Whether a save now would be kept: lets the scheduler skip copying KV that would be dropped."""
        return (
            time.monotonic() >= self._down_until
            and self._pending_bytes + nbytes_hint <= MAX_PENDING_SAVE_BYTES
        )

    def save(self, tokens: list[int], payload: bytes | bytearray, reason: SaveReason) -> str | None:
        """Queue a row for the saver thread. Returns its key (hex), or None if it was dropped."""
        with self._cond:
            if not self.accepting(len(payload)):
                self.counters.saves_dropped += 1
                return None
            self._queue.append(_Save(tokens, payload, reason))
            self._pending_bytes += len(payload)
            self.counters.saves_queued += 1
            self._cond.notify()
        return self.key_hex(tokens)

    def _save_loop(self) -> None:
        client = CacheClient(self.endpoint, timeout_s=SAVE_TIMEOUT_S)
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        return
                    item = self._queue.popleft()
                with about_request(item.rid):
                    try:
                        outcome = client.save(self.fingerprint, item.tokens, item.payload, item.reason)
                        log.info(
                            "%s save of %d tokens: %s", item.reason.value, len(item.tokens), outcome.value
                        )
                    except ErllamaError as err:
                        outcome = SaveOutcome.DROPPED
                        self._down_until = time.monotonic() + STORE_BACKOFF_S
                        log.warning("save dropped: %s", err)
                with self._cond:
                    self._pending_bytes -= len(item.payload)
                    if outcome is SaveOutcome.STORED:
                        self.counters.saves_stored += 1
                    elif outcome is SaveOutcome.ALREADY_PRESENT:
                        self.counters.saves_already_present += 1
                    elif outcome is SaveOutcome.DROPPED:
                        self.counters.saves_dropped += 1
        finally:
            client.close()

    def flush(self, timeout_s: float = SAVE_TIMEOUT_S) -> bool:
        """Wait until every queued save has been handed over (used at shutdown and by tests)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                if not self._queue and self._pending_bytes == 0:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def stats(self) -> dict[str, Any]:
        return {name: getattr(self.counters, name) for name in CacheCounters.__slots__}  # type: ignore[attr-defined]

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._saver.join(timeout=SAVE_TIMEOUT_S)
        self._lookups.close()
