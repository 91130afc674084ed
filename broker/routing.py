"""Which replica serves a request: the model's load option ``routing`` (``RoutingPolicy``).

Dispatch is credit-based (a replica is sent no more requests than it has free sequences), so a decision
is taken when a replica has a free sequence and the model's queue is not empty:

- ``round_robin``: the oldest request, to the next replica in turn that has room.
- ``least_loaded``: the oldest request, to the replica with the smallest share of its sequences in use.
- ``cache_aware``: each of the oldest ``ROUTING_WINDOW`` waiting requests, oldest first, picks the replica
  where it expects the lowest time to first token, full or not: the tokens that replica would have to
  prefill (the prompt minus what it could restore) at its measured prefill speed, plus the restore of
  what it holds at its tier's speed, plus the prefill already routed to it and not yet done, plus, for a
  replica with no free sequence, the wait for one (its soonest expected end) and for the older requests
  that picked it before (each holding a sequence for the replica's measured service time). A request
  whose pick has room is a candidate; one whose pick is full waits for it: moving a conversation off the
  replica holding it costs its whole history's prefill, which is worth it only when that replica's queue
  is longer than the prefill. Of the candidates, the one with the lowest expected time minus the time
  it has already waited is dispatched, so a request is served in turn even where nothing is cached.
  What a replica holds comes from two places: its cache store's KV events (``KvIndex``, by host) and the
  broker's own record of what each replica ran (its live sequences and the rows they saved, known
  before the next events arrive). With a shared tier, any replica can restore what any store holds, at
  the shared tier's speed.

For every policy, a request with a ``session_id`` goes to the replica holding that session while it is
serving (the session's KV lives in that worker), and a balance guard leaves out a replica whose routed
prefill not yet done exceeds that of the least loaded one with room by more than ``BALANCE_SPREAD_S``
(a replica left out counts as full): a prefix hot
enough to draw every request to one replica then spreads to the others (which cache it in turn).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Protocol

from erllama.blockhash import KV_BLOCK_TOKENS, block_hashes
from erllama.broker.queues import Request
from erllama.broker.registry import ModelEntry, Replica
from erllama.options import RoutingPolicy
from erllama.protocol import CacheTier, CompletionResult, ErllamaError

log = logging.getLogger(__name__)

ROUTING_WINDOW: Final = 32  # waiting requests considered per decision (oldest first)
ROUTING_RECHECK_S: Final = 0.5  # how often held requests are routed again when no event comes
BALANCE_SPREAD_S: Final = 10.0  # routed prefill (seconds at its speed) beyond the least loaded's
LIVE_BLOCKS_PER_SLOT: Final = 512  # the broker's record of a replica's sequences: 32k tokens per sequence
LIVE: Final = "live"  # the tier of a prefix still in the replica's own sequences
# Restore speeds in tokens per second, measured on this machine with the default model (README, Several
# machines): a row in RAM or shm maps and copies at ~100k tokens/s, from disk ~60k, from the shared tier
# over loopback ~12k (24 MB in 163 ms); a live sequence needs no copy.
RESTORE_TOKENS_PER_S: Final[dict[str, float]] = {
    LIVE: 1e9,
    CacheTier.RAM.value: 100_000.0,
    CacheTier.SHM.value: 100_000.0,
    CacheTier.DISK.value: 60_000.0,
    CacheTier.SHARED.value: 12_000.0,
}


class PrefixIndex(Protocol):
    """What the cache stores hold, by source (a host's name, ``""`` for the broker's machine)."""

    def match(self, fingerprint: bytes, blocks: list[int]) -> dict[str, tuple[int, CacheTier]]: ...


@dataclass(slots=True)
class Route:
    """One decision: ``cached_tokens`` restorable on ``replica`` from ``tier``; times in ms."""

    rid: int
    replica: Replica
    reason: str
    cached_tokens: int = 0
    tier: str | None = None
    expected_ttft_ms: float = 0.0

    def describe(self, here: str) -> dict[str, Any]:
        return {
            "rid": self.rid,
            "replica": self.replica.index,
            "host": self.replica.host or here,
            "reason": self.reason,
            "cached_tokens": self.cached_tokens,
            "tier": self.tier,
            "expected_ttft_ms": round(self.expected_ttft_ms, 1),
        }


class LiveBlocks:
    """The broker's record of the prefix blocks one replica has run (prompt and context of each request
    it finished), most recent last, bounded; cleared when the replica's worker is replaced."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def add(self, blocks: list[int]) -> None:
        for b in blocks:
            self.blocks[b] = None
            self.blocks.move_to_end(b)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)

    def leading(self, blocks: list[int]) -> int:
        """How many leading ``blocks`` are known: a prefix's blocks are added together, so the known ones
        form a run from the start and a binary search finds its end."""
        lo, hi = 0, len(blocks)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if blocks[mid - 1] in self.blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo


class Router:
    """Takes each routing decision for the broker's ``Requests.dispatch``."""

    def __init__(
        self,
        requests: dict[int, Request],
        index: PrefixIndex | None = None,
        shared_tier: bool = False,
    ):
        self.requests = requests
        self.index = index  # the cache stores' KV events (broker/kvindex.py)
        self.shared_tier = shared_tier
        self.here = ""  # the broker's own machine's name, for the decisions it shows
        self.live: dict[tuple[str, int], LiveBlocks] = {}  # (model, replica index) -> what it ran
        self.blocks: dict[int, list[int]] = {}  # rid -> its prompt's block hashes, computed once
        self.turns: dict[str, itertools.cycle[int]] = {}  # model -> round-robin order
        self.decisions: dict[str, int] = {}  # reason -> count, for ping and the benchmark

    # --- decisions -----------------------------------------------------------------------------------------

    def choose(self, entry: ModelEntry) -> Route | None:
        """The next (request, replica) to dispatch, or None while no replica has room (or, routing by
        cache, while every waiting request expects its first token sooner by waiting for a full one)."""
        serving = entry.serving()
        if not entry.queue.waiting or not any(r.free_slots for r in serving):
            return None
        backlog_s = {r.index: self._backlog_s(r) for r in serving}
        least = min(backlog_s[r.index] for r in serving if r.free_slots > 0)
        # the guard keeps the least loaded replica with room, so some replica always has room
        room = [r for r in serving if r.free_slots > 0 and backlog_s[r.index] - least <= BALANCE_SPREAD_S]
        policy = RoutingPolicy(entry.options.get("routing", RoutingPolicy.CACHE_AWARE.value))
        if policy is RoutingPolicy.CACHE_AWARE:
            return self._cache_aware(entry, serving, room, backlog_s)
        for rid in itertools.islice(entry.queue.waiting, ROUTING_WINDOW):
            req = self.requests[rid]
            pinned = self._session_replica(entry, req, serving)
            if pinned is not None:
                if pinned in room:
                    return self._decided(entry, Route(rid, pinned, "session"))
                continue  # its session's replica is full: the next request may go meanwhile
            if policy is RoutingPolicy.LEAST_LOADED:
                return self._decided(
                    entry, Route(rid, min(room, key=lambda r: (r.load, r.index)), "least_loaded")
                )
            return self._decided(entry, Route(rid, self._next_in_turn(entry, room), "round_robin"))
        return None

    def _cache_aware(
        self, entry: ModelEntry, serving: list[Replica], room: list[Replica], backlog_s: dict[int, float]
    ) -> Route | None:
        now = time.monotonic()
        # what a full replica makes a request wait: its first free sequence, then the older requests
        # of this window that picked it
        queued_s = {r.index: r.slot_wait_s(now) for r in serving if r.free_slots == 0}
        # a replica the balance guard left out with sequences free is no option this time
        candidates = [r for r in serving if r in room or r.free_slots == 0]
        best: tuple[float, Route] | None = None
        for rid in itertools.islice(entry.queue.waiting, ROUTING_WINDOW):
            req = self.requests[rid]
            pinned = self._session_replica(entry, req, serving)
            if pinned is not None:
                route = Route(rid, pinned, "session")
            else:
                route = self._cheapest(entry, req, candidates, backlog_s, queued_s)
            r = route.replica
            if r not in room:  # it waits for that replica, behind the older ones that picked it
                if r.index in queued_s:
                    queued_s[r.index] += r.service_s / max(r.slots, 1)
                continue
            score = route.expected_ttft_ms / 1000.0 - (now - req.received_s)
            if best is None or score < best[0]:
                best = (score, route)
        return self._decided(entry, best[1]) if best is not None else None

    @staticmethod
    def _backlog_s(r: Replica) -> float:
        """The prefill routed to ``r`` and not yet done, in seconds at its measured speed."""
        return sum(r.prefill_backlog.values()) / max(r.prefill_tokens_per_s, 1.0)

    def _decided(self, entry: ModelEntry, route: Route) -> Route:
        self.decisions[route.reason] = self.decisions.get(route.reason, 0) + 1
        entry.last_route = route.describe(self.here)
        log.info(
            "rid=%d routed to replica %d (host %s): %s, %d tokens cached (%s)",
            route.rid,
            route.replica.index,
            route.replica.host or self.here,
            route.reason,
            route.cached_tokens,
            route.tier,
        )
        return route

    def _session_replica(self, entry: ModelEntry, req: Request, serving: list[Replica]) -> Replica | None:
        sid = req.params.session_id
        index = entry.sessions.get(sid) if sid is not None else None
        if index is None or index >= len(entry.replicas):
            return None
        replica = entry.replicas[index]
        return replica if replica in serving else None

    def _next_in_turn(self, entry: ModelEntry, room: list[Replica]) -> Replica:
        turn = self.turns.setdefault(entry.model_id, itertools.cycle(range(len(entry.replicas))))
        for _ in range(len(entry.replicas)):
            index = next(turn)
            if index < len(entry.replicas) and entry.replicas[index] in room:
                return entry.replicas[index]
        return room[0]

    def _cheapest(
        self,
        entry: ModelEntry,
        req: Request,
        candidates: list[Replica],
        backlog_s: dict[int, float],
        queued_s: dict[int, float],
    ) -> Route:
        """The replica where ``req`` expects its first token soonest, with that expectation (a full
        replica's wait included; ``queued_s`` has an entry for each full one)."""
        held = self._held(entry, req)
        n_prompt = len(req.prompt) if isinstance(req.prompt, list) else 0
        best: Route | None = None
        for r in candidates:
            cached, tier = held.get(r.index, (0, None))
            seconds = max(n_prompt - cached, 0) / max(r.prefill_tokens_per_s, 1.0) + backlog_s[r.index]
            seconds += queued_s.get(r.index, 0.0)
            if tier is not None:
                seconds += cached / RESTORE_TOKENS_PER_S[tier]
            ms = seconds * 1000.0
            if best is None or ms < best.expected_ttft_ms:
                reason = "cache_aware" if cached else "least_cost"
                best = Route(req.rid, r, reason, cached, tier, ms)
        assert best is not None
        return best

    def _held(self, entry: ModelEntry, req: Request) -> dict[int, tuple[int, str]]:
        """Per replica index: the prompt tokens it could restore, and from where."""
        blocks = self._blocks_of(entry, req)
        if not blocks:
            return {}
        found: dict[int, tuple[int, str]] = {}

        def offer(index: int, n_blocks: int, tier: str) -> None:
            tokens = n_blocks * KV_BLOCK_TOKENS
            have = found.get(index)
            if tokens > 0 and (have is None or tokens > have[0]):
                found[index] = (tokens, tier)

        fp = bytes.fromhex(entry.fingerprint or "")
        by_source = self.index.match(fp, blocks) if self.index is not None else {}
        widest = max((n for n, _ in by_source.values()), default=0)
        for r in entry.replicas:
            live = self.live.get((entry.model_id, r.index))
            if live is not None:
                offer(r.index, live.leading(blocks), LIVE)
            n, tier = by_source.get(r.host or "", (0, CacheTier.DISK))
            offer(r.index, n, tier.value)
            if self.shared_tier:
                offer(r.index, widest, CacheTier.SHARED.value)
        return found

    def _blocks_of(self, entry: ModelEntry, req: Request) -> list[int]:
        if not isinstance(req.prompt, list) or not entry.fingerprint:
            return []  # a text prompt is tokenized by the worker: nothing to match it by here
        blocks = self.blocks.get(req.rid)
        if blocks is None:
            try:
                blocks = block_hashes(bytes.fromhex(entry.fingerprint), req.prompt)
            except ErllamaError:  # an id past u32: the worker refuses it; nothing cached can match
                blocks = []
            self.blocks[req.rid] = blocks
        return blocks

    # --- what each replica ran -----------------------------------------------------------------------------

    def dispatched(self, entry: ModelEntry, route: Route) -> None:
        req = self.requests[route.rid]
        replica = route.replica
        replica.routed += 1
        n_prompt = len(req.prompt) if isinstance(req.prompt, list) else 0
        replica.prefill_backlog[req.rid] = max(n_prompt - route.cached_tokens, 0)
        replica.started_s[req.rid] = time.monotonic()
        if req.params.session_id is not None:
            entry.sessions[req.params.session_id] = replica.index
        blocks = self._blocks_of(entry, req)
        if blocks:
            self._live(entry, replica).add(blocks)

    def first_token(self, replica: Replica, rid: int) -> None:
        replica.prefill_backlog.pop(rid, None)

    def finished(
        self, entry: ModelEntry, replica: Replica, rid: int, result: CompletionResult | None
    ) -> None:
        """A request ended on ``replica``: learn its prefill speed and the context it left there."""
        replica.prefill_backlog.pop(rid, None)
        started_s = replica.started_s.pop(rid, None)
        if result is None:
            return
        if started_s is not None:
            prefilled = result.stats.prompt_tokens - result.cache_delta.get("read", 0)
            replica.measured_result(prefilled, result.stats.prefill_ms, time.monotonic() - started_s)
        if result.context_tokens and entry.fingerprint:
            fp = bytes.fromhex(entry.fingerprint)
            self._live(entry, replica).add(block_hashes(fp, result.context_tokens))

    def forget(self, rid: int) -> None:
        self.blocks.pop(rid, None)

    def replaced(self, entry: ModelEntry, replica: Replica) -> None:
        """A replica's worker died or left: its sequences and sessions are gone with it."""
        self.live.pop((entry.model_id, replica.index), None)
        replica.prefill_backlog.clear()
        replica.started_s.clear()
        for sid, index in list(entry.sessions.items()):
            if index == replica.index:
                del entry.sessions[sid]

    def _live(self, entry: ModelEntry, replica: Replica) -> LiveBlocks:
        key = (entry.model_id, replica.index)
        live = self.live.get(key)
        if live is None:
            live = self.live[key] = LiveBlocks(LIVE_BLOCKS_PER_SLOT * max(replica.slots, 1))
        return live
