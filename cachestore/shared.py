"""The shared tier: rows on a Valkey/Redis server below the local tiers, found by other hosts' stores.

This side runs on the daemon's loop thread; every call to the server runs on one of two threads of its
own (``sharedkv``), one for writes and one for lookups, so that a slow upload never holds a lookup back
and the loop never waits on the network.

- **Writes.** Every row committed here is written behind (read by an I/O thread while pinned, then sent
  by the write thread), so that another host finds it at once; a row evicted from the coldest local tier that is not
  known to be there yet (its write-behind was skipped or failed, or it predates the tier) is written
  before its bytes are freed. Rows fetched from the tier are not written back. A failed write is logged
  and counted, never retried: the row is still local.
- **Lookups.** A prefix lookup that misses locally, or whose local hit is a block or more shorter than
  the query, is held while the lookup thread asks the server for the longest stored row that is a
  prefix of the query and longer than the local hit; a row found is verified, published into a local
  tier through the usual temp -> verify -> rename path, and the query is answered from the index with
  ``tier = shared``. If that takes longer than ``SHARED_LOOKUP_BUDGET_S`` the query is answered from the
  index as it is (the local hit, or a miss) and the fetch completes for the next one.
- **Faults.** Unreachable or slow: the tier is down for ``SHARED_RETRY_S`` (lookups miss at once, writes
  are skipped), then the next call is the reconnection. Wrong password: off for the daemon's life.
  Every fault is a miss or a dropped write, never an error to a worker.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Final

from erllama.cachestore.codec import CHECKSUM_OFFSET, USAGE_OFFSET, RowHeader, encode_usage
from erllama.cachestore.index import RowEntry
from erllama.cachestore.sharedkv import (
    FetchResult,
    PutResult,
    SharedAuthFailed,
    SharedDown,
    SharedFault,
    SharedKV,
    redact,
)
from erllama.cachestore.storage import Location, Storage
from erllama.cachestore.store import PrefixQuery, Replier, Store, entry_from_header, header_blocks
from erllama.protocol import MAX_ROW_TOKENS, CacheTier

log = logging.getLogger(__name__)

Submit = Callable[..., None]  # as ``store.Submit``: submit(fn, on_done, *args)

# The worker waits 0.5 s for a lookup (worker/kvcache.py LOOKUP_TIMEOUT_S): answer well before that.
SHARED_LOOKUP_BUDGET_S: Final = 0.25
SHARED_RETRY_S: Final = 2.0  # after the server failed, how long it is not asked
MAX_PENDING_LOOKUPS: Final = 64  # beyond this, local misses are answered at once
MAX_PENDING_WRITE_BYTES: Final = 256 * 1024 * 1024  # row images read and not yet sent; beyond: skipped


class SharedState(enum.StrEnum):
    CONNECTING = "connecting"  # configured, first answer not in yet
    UP = "up"
    DOWN = "down"  # the last call failed: retried after SHARED_RETRY_S
    OFF = "off"  # the server refused our credentials


@dataclass(slots=True)
class SharedCounters:
    """Monotonic since the daemon started; reported under ``stats()["shared"]``."""

    lookups: int = 0  # local misses asked of the server
    hits: int = 0  # lookups answered with a fetched row (and fetches that landed after a late answer)
    misses: int = 0  # asked, nothing usable there (or the server failed)
    late: int = 0  # answered without the shared tier because the budget ran out
    skipped_lookups: int = 0  # local misses not asked: tier down or too many lookups waiting
    writes: int = 0  # rows stored on the server
    writes_present: int = 0  # already there (another host, or an earlier life)
    writes_failed: int = 0
    writes_skipped: int = 0  # not attempted: tier down, or too many bytes waiting
    bytes_written: int = 0
    bytes_read: int = 0
    stale_manifests: int = 0  # parts evicted by the server: a miss, the manifest deleted
    corrupt_rows: int = 0  # failed verification after a fetch: a miss, deleted
    errors: int = 0  # failed calls (connection, timeout, server errors)


@dataclass(slots=True)
class _Lookup:
    reply: Replier
    query: PrefixQuery
    deadline: float  # time.monotonic()
    answered: bool = False


class SharedTier:
    """The loop-side half of the shared tier (``store.SharedHooks``)."""

    def __init__(
        self,
        url: str,
        store: Store,
        storage: Storage,
        submit_io: Submit,
        submit_get: Submit,
        submit_put: Submit,
    ):
        self.url = redact(url)
        self.store = store
        self.storage = storage
        self.kv = SharedKV(url)
        self.counters = SharedCounters()
        self.state = SharedState.CONNECTING
        self._submit_io = submit_io
        self._submit_get = submit_get
        self._submit_put = submit_put
        self._down_until = 0.0
        self._lookups: deque[_Lookup] = deque()
        self._write_bytes = 0
        self._ids = 0
        self._arriving: dict[bytes, list[_Lookup]] = {}  # fetched rows being published: who waits for each
        # Whether a writer holds a reservation for a key (``Publisher``): set by the server.
        self.busy_key: Callable[[bytes], bool] = lambda key: False

    def start(self) -> None:
        """Say hello to the server (off the loop): a wrong password turns the tier off now."""
        self._submit_get(self.kv.ping, self._pinged)

    def _pinged(self, fut: Future[None]) -> None:
        if self._ok(fut) and self.state is SharedState.UP:
            log.info("shared tier on %s", self.url)

    # --- health --------------------------------------------------------------------------------------------

    def _usable(self) -> bool:
        return self.state is not SharedState.OFF and time.monotonic() >= self._down_until

    def _ok(self, fut: Future[Any]) -> bool:
        """Whether a call succeeded; a failure changes the tier's state (and is logged once per change)."""
        exc = fut.exception()
        if exc is None:
            if self.state in (SharedState.DOWN, SharedState.CONNECTING):
                if self.state is SharedState.DOWN:
                    log.info("shared tier %s is reachable again", self.url)
                self.state = SharedState.UP
            return True
        self.counters.errors += 1
        if isinstance(exc, SharedAuthFailed):
            if self.state is not SharedState.OFF:
                log.error(
                    "shared tier off: %s refused the credentials (%s); check the password in the URL. "
                    "The local tiers work as before.",
                    self.url,
                    exc,
                )
            self.state = SharedState.OFF
        elif isinstance(exc, SharedDown):
            if self.state is not SharedState.DOWN and self.state is not SharedState.OFF:
                log.warning(
                    "shared tier %s unreachable (%s): lookups miss and writes are skipped; retrying every %.0f s",
                    self.url,
                    exc,
                    SHARED_RETRY_S,
                )
                self.state = SharedState.DOWN
            self._down_until = time.monotonic() + SHARED_RETRY_S
        elif isinstance(exc, SharedFault):
            log.warning("shared tier %s: a call failed: %s", self.url, exc)
        else:  # a bug, or a row that changed while it was read: this call only
            log.warning("shared tier: %s", exc)
        return False

    # --- lookups -------------------------------------------------------------------------------------------

    def lookup(self, reply: Replier, query: PrefixQuery, longer_than: int) -> bool:
        """Ask the server for a row longer than the local hit's ``longer_than`` tokens (True: ``reply``
        is answered later), or decline (False)."""
        if not self._usable() or len(self._lookups) >= MAX_PENDING_LOOKUPS:
            if self.state is not SharedState.OFF:
                self.counters.skipped_lookups += 1
            return False
        self.counters.lookups += 1
        pending = _Lookup(reply, query, time.monotonic() + SHARED_LOOKUP_BUDGET_S)
        self._lookups.append(pending)
        max_len = MAX_ROW_TOKENS if query.max_len is None else query.max_len
        self._submit_get(
            self.kv.fetch,
            lambda fut: self._fetched(pending, fut),
            query.fingerprint,
            query.token_bytes,
            max(query.min_len, longer_than + 1),
            max_len,
        )
        return True

    def next_deadline(self) -> float | None:
        """When the oldest held lookup runs out of time (for the loop's poll timeout)."""
        while self._lookups and self._lookups[0].answered:
            self._lookups.popleft()
        return self._lookups[0].deadline if self._lookups else None

    def expire(self, now: float) -> None:
        """Answer held lookups whose budget ran out from the local index (their fetches go on)."""
        while self._lookups and (self._lookups[0].answered or self._lookups[0].deadline <= now):
            pending = self._lookups.popleft()
            if not pending.answered:
                self.counters.late += 1
                self._answer(pending, None)

    def _answer(self, pending: _Lookup, fetched: bytes | None) -> None:
        if pending.answered:
            return
        pending.answered = True
        try:
            self.store.answer_prefix(pending.reply, pending.query, fetched)
        except Exception:  # one query's bug must not break the loop's other completions
            log.exception("answering a lookup after the shared tier failed")

    def _fetched(self, pending: _Lookup, fut: Future[FetchResult]) -> None:
        if not self._ok(fut):
            self.counters.misses += 1
            self._answer(pending, None)
            return
        res = fut.result()
        c = self.counters
        c.bytes_read += res.nbytes_read
        c.stale_manifests += res.stale
        c.corrupt_rows += res.corrupt
        if res.key is None or res.header is None or res.image is None:
            c.misses += 1
            self._answer(pending, None)
            return
        self._install(pending, res.key, res.header.payload_offset, res.image)

    def _install(self, pending: _Lookup, key: bytes, offset: int, image: bytearray) -> None:
        """Publish a fetched row into the hottest local tier with room, then answer the query."""
        store, size = self.store, len(image)
        if key in store.index:  # stored here meanwhile (a worker's save, another lookup's fetch)
            self.counters.hits += 1
            self._answer(pending, key)
            return
        waiting = self._arriving.get(key)
        if waiting is not None:  # another lookup's fetch of the same row is being published
            waiting.append(pending)
            return
        if self.busy_key(key):  # a writer is storing it: publishing it too would race for its name
            self.counters.misses += 1
            self._answer(pending, None)
            return
        tier = store.tiers.place(size, store.index)
        if tier is None:
            log.info("a shared row of %d bytes fits no local tier: a miss", size)
            self.counters.misses += 1
            self._answer(pending, None)
            return
        store.tiers[tier].reserved_bytes += size
        self._arriving[key] = [pending]
        store.arriving.add(key)
        image[USAGE_OFFSET : USAGE_OFFSET + 12] = encode_usage(0, time.time_ns())  # outside the checksum
        self._ids += 1
        tag = f"s{self._ids}"

        def installed(fut: Future[tuple[Location, RowHeader, list[int]]]) -> None:
            store.tiers[tier].reserved_bytes -= size
            store.arriving.discard(key)
            lookups = self._arriving.pop(key, [])
            exc = fut.exception()
            if exc is not None:
                log.warning("could not keep shared row %s in %s: %s", key.hex()[:16], tier.value, exc)
                self.counters.misses += len(lookups)
                for waiter in lookups:
                    self._answer(waiter, None)
                store.relieve()
                return
            loc, header, blocks = fut.result()
            entry = entry_from_header(header, loc, verified=True, blocks=blocks)
            entry.shared = True
            store.add_row(entry)  # no writer could store this key meanwhile (``store.arriving``)
            self.counters.hits += len(lookups)
            for waiter in lookups:
                self._answer(waiter, key)
            store.relieve()

        self._submit_io(install_row, installed, self.storage, tier, key, tag, offset, image)
        store.relieve()

    # --- writes --------------------------------------------------------------------------------------------

    def row_stored(self, entry: RowEntry) -> None:
        """A row was committed here: write it behind (the row is pinned while it is read)."""
        if not self._may_write(entry.size):
            return
        self.store.pin(entry)
        self._write_bytes += entry.size

        def read(fut: Future[bytearray]) -> None:
            self.store.unpin(entry)
            self._send(entry, fut)

        self._submit_io(self.storage.read_row, read, self.store.location(entry), entry.size)

    def row_leaving(self, entry: RowEntry, free: Callable[[], None]) -> bool:
        """A row evicted from the coldest local tier that the shared tier may not have: read it, then
        free its bytes, then send it."""
        if not self._may_write(entry.size):
            return False
        self._write_bytes += entry.size

        def read(fut: Future[bytearray]) -> None:
            free()
            self._send(entry, fut)

        self._submit_io(self.storage.read_row, read, self.store.location(entry), entry.size)
        return True

    def _may_write(self, size: int) -> bool:
        if self.state is SharedState.OFF:
            return False
        if not self._usable() or self._write_bytes + size > MAX_PENDING_WRITE_BYTES:
            self.counters.writes_skipped += 1
            return False
        return True

    def _send(self, entry: RowEntry, read: Future[bytearray]) -> None:
        if read.exception() is not None:
            self._write_bytes -= entry.size
            self.counters.writes_failed += 1
            log.warning("shared tier: could not read row %s: %s", entry.key.hex()[:16], read.exception())
            return

        def sent(fut: Future[PutResult]) -> None:
            self._write_bytes -= entry.size
            if not self._ok(fut):
                self.counters.writes_failed += 1
                return
            res = fut.result()
            self.counters.bytes_written += res.nbytes
            if res.stored:
                self.counters.writes += 1
            else:
                self.counters.writes_present += 1
            entry.shared = True

        self._submit_put(self.kv.put, sent, entry.key, entry.fingerprint, entry.n_tokens, read.result())

    # --- reporting and shutdown ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": self.state is not SharedState.OFF,
            "state": self.state.value,
            "url": self.url,
            "pending_lookups": sum(not p.answered for p in self._lookups),
            "pending_write_bytes": self._write_bytes,
            **asdict(self.counters),
        }

    def close(self) -> None:
        self.kv.close()


def install_row(
    storage: Storage, tier: CacheTier, key: bytes, tag: str, offset: int, image: bytearray
) -> tuple[Location, RowHeader, list[int]]:
    """Write a fetched row image into a temp of ``tier`` and publish it (verified again, atomically);
    with the row's block hashes, computed here rather than on the loop."""
    view = memoryview(image)
    temp = storage.create_temp(tier, key, tag, len(image), bytes(view[:offset]))
    checksum = int.from_bytes(view[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4], "little")
    loc, header = storage.publish(temp, key, expected_crc=checksum, inline=(offset, view[offset:]))
    return loc, header, header_blocks(header)
