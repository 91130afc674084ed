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

import ctypes
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from erllama.cachestore.client import CacheClient, LoadedRow
from erllama.cachestore.codec import row_key
from erllama.logsetup import CURRENT_REQUEST, about_request
from erllama.protocol import CacheHitKind, CacheTier, ErllamaError, SaveOutcome, SaveReason
from erllama.worker.kvrow import BadRow, RowParts

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S: Final = 0.5
SAVE_TIMEOUT_S: Final = 10.0
STORE_BACKOFF_S: Final = 5.0  # after a timeout, how long the store is not asked again
MAX_PENDING_SAVE_BYTES: Final = 512 * 1024 * 1024  # KV copies waiting for the saver thread, beyond the first
BUDGETS_REFRESH_S: Final = 30.0
# A client resending a conversation at once (an HTTP chat client, every turn) asks for the row the
# previous turn's finish save is still handing to the store. Waiting this long at most for such a save
# costs far less than prefilling the turn again; saves of other prompts are never waited for.
PREFIX_SAVE_WAIT_S: Final = 0.5  # how often the saver asks the store for its tier budgets


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


@dataclass(frozen=True, slots=True)
class RowLimits:
    """Which stored rows a request can use (see ``Placement.limits``): at most ``max_len`` tokens,
    extending at most ``max_overhang`` tokens past the prompt (None: any), and, when ``needs_logits``, a
    row as long as the prompt only if it carries its next-token logits."""

    max_len: int
    max_overhang: int | None
    needs_logits: bool


@dataclass(slots=True)
class Found:
    """A leased row to restore: its first ``common`` tokens equal the prompt's. ``state`` points into the
    row's memory: restore it before ``close()``."""

    row: LoadedRow
    parts: RowParts
    common: int
    kind: CacheHitKind
    from_parent: bool
    tier: CacheTier  # where the row came from: its tier, or ``shared`` if the store fetched it for us

    @property
    def n_tokens(self) -> int:
        return len(self.row.tokens)

    @property
    def state(self) -> ctypes.Array[ctypes.c_uint8]:
        return self.parts.state_array(self.row.payload_array)

    @property
    def logits(self) -> bytes | None:
        return self.parts.logits(self.row.payload)

    def close(self, bad: bool = False) -> None:
        self.row.close(bad)


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
    saves_too_large: int = 0  # larger than any tier of the store: never copied
    restored_tokens: int = 0
    lookup_ns: int = 0  # time in lookups and loads (store round trips, mapping the row)
    restore_ns: int = 0  # time copying restored rows' state into llama.cpp (hits only)


@dataclass(slots=True)
class _Save:
    fingerprint: bytes  # taken when the save was queued: the adapter set may change before it is written
    tokens: list[int]
    parts: tuple[bytes | bytearray, ...]
    nbytes: int
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
        self._saving: _Save | None = None  # the save the saver thread is handing over now
        self._pending_bytes = 0
        self._max_row_bytes: int | None = None  # the store's largest tier budget, once known
        self._cond = threading.Condition()
        self._closing = False
        self._saver = threading.Thread(target=self._save_loop, name="erllama-cache-saver", daemon=True)
        self._saver.start()

    # --- admission -----------------------------------------------------------------------------------------

    def key_hex(self, tokens: list[int]) -> str:
        return row_key(self.fingerprint, tokens).hex()

    def find(self, prompt: list[int], parent_key: str | None, limits: RowLimits) -> Found | None:
        """The longest usable cached prefix of ``prompt``, leased and mapped; the caller restores it and
        closes the row. ``parent_key`` (an earlier ``finish_key``) is tried first; when it is gone or
        unusable the longest-prefix lookup follows, never straight to cold. Hits are counted by
        ``count_hit`` once the row is in place: a row that does not restore is no hit."""
        if time.monotonic() < self._down_until:
            return None
        self._wait_for_prefix_saves(prompt)
        self.counters.lookups += 1
        try:
            if parent_key is not None:
                found = self._from_parent(prompt, bytes.fromhex(parent_key), limits)
                if found is not None:
                    return found
            found = self._longest(prompt, limits.max_len, limits)
            if (
                found is not None
                and found.n_tokens == len(prompt)
                and limits.needs_logits
                and found.logits is None
            ):
                found.close()  # the whole prompt, but no logits to sample from: one token shorter will do
                found = self._longest(prompt, len(prompt) - 1, limits)
        except ErllamaError as err:
            self._store_trouble(err)
            return None
        if found is None:
            self.counters.misses += 1
        return found

    def _wait_for_prefix_saves(self, prompt: list[int]) -> None:
        """Let queued saves whose tokens start ``prompt`` reach the store before it is asked."""
        deadline = time.monotonic() + PREFIX_SAVE_WAIT_S
        with self._cond:
            while (left := deadline - time.monotonic()) > 0 and any(
                len(s.tokens) <= len(prompt) and prompt[: len(s.tokens)] == s.tokens
                for s in (*self._queue, *((self._saving,) if self._saving is not None else ()))
            ):
                self._cond.wait(left)

    def _longest(self, prompt: list[int], max_len: int, limits: RowLimits) -> Found | None:
        found = self._lookups.find(
            self.fingerprint,
            prompt,
            self.policy.min_tokens,
            min(max_len, limits.max_len),
            limits.max_overhang,
        )
        if found is None:
            return None
        hit, row = found
        if row.tokens[: hit.common_len] != prompt[: hit.common_len] or row.fingerprint != self.fingerprint:
            log.error("the store answered a row that does not match the prompt; ignoring it")
            row.close()
            return None
        kind = CacheHitKind.EXACT if hit.common_len >= len(prompt) else CacheHitKind.PARTIAL
        return self._open(row, hit.common_len, kind, from_parent=False, tier=hit.tier)

    def _from_parent(self, prompt: list[int], key: bytes, limits: RowLimits) -> Found | None:
        row = self._lookups.load(key)
        if row is None:
            return None
        n = len(row.tokens)
        if (
            row.fingerprint != self.fingerprint
            or n > min(len(prompt), limits.max_len)
            or prompt[:n] != row.tokens
        ):
            row.close()
            return None
        found = self._open(
            row,
            n,
            CacheHitKind.EXACT if n == len(prompt) else CacheHitKind.PARTIAL,
            from_parent=True,
            tier=row.tier,
        )
        if found is not None and n == len(prompt) and limits.needs_logits and found.logits is None:
            found.close()
            return None
        return found

    def _open(
        self, row: LoadedRow, common: int, kind: CacheHitKind, from_parent: bool, tier: CacheTier
    ) -> Found | None:
        try:
            parts = RowParts.parse(row.payload)
        except BadRow as exc:
            log.warning("row %s is not a row this worker can read (%s); dropping it", row.key.hex()[:16], exc)
            row.close(bad=True)
            return None
        return Found(row, parts, common, kind, from_parent, tier)

    def count_hit(self, found: Found, restored_tokens: int, copy_ns: int) -> None:
        """A row was restored and kept: count it, the tokens it spared and the time its state copy took."""
        c = self.counters
        c.restore_ns += copy_ns
        if found.from_parent:
            c.hits_parent += 1
        elif found.kind is CacheHitKind.EXACT:
            c.hits_exact += 1
        else:
            c.hits_partial += 1
        c.restored_tokens += restored_tokens

    def _store_trouble(self, err: ErllamaError) -> None:
        self.counters.lookup_errors += 1
        self._down_until = time.monotonic() + STORE_BACKOFF_S
        log.warning("cache store unavailable (%s); serving without it for %.0f s", err, STORE_BACKOFF_S)

    # --- saves ---------------------------------------------------------------------------------------------

    def accepting(self, nbytes: int) -> bool:
        """Whether a save of ``nbytes`` now would be kept: the scheduler asks before it copies any KV. A
        row larger than every tier of the store is never copied (and counted); otherwise one row may
        always wait for the saver, more only within ``MAX_PENDING_SAVE_BYTES``."""
        if self._max_row_bytes is not None and nbytes > self._max_row_bytes:
            self.counters.saves_too_large += 1
            return False
        if time.monotonic() < self._down_until:
            return False
        return self._pending_bytes == 0 or self._pending_bytes + nbytes <= MAX_PENDING_SAVE_BYTES

    def save(self, tokens: list[int], parts: tuple[bytes | bytearray, ...], reason: SaveReason) -> str | None:
        """Queue a row (its payload in ``parts``) for the saver thread under the fingerprint in effect
        now. Returns its key (hex), or None if it was dropped."""
        nbytes = sum(len(p) for p in parts)
        with self._cond:
            if not self.accepting(nbytes):
                self.counters.saves_dropped += 1
                return None
            self._queue.append(_Save(self.fingerprint, tokens, parts, nbytes, reason))
            self._pending_bytes += nbytes
            self.counters.saves_queued += 1
            self._cond.notify_all()  # the saver thread, and not only: an admission may wait for saves
        return self.key_hex(tokens)

    def _save_loop(self) -> None:
        client = CacheClient(self.endpoint, timeout_s=SAVE_TIMEOUT_S)
        budgets_at = 0.0
        try:
            while True:
                with self._cond:
                    idle = not self._queue
                if idle and time.monotonic() - budgets_at >= BUDGETS_REFRESH_S:
                    # Asked only while no save waits: a save must never queue behind it.
                    budgets_at = time.monotonic()
                    self._refresh_budgets(client)
                with self._cond:
                    if not self._queue and not self._closing:
                        self._cond.wait(BUDGETS_REFRESH_S)
                    if not self._queue:
                        if self._closing:
                            return
                        continue
                    item = self._saving = self._queue.popleft()
                with about_request(item.rid):
                    try:
                        outcome = client.save(item.fingerprint, item.tokens, item.parts, item.reason)
                        log.info(
                            "%s save of %d tokens: %s", item.reason.value, len(item.tokens), outcome.value
                        )
                    except ErllamaError as err:
                        outcome = SaveOutcome.DROPPED
                        self._down_until = time.monotonic() + STORE_BACKOFF_S
                        log.warning("save dropped: %s", err)
                with self._cond:
                    self._saving = None
                    self._cond.notify_all()  # an admission may wait for this row (_wait_for_prefix_saves)
                    self._pending_bytes -= item.nbytes
                    if outcome is SaveOutcome.STORED:
                        self.counters.saves_stored += 1
                    elif outcome is SaveOutcome.ALREADY_PRESENT:
                        self.counters.saves_already_present += 1
                    elif outcome is SaveOutcome.DROPPED:
                        self.counters.saves_dropped += 1
        finally:
            client.close()

    def _refresh_budgets(self, client: CacheClient) -> None:
        """The largest row the store could keep: its largest enabled tier (asked on the saver's thread,
        so a slow store never delays a decode)."""
        try:
            tiers = client.stats().get("tiers", {})
        except ErllamaError:
            return
        budgets = [t.get("budget", 0) for t in tiers.values() if isinstance(t, dict) and t.get("enabled")]
        self._max_row_bytes = max(budgets, default=0)

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
