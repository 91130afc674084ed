"""The store's state machine: index, tier accounting, leases, lookups, loads and row movement.

Everything here runs on the daemon's loop thread. Blocking work (copies, checksums, fsyncs, unlinks)
is handed to ``submit`` and its result comes back to the loop thread through ``on_done``, so a lookup
is never queued behind a 100 MB write.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, Protocol

from erllama.blockhash import KV_BLOCK_TOKENS, block_hashes_of_bytes
from erllama.cachestore.codec import CorruptRow, RowHeader, encode_usage
from erllama.cachestore.config import SHM_TIER_MIN_BYTES, StoreConfig, auto_shm_budget
from erllama.cachestore.events import KvEventLog
from erllama.cachestore.index import TOKEN_BYTES, Index, RowEntry, RowState
from erllama.cachestore.leases import Lease, ProcessWatch
from erllama.cachestore.stats import Counters
from erllama.cachestore.storage import Location, Storage, io_error
from erllama.cachestore.tiers import TIER_ORDER, Tiers, TierState, eviction_order
from erllama.protocol import (
    Ack,
    CacheReply,
    CacheTier,
    ErllamaError,
    ErrorCode,
    ExactReply,
    LoadReply,
    PrefixHitInfo,
    PrefixReply,
    RowInfo,
)

log = logging.getLogger(__name__)

Submit = Callable[..., None]  # submit(fn, on_done, *args): run fn(*args) off the loop, then on_done(future)
InodeTaker = Callable[[Location | None], None]  # gets a freed row's location, or None: make a new file

# Tiers whose freed row files are handed to the next row written there. Readers keep their mappings
# (``mapping``): a new row in a reused RAM or tmpfs inode is read through page tables they already
# have, while a new file costs a page fault per 64 KiB on first read. Disk files need no such help:
# the page cache maps them in large folios.
RECYCLED_TIERS: Final = (CacheTier.RAM, CacheTier.SHM)
# A local hit is taken as it is unless the shared tier could cover at least one more KV block: the
# server round trip (~0.3 ms on a LAN) is then worth a chance of skipping that block's prefill (~0.6 s).
SHARED_MIN_GAIN_TOKENS: Final = KV_BLOCK_TOKENS


class SharedHooks(Protocol):
    """What the store asks of the shared tier (``shared.SharedTier``), when one is configured."""

    def lookup(self, reply: Replier, query: PrefixQuery, longer_than: int) -> bool:
        """Look for a row longer than ``longer_than`` tokens (the local hit, 0 on a miss): True if it
        takes the query over (it answers ``reply`` later), False to decline."""
        ...

    def row_leaving(self, entry: RowEntry, free: Callable[[], None]) -> bool:
        """An unindexed row leaving the coldest tier: True if it is written to the shared tier first
        (``free`` then runs once it is read), False to free it now."""
        ...


@dataclass(frozen=True, slots=True)
class PrefixQuery:
    """A ``c.prefix`` query as the store runs it (``min_len`` already defaulted)."""

    fingerprint: bytes
    token_bytes: bytes
    min_len: int
    max_len: int | None
    max_overhang: int | None
    load_pid: int | None


class Replier(Protocol):
    """Where a request's single answer goes (possibly later, after background work)."""

    ident: bytes

    def ok(self, reply: CacheReply, frame: Any = None) -> None: ...

    def error(self, err: ErllamaError) -> None: ...


def entry_from_header(
    header: RowHeader, loc: Location, *, verified: bool, blocks: list[int] | None = None
) -> RowEntry:
    """The index entry of a row; ``blocks``: its block hashes if already computed (off the loop)."""
    if blocks is None:
        blocks = header_blocks(header)
    return RowEntry(
        key=header.key,
        fingerprint=header.fingerprint,
        token_bytes=header.token_bytes,
        size=header.size,
        payload_offset=header.payload_offset,
        payload_len=header.payload_len,
        reason=header.reason,
        created_ns=header.created_ns,
        hits=header.hits,
        last_used_ns=header.last_used_ns,
        tier=loc.tier,
        path=loc.path,
        fd=loc.fd,
        ino=loc.ino,
        verified=verified,
        blocks=blocks,
    )


def header_blocks(header: RowHeader) -> list[int]:
    """A row's block hashes (about 2 ms for 30,000 tokens: computed on an I/O thread where it can be)."""
    return block_hashes_of_bytes(header.fingerprint, header.token_bytes)


def row_info(entry: RowEntry) -> RowInfo:
    """How a row is described on the wire."""
    return RowInfo(
        key=entry.key,
        tier=entry.tier,
        row_tokens=entry.n_tokens,
        size=entry.size,
        payload_len=entry.payload_len,
        hits=entry.hits,
        reason=entry.reason.value,
        created_ns=entry.created_ns,
        last_used_ns=entry.last_used_ns,
    )


class Store:
    """The daemon's state: rows, tiers, leases and the rules that move rows between tiers."""

    def __init__(
        self, config: StoreConfig, storage: Storage, submit: Submit, ram_row_limit: int | None = None
    ):
        self.config = config
        self.storage = storage
        self.submit = submit
        self.index = Index()
        self.counters = Counters()
        shm_on = CacheTier.SHM in storage.dirs
        self.tiers = Tiers(
            {
                CacheTier.RAM: TierState(
                    CacheTier.RAM, config.ram_bytes, config.ram_bytes > 0, ram_row_limit
                ),
                CacheTier.SHM: TierState(CacheTier.SHM, config.shm_bytes or 0, shm_on),
                CacheTier.DISK: TierState(CacheTier.DISK, config.disk_bytes, config.disk_bytes > 0),
            }
        )
        self.leases: dict[int, Lease] = {}
        self.shared: SharedHooks | None = None  # set by the server when a shared tier is configured
        self.arriving: set[bytes] = set()  # keys being published from the shared tier (not by a writer)
        self.procs = ProcessWatch()
        self.events = KvEventLog()  # rows stored, removed and moved, for the broker's routing index
        self.ids = itertools.count(1)
        self._waiters: dict[bytes, list[Callable[[bool], None]]] = {}
        self._move_cancelled: set[bytes] = set()
        # Reservations waiting for the inode of a row leaving their tier (see ``wait_for_inode``).
        self._inode_waiters: dict[CacheTier, dict[int, InodeTaker]] = {t: {} for t in RECYCLED_TIERS}

    # --- start -------------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Rebuild the index from the shm and disk rows (hit counts kept; RAM rows died with the last
        daemon), delete temps, and size the shm tier from what /dev/shm has."""
        for tier in (CacheTier.SHM, CacheTier.DISK):
            if tier not in self.storage.dirs:
                continue
            try:
                self.storage.prepare(tier)
            except (OSError, ErllamaError) as exc:
                if tier is CacheTier.DISK:
                    raise
                log.warning("shm tier off: cannot use %s (%s)", self.storage.dirs[tier], exc)
                del self.storage.dirs[tier]
                self.tiers[tier].enabled = False
                continue
            found, bad = self.storage.scan(tier)
            self.counters.corrupt_rows += bad
            for header, loc in found:
                if header.key in self.index:  # a move was cut short: keep the hotter copy
                    self.submit(self.storage.delete, _ignore, loc)
                    continue
                entry = entry_from_header(header, loc, verified=False)
                self.index.add(entry)
                self.tiers[tier].add_row(entry.size)
            log.info(
                "%s tier: %d rows, %d bytes restored, %d bad files deleted",
                tier.value,
                self.tiers[tier].rows,
                self.tiers[tier].rows_bytes,
                bad,
            )
        shm = self.tiers[CacheTier.SHM]
        if CacheTier.SHM not in self.storage.dirs or self.config.shm_bytes == 0:
            shm.enabled = False
        elif shm.enabled:
            fs_room = self.storage.fs_free_bytes(CacheTier.SHM) + shm.rows_bytes
            if self.config.shm_bytes is None:
                shm.budget = auto_shm_budget(fs_room - shm.rows_bytes, shm.rows_bytes)
                if shm.budget < SHM_TIER_MIN_BYTES:
                    log.warning(
                        "shm tier off: %s offers %d bytes (minimum %d); running on RAM + disk. "
                        "In a container, "
                        "raise --shm-size",
                        self.storage.dirs[CacheTier.SHM],
                        shm.budget,
                        SHM_TIER_MIN_BYTES,
                    )
                    shm.enabled = False
            elif self.config.shm_bytes > fs_room:
                shm.budget = fs_room
                log.warning(
                    "shm budget clamped to %d bytes: that is all %s can hold",
                    shm.budget,
                    self.storage.dirs[CacheTier.SHM],
                )
        self.relieve()

    # --- lookups -----------------------------------------------------------------------------------------

    def exact(self, reply: Replier, key: bytes) -> None:
        t0 = time.perf_counter_ns()
        entry = self.index.get(key)
        self._count_lookup(entry is not None, exact=True, t0=t0)
        reply.ok(ExactReply(row=row_info(entry) if entry is not None else None))

    def prefix(
        self,
        reply: Replier,
        fingerprint: bytes,
        token_bytes: bytes,
        min_len: int | None,
        max_len: int | None = None,
        max_overhang: int | None = None,
        load_pid: int | None = None,
    ) -> None:
        """The longest usable row for a query (see ``PrefixTree.longest_prefix`` for the limits), leased
        for ``load_pid`` in the same reply when given. A local miss (however short the query), or a
        local hit that leaves at least ``SHARED_MIN_GAIN_TOKENS`` of the query uncovered, is handed to
        the shared tier, if any, which looks for a longer row there and answers later
        (``answer_prefix``): every host holds the system prompt's row, so asking only on a miss would
        never find another host's conversation."""
        t0 = time.perf_counter_ns()
        if len(token_bytes) % 4:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, "tokens must be u32 little-endian")
        if (max_len is not None and max_len < 0) or (max_overhang is not None and max_overhang < 0):
            raise ErllamaError(ErrorCode.INVALID_PARAMS, "max_len and max_overhang must not be negative")
        query = PrefixQuery(
            fingerprint,
            token_bytes,
            min_len or self.config.min_prefix_tokens,
            max_len,
            max_overhang,
            load_pid,
        )
        found = self._longest(query)
        self._count_lookup(found is not None, exact=False, t0=t0)
        have = 0 if found is None else found[1]
        worth_asking = found is None or len(token_bytes) // TOKEN_BYTES - have >= SHARED_MIN_GAIN_TOKENS
        if self.shared is not None and worth_asking and self.shared.lookup(reply, query, have):
            return
        self._answer(reply, query, found, fetched=None)

    def answer_prefix(self, reply: Replier, query: PrefixQuery, fetched: bytes | None) -> None:
        """Answer a query the shared tier took over, from the index as it is now; ``fetched``: the key
        of the row it brought in for this query, reported as a ``shared`` hit."""
        self._answer(reply, query, self._longest(query), fetched)

    def _longest(self, q: PrefixQuery) -> tuple[RowEntry, int] | None:
        return self.index.longest_prefix(q.fingerprint, q.token_bytes, q.min_len, q.max_len, q.max_overhang)

    def _answer(
        self, reply: Replier, query: PrefixQuery, found: tuple[RowEntry, int] | None, fetched: bytes | None
    ) -> None:
        if found is None:
            reply.ok(PrefixReply(hit=None))
            return
        entry, common = found
        tier = CacheTier.SHARED if entry.key == fetched else entry.tier
        hit = PrefixHitInfo(key=entry.key, row_tokens=entry.n_tokens, common_len=common, tier=tier)
        if query.load_pid is None:
            reply.ok(PrefixReply(hit=hit))
        else:
            self.load(reply, entry.key, query.load_pid, inline=False, hit=hit)

    def _count_lookup(self, hit: bool, *, exact: bool, t0: int) -> None:
        c = self.counters
        c.lookups += 1
        if not hit:
            c.misses += 1
        elif exact:
            c.hits_exact += 1
        else:
            c.hits_prefix += 1
        c.lookup_ns += time.perf_counter_ns() - t0

    # --- loads and leases --------------------------------------------------------------------------------

    def load(
        self,
        reply: Replier,
        key: bytes,
        pid: int,
        inline: bool,
        t0: int | None = None,
        hit: PrefixHitInfo | None = None,
    ) -> None:
        """Lease the row and say where it is; a row not yet verified in this daemon's life is checked
        first (the reply waits). ``t0``: when the request arrived, for ``load_ns``; ``hit``: the lookup
        that found it, answered with the lease in one ``PrefixReply``."""
        t0 = time.perf_counter_ns() if t0 is None else t0
        entry = self.index.get(key)
        if entry is None:
            reply.error(ErllamaError(ErrorCode.NOT_FOUND, "no such row"))
            return
        if entry.state is RowState.VERIFYING or (entry.state is RowState.MOVING and not entry.verified):
            self._waiters.setdefault(key, []).append(
                lambda ok: self._retry_load(reply, key, pid, inline, ok, t0, hit)
            )
            return
        if not entry.verified:
            self._waiters.setdefault(key, []).append(
                lambda ok: self._retry_load(reply, key, pid, inline, ok, t0, hit)
            )
            self._verify(entry)
            return
        if not self.storage.present(self.location(entry), entry.size):
            self._drop_corrupt(entry, "row file vanished or changed size")
            reply.error(ErllamaError(ErrorCode.NOT_FOUND, "row vanished"))
            return
        if entry.state is RowState.MOVING:
            self._move_cancelled.add(key)  # served from where it is; the copy will be thrown away
        lease = Lease(next(self.ids), key, reply.ident, pid, time.monotonic() + self.config.lease_ttl_s)
        self.leases[lease.lease_id] = lease
        self.procs.register(pid)
        entry.leases += 1
        entry.hits += 1
        entry.last_used_ns = time.time_ns()
        if entry.tier is not CacheTier.RAM:
            entry.usage_dirty = True
            entry.promote_pending = True
        answer = LoadReply(
            lease=lease.lease_id,
            path=entry.path,
            ino=entry.ino,
            offset=entry.payload_offset,
            row=row_info(entry),
        )
        self.counters.loads += 1
        self.counters.load_ns += time.perf_counter_ns() - t0
        if not inline:
            reply.ok(answer if hit is None else PrefixReply(hit=hit, load=answer))
            return

        def sent(fut: Future[bytearray]) -> None:
            if fut.exception() is None:
                reply.ok(answer, frame=fut.result())
            else:
                self._end_lease(lease.lease_id)
                reply.error(as_error(fut.exception()))

        self.submit(self.storage.read_row, sent, self.location(entry), entry.size)

    def _retry_load(
        self, reply: Replier, key: bytes, pid: int, inline: bool, ok: bool, t0: int, hit: PrefixHitInfo | None
    ) -> None:
        if not ok:
            reply.error(ErllamaError(ErrorCode.CORRUPT, "row failed verification and was removed"))
            return
        self.load(reply, key, pid, inline, t0, hit)

    def release(self, reply: Replier, lease_id: int, bad: bool) -> None:
        lease = self.leases.get(lease_id)
        if lease is not None and bad:
            entry = self.index.get(lease.key)
            if entry is not None:
                log.warning("a reader reports row %s bad: verifying it again", entry.key.hex()[:16])
                entry.verified = False
        self._end_lease(lease_id)
        reply.ok(Ack())

    def _end_lease(self, lease_id: int) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        entry = self.index.get(lease.key)
        if entry is not None:
            self.unpin(entry)

    def pin(self, entry: RowEntry) -> None:
        """Keep a row where it is, unchanged, while the daemon itself reads it (as a lease does)."""
        entry.leases += 1

    def unpin(self, entry: RowEntry) -> None:
        """The end of a lease or a pin: an idle row may be verified, promoted or moved out again."""
        entry.leases -= 1
        if entry.leases == 0 and self.index.get(entry.key) is entry:
            if not entry.verified and entry.state is RowState.READY:
                self._verify(entry)
            else:
                self._maybe_promote(entry)
            self.relieve()

    def _maybe_promote(self, entry: RowEntry) -> None:
        """A row hit on a colder tier moves up once nobody reads it (a load during a move cancels the
        move, so this is retried when the move ends)."""
        if entry.promote_pending and entry.leases == 0 and entry.state is RowState.READY:
            entry.promote_pending = False
            target = self.tiers.promotion_target(entry, self.index)
            if target is not None:
                self._move(entry, target, promotion=True)

    def drop_client(self, ident: bytes) -> None:
        """A client said bye: end its leases now."""
        for lease in [le for le in self.leases.values() if le.ident == ident]:
            self.counters.leases_reaped += 1
            self._end_lease(lease.lease_id)

    def reap_leases(self, now: float) -> None:
        """End leases whose holder died or overstayed ``lease_ttl_s``."""
        alive: dict[int, bool] = {}
        for lease in list(self.leases.values()):
            if lease.pid not in alive:
                alive[lease.pid] = self.procs.alive(lease.pid)
            if not alive[lease.pid] or now > lease.expires_at:
                log.info(
                    "ending lease %d on %s: holder pid %d %s",
                    lease.lease_id,
                    lease.key.hex()[:16],
                    lease.pid,
                    "died" if not alive[lease.pid] else "overstayed",
                )
                self.counters.leases_reaped += 1
                self._end_lease(lease.lease_id)

    # --- verification ------------------------------------------------------------------------------------

    def _verify(self, entry: RowEntry) -> None:
        entry.state = RowState.VERIFYING

        def done(fut: Future[RowHeader]) -> None:
            entry.state = RowState.READY
            exc = fut.exception()
            ok = exc is None
            if ok:
                entry.verified = True
            elif self.index.get(entry.key) is entry:
                self._drop_corrupt(entry, str(exc))
            self._wake(entry.key, ok)

        self.submit(self.storage.verify, done, self.location(entry), entry.key)

    def _wake(self, key: bytes, ok: bool) -> None:
        for waiter in self._waiters.pop(key, []):
            waiter(ok)

    def _drop_corrupt(self, entry: RowEntry, why: str) -> None:
        log.warning("row %s in %s is corrupt (%s): removed", entry.key.hex()[:16], entry.tier.value, why)
        self.counters.corrupt_rows += 1
        self._remove(entry)

    # --- movement ----------------------------------------------------------------------------------------

    @staticmethod
    def location(entry: RowEntry) -> Location:
        return Location(entry.tier, entry.path, entry.fd, entry.ino)

    def _remove(self, entry: RowEntry) -> None:
        self.index.remove(entry.key)
        self.events.removed(entry)
        self.tiers[entry.tier].remove_row(entry.size)
        if entry.leases:  # found corrupt while read: its reader keeps a valid mapping until it lets go
            self.submit(self.storage.delete, _ignore, self.location(entry), False)
        else:
            self._free(self.location(entry))

    def _free(self, loc: Location) -> None:
        """An unindexed, unleased row's bytes: to the first reservation waiting in its tier, else deleted."""
        waiters = self._inode_waiters.get(loc.tier)
        if waiters:
            res_id = next(iter(waiters))
            waiters.pop(res_id)(loc)
        else:
            self.submit(self.storage.delete, _ignore, loc)

    def wait_for_inode(self, tier: CacheTier, res_id: int, take: InodeTaker) -> None:
        """A reservation that needs room made in ``tier``: make it (``relieve``); ``take`` gets the
        location of the next row to leave the tier, or None once no move out of it is left to free one."""
        self._inode_waiters[tier][res_id] = take
        self.relieve()
        self._settle_inode_waiters(tier)

    def stop_waiting_for_inode(self, tier: CacheTier, res_id: int) -> InodeTaker | None:
        return self._inode_waiters.get(tier, {}).pop(res_id, None)

    def _settle_inode_waiters(self, tier: CacheTier) -> None:
        """Waiters that no move under way will serve write new files (the tier may be briefly over
        budget then, as it is whenever a write and the move making room for it overlap)."""
        waiters = self._inode_waiters.get(tier)
        while waiters and self.tiers[tier].outgoing_bytes <= 0:
            res_id = next(iter(waiters))
            waiters.pop(res_id)(None)

    def add_row(self, entry: RowEntry) -> None:
        """A new row becomes visible (committed by a writer, or fetched from the shared tier)."""
        self.index.add(entry)
        self.tiers[entry.tier].add_row(entry.size)
        self.events.stored(entry)

    def _evict(self, entry: RowEntry) -> None:
        log.debug("evicting %s from %s (%d bytes)", entry.key.hex()[:16], entry.tier.value, entry.size)
        self.counters.evictions += 1
        if self.shared is None or entry.shared or entry.leases:
            self._remove(entry)
            return
        # Below the coldest local tier: the row is written to the shared tier before its bytes go.
        self.index.remove(entry.key)
        self.events.removed(entry)
        self.tiers[entry.tier].remove_row(entry.size)
        loc = self.location(entry)
        if not self.shared.row_leaving(entry, lambda: self._free(loc)):
            self._free(loc)

    def _move(self, entry: RowEntry, dest: CacheTier, *, promotion: bool) -> None:
        src, size = self.location(entry), entry.size
        entry.state = RowState.MOVING
        self.tiers[src.tier].outgoing_bytes += size
        self.tiers[dest].reserved_bytes += size
        usage = encode_usage(entry.hits, entry.last_used_ns)
        verify = not entry.verified

        def done(fut: Future[tuple[Location, RowHeader]]) -> None:
            self.tiers[src.tier].outgoing_bytes -= size
            self.tiers[dest].reserved_bytes -= size
            entry.state = RowState.READY
            cancelled = entry.key in self._move_cancelled
            self._move_cancelled.discard(entry.key)
            exc = fut.exception()
            indexed = self.index.get(entry.key) is entry
            if exc is not None:
                if isinstance(exc, CorruptRow):
                    if indexed:
                        self._drop_corrupt(entry, str(exc))
                else:
                    log.warning(
                        "moving %s %s -> %s failed: %s", entry.key.hex()[:16], src.tier.value, dest.value, exc
                    )
                    if indexed and not promotion and entry.leases == 0:
                        self._evict(entry)  # it was leaving its tier anyway
                self._wake(entry.key, not isinstance(exc, CorruptRow))
                self.relieve()
                self._settle_inode_waiters(src.tier)
                return
            new, _ = fut.result()
            if cancelled or not indexed:
                self._free(new)
            else:
                self.tiers[src.tier].remove_row(size)
                self.index.relocate(entry, dest, new.path, new.fd, new.ino)
                self.events.moved(entry, src.tier)
                self.tiers[dest].add_row(size)
                entry.verified = True
                entry.usage_dirty = dest is not CacheTier.RAM
                self._free(src)
                if promotion:
                    self.counters.promotions += 1
                else:
                    self.counters.demotions += 1
            self._wake(entry.key, True)
            if self.index.get(entry.key) is entry:
                self._maybe_promote(entry)
            self.relieve()
            self._settle_inode_waiters(src.tier)

        tag = f"m{next(self.ids)}"
        self.submit(self.storage.copy_row, done, src, dest, entry.key, size, usage, tag, verify=verify)

    def relieve(self) -> None:
        """Bring every tier back under budget: hottest first, each hands its lowest-ordered idle rows to
        the next colder tier (which may in turn overflow and is handled next), the coldest evicts."""
        now = time.time_ns()
        for tier in TIER_ORDER:
            excess = self.tiers[tier].excess()
            if excess <= 0:
                continue
            for victim in eviction_order(self.index, tier, now):
                if excess <= 0:
                    break
                excess -= victim.size
                dest = self.tiers.demotion_target(tier, victim.size)
                if dest is None:
                    self._evict(victim)
                else:
                    self._move(victim, dest, promotion=False)

    def evict_bytes(self, nbytes: int, tiers: list[CacheTier]) -> tuple[int, int]:
        """Free at least ``nbytes`` from ``tiers`` (memory pressure): each row leaves for the next
        colder tier not listed, or is evicted. Leased rows stay. Returns (rows, bytes) scheduled."""
        now, rows, freed = time.time_ns(), 0, 0
        for tier in [t for t in TIER_ORDER if t in tiers]:
            for victim in eviction_order(self.index, tier, now):
                if freed >= nbytes:
                    return rows, freed
                dest = self.tiers.demotion_target(tier, victim.size)
                while dest is not None and dest in tiers:
                    dest = self.tiers.demotion_target(dest, victim.size)
                if dest is None:
                    self._evict(victim)
                else:
                    self._move(victim, dest, promotion=False)
                rows, freed = rows + 1, freed + victim.size
        self.relieve()
        return rows, freed

    # --- upkeep ------------------------------------------------------------------------------------------

    def flush_usage(self, *, wait: bool = False) -> None:
        """Write changed hit counts / last-use times back into shm and disk row files."""
        items = []
        for entry in self.index.rows.values():
            if entry.usage_dirty and entry.tier is not CacheTier.RAM and entry.state is not RowState.MOVING:
                entry.usage_dirty = False
                items.append((entry.path, encode_usage(entry.hits, entry.last_used_ns)))
        if not items:
            return
        if wait:
            self.storage.write_usage(items)
        else:
            self.submit(self.storage.write_usage, _ignore, items)

    def holders(self) -> set[int]:
        return {le.pid for le in self.leases.values()}

    def snapshot(self) -> dict[str, Any]:
        return {
            "counters": self.counters.snapshot(),
            "tiers": {t.value: self.tiers[t].snapshot() for t in TIER_ORDER},
            "rows": len(self.index),
            "leases": len(self.leases),
            "dirs": {t.value: str(p) for t, p in self.storage.dirs.items()},
        }


def _ignore(fut: Future[Any]) -> None:
    exc = fut.exception()
    if exc is not None:
        log.warning("background operation failed: %s", exc)


def as_error(exc: BaseException | None) -> ErllamaError:
    if isinstance(exc, ErllamaError):
        return exc
    if isinstance(exc, OSError):
        return io_error(exc)
    return ErllamaError(ErrorCode.INTERNAL, repr(exc))
