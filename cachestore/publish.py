"""The publish protocol: reserve -> the writer fills a temp -> commit -> verified, published, indexed.

The daemon is the only process that names, publishes, indexes or deletes rows; writers only fill
temps it created. One live reservation per key: a second writer gets ``conflict``, a stored key
``already_present``. A reservation whose writer dies (pid gone) or stalls (``reservation_ttl_s``)
expires and its temp is deleted; a commit that arrives after that gets ``expired``.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from erllama.cachestore.codec import (
    RowHeader,
    check_identity,
    encode_head,
    head_checksum,
    payload_offset,
    row_key_bytes,
)
from erllama.cachestore.index import RowEntry
from erllama.cachestore.storage import Location, Storage, TempRow
from erllama.cachestore.store import (
    RECYCLED_TIERS,
    Replier,
    Store,
    as_error,
    entry_from_header,
    header_blocks,
)
from erllama.protocol import (
    MAX_CACHE_PAYLOAD_BYTES,
    Ack,
    CacheTier,
    CommitReply,
    ErllamaError,
    ErrorCode,
    ReserveReply,
    ReserveStatus,
    SaveReason,
)

log = logging.getLogger(__name__)


class ResState(enum.StrEnum):
    WAITING = "waiting"  # for the inode of a row that is leaving the tier to make room
    CREATING = "creating"  # the temp is being allocated
    OPEN = "open"  # the writer is filling it
    COMMITTING = "committing"  # verification and publication under way


@dataclass(slots=True)
class Reservation:
    res_id: int
    key: bytes
    tier: CacheTier
    size: int
    payload_offset: int
    payload_len: int
    reason: SaveReason
    ident: bytes
    pid: int
    deadline: float  # time.monotonic()
    state: ResState = ResState.CREATING
    temp: TempRow | None = None


class Publisher:
    """Reservations and commits; owns no rows until a commit lands in ``store``."""

    def __init__(self, store: Store):
        self.store = store
        self.by_id: dict[int, Reservation] = {}
        self.by_key: dict[bytes, Reservation] = {}
        self.on_stored: Callable[[RowEntry], None] | None = None  # the shared tier's write-behind

    def reserve(
        self,
        reply: Replier,
        fingerprint: bytes,
        token_bytes: bytes,
        payload_len: int,
        reason: str,
        pid: int,
        tier: str | None,
    ) -> None:
        store = self.store
        check_identity(fingerprint, token_bytes)
        try:
            save_reason = SaveReason(reason)
            preferred = CacheTier(tier) if tier is not None else None
        except ValueError as exc:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, str(exc)) from None
        if preferred is CacheTier.SHARED:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, "rows are reserved in ram, shm or disk")
        if not 0 < payload_len <= MAX_CACHE_PAYLOAD_BYTES:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"payload_len must be 1..{MAX_CACHE_PAYLOAD_BYTES}")
        key = row_key_bytes(fingerprint, token_bytes)
        if key in store.index:
            store.counters.already_present += 1
            reply.ok(ReserveReply(status=ReserveStatus.ALREADY_PRESENT.value, key=key))
            return
        current = self.by_key.get(key)
        if current is not None and current.state is ResState.OPEN and not store.procs.alive(current.pid):
            self._expire(current, "writer died")
            current = None
        if current is not None or key in store.arriving:  # another writer, or a fetch from the shared tier
            store.counters.conflicts += 1
            reply.ok(ReserveReply(status=ReserveStatus.CONFLICT.value, key=key))
            return
        offset = payload_offset(len(fingerprint), len(token_bytes) // 4)
        size = offset + payload_len
        where = store.tiers.place(size, store.index, preferred)
        if where is None:
            store.counters.saves_dropped += 1
            raise ErllamaError(
                ErrorCode.OVER_BUDGET, f"no tier can take a row of {size} bytes", {"size": size}
            )
        res = Reservation(
            next(store.ids),
            key,
            where,
            size,
            offset,
            payload_len,
            save_reason,
            reply.ident,
            pid,
            time.monotonic() + store.config.reservation_ttl_s,
        )
        self.by_id[res.res_id] = res
        self.by_key[key] = res
        store.procs.register(pid)
        must_make_room = where in RECYCLED_TIERS and store.tiers[where].free() < size
        store.tiers[where].reserved_bytes += size
        head = encode_head(fingerprint, token_bytes, payload_len, save_reason, time.time_ns())

        def created(fut: Future[TempRow]) -> None:
            exc = fut.exception()
            if self.by_id.get(res.res_id) is not res:  # expired or aborted while the temp was allocated
                if exc is None:
                    store.submit(store.storage.discard, _quiet, fut.result())
                reply.error(ErllamaError(ErrorCode.EXPIRED, "reservation ended before its temp was ready"))
                return
            if exc is not None:
                self._forget(res)
                store.counters.saves_dropped += 1
                reply.error(as_error(exc))
                return
            res.temp = fut.result()
            res.state = ResState.OPEN
            store.counters.recycled_files += res.temp.reused
            res.deadline = time.monotonic() + store.config.reservation_ttl_s
            reserved = ReserveReply(
                status=ReserveStatus.RESERVED.value,
                key=key,
                res=res.res_id,
                tier=where,
                path=res.temp.path,
                ino=res.temp.ino,
                offset=offset,
                size=size,
                head_crc=head_checksum(head),
                ttl_s=store.config.reservation_ttl_s,
            )
            reply.ok(reserved)

        def create(reuse: Location | None) -> None:
            if self.by_id.get(res.res_id) is not res:  # it ended while it waited (``_forget``)
                reply.error(ErllamaError(ErrorCode.EXPIRED, "reservation ended while it waited for room"))
                return
            res.state = ResState.CREATING
            tag = f"r{res.res_id}"
            store.submit(store.storage.create_temp, created, where, key, tag, size, head, reuse)

        if must_make_room:
            # The row that leaves to make room hands its file over: see ``store.RECYCLED_TIERS``.
            res.state = ResState.WAITING
            store.wait_for_inode(where, res.res_id, create)
        else:
            create(None)
            store.relieve()

    def commit(self, reply: Replier, res_id: int, crc: int, inline: memoryview | None) -> None:
        store = self.store
        res = self.by_id.get(res_id)
        if res is None or res.state is not ResState.OPEN or res.temp is None:
            raise ErllamaError(ErrorCode.EXPIRED, "no open reservation with this id (expired or restarted?)")
        if res.ident != reply.ident:
            raise ErllamaError(ErrorCode.CONFLICT, "this reservation belongs to another client")
        if inline is not None and len(inline) != res.payload_len:
            raise ErllamaError(
                ErrorCode.INVALID_PARAMS, f"inline payload is {len(inline)} bytes, not {res.payload_len}"
            )
        res.state = ResState.COMMITTING
        temp = res.temp

        def published(fut: Future[tuple[Location, RowHeader, list[int]]]) -> None:
            self._forget(res)
            exc = fut.exception()
            if exc is not None:
                store.counters.saves_dropped += 1
                log.warning("commit of %s refused: %s", res.key.hex()[:16], exc)
                reply.error(as_error(exc))
                return
            loc, header, blocks = fut.result()
            entry: RowEntry = entry_from_header(header, loc, verified=True, blocks=blocks)
            store.add_row(entry)
            store.counters.count_save(res.reason)
            if self.on_stored is not None:
                self.on_stored(entry)
            reply.ok(CommitReply(status="stored", key=res.key, tier=loc.tier))
            store.relieve()

        store.submit(
            publish_named,
            published,
            store.storage,
            temp,
            res.key,
            expected_crc=crc,
            inline=(res.payload_offset, inline) if inline is not None else None,
        )

    def abort(self, reply: Replier, res_id: int) -> None:
        res = self.by_id.get(res_id)
        if res is not None and res.state is ResState.COMMITTING:
            raise ErllamaError(ErrorCode.CONFLICT, "commit already under way")
        if res is not None:
            self.store.counters.saves_dropped += 1
            self._release(res)
        reply.ok(Ack())

    def expire(self, now: float) -> None:
        """End reservations whose writer died or stalled past the TTL."""
        for res in list(self.by_id.values()):
            if res.state is ResState.COMMITTING:
                continue
            if now > res.deadline:
                self._expire(res, "writer stalled past the reservation TTL")
            elif res.state in (ResState.WAITING, ResState.OPEN) and not self.store.procs.alive(res.pid):
                self._expire(res, "writer died")

    def drop_client(self, ident: bytes) -> None:
        for res in [
            r for r in self.by_id.values() if r.ident == ident and r.state is not ResState.COMMITTING
        ]:
            self._expire(res, "writer said bye")

    def holders(self) -> set[int]:
        return {r.pid for r in self.by_id.values()}

    def _expire(self, res: Reservation, why: str) -> None:
        log.info("reservation %d for %s expired: %s", res.res_id, res.key.hex()[:16], why)
        self.store.counters.expired_reservations += 1
        self.store.counters.saves_dropped += 1
        self._release(res)

    def _release(self, res: Reservation) -> None:
        self._forget(res)
        if res.temp is not None:
            self.store.submit(self.store.storage.discard, _quiet, res.temp)

    def _forget(self, res: Reservation) -> None:
        waiter = self.store.stop_waiting_for_inode(res.tier, res.res_id)
        if self.by_id.pop(res.res_id, None) is not None:
            del self.by_key[res.key]
            self.store.tiers[res.tier].reserved_bytes -= res.size
        if waiter is not None:
            waiter(None)  # answers the writer: expired

    def abort_all(self) -> None:
        for res in list(self.by_id.values()):
            if res.state is not ResState.COMMITTING:
                self._release(res)


def publish_named(
    storage: Storage, temp: TempRow, key: bytes, **kw: Any
) -> tuple[Location, RowHeader, list[int]]:
    """``Storage.publish``, and the row's block hashes (on the same I/O thread, not the loop)."""
    loc, header = storage.publish(temp, key, **kw)
    return loc, header, header_blocks(header)


def _quiet(fut: Future[Any]) -> None:
    if fut.exception() is not None:
        log.debug("discarding a temp failed: %s", fut.exception())
