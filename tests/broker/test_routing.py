"""``Router`` routing by cache, decision by decision on a model of two replicas (no processes: the
decisions are the broker's alone; tests/broker/test_replicas.py and tests/host/test_host_replicas.py
cover the same routing through real brokers, hosts and workers)."""

from __future__ import annotations

import time

from erllama.blockhash import KV_BLOCK_TOKENS
from erllama.broker.queues import ModelQueue, Request
from erllama.broker.registry import ModelEntry, Replica
from erllama.broker.routing import BALANCE_SPREAD_S, Route, Router
from erllama.protocol import ModelState, SamplingParams

SPEED_TOKENS_PER_S = 100.0
SERVICE_S = 1.0
HISTORY = list(range(1000, 1000 + 30 * KV_BLOCK_TOKENS))  # a conversation of 1,920 tokens


class Model:
    """A model with replicas A (index 0) and B (index 1), one sequence each, their figures measured."""

    def __init__(self) -> None:
        self.requests: dict[int, Request] = {}
        self.router = Router(self.requests)
        queue = ModelQueue("m", max_queue=100)
        self.entry = ModelEntry("m", None, {"routing": "cache_aware"}, queue, fingerprint="ab" * 16)
        for i in range(2):
            r = Replica("m", i, None, state=ModelState.READY, slots=1)
            r.prefill_tokens_per_s, r.service_s, r.measured = SPEED_TOKENS_PER_S, SERVICE_S, True
            self.entry.replicas.append(r)
        self.a, self.b = self.entry.replicas

    def submit(self, prompt: list[int]) -> int:
        rid = len(self.requests) + 1
        self.requests[rid] = Request(rid, b"c", str(rid), "m", prompt, SamplingParams(max_tokens=8))
        self.entry.queue.enqueue(rid)
        return rid

    def dispatch(self) -> Route | None:
        """What the broker does with a decision (lifecycle.Requests.dispatch), minus the sending."""
        route = self.router.choose(self.entry)
        if route is not None:
            self.entry.queue.remove(route.rid)
            route.replica.running.add(route.rid)
            self.router.dispatched(self.entry, route)
        return route

    def run_on_a(self, prompt: list[int]) -> int:
        """A request that runs on A (B is kept busy meanwhile, so A is the only choice), past its
        prefill."""
        self.b.running.add(-1)
        rid = self.submit(prompt)
        route = self.dispatch()
        assert route is not None and route.replica is self.a
        self.b.running.discard(-1)
        self.router.first_token(self.a, rid)
        return rid


def test_a_conversations_turn_waits_for_the_busy_replica_holding_it_rather_than_prefill_it_elsewhere() -> (
    None
):
    m = Model()
    m.run_on_a(HISTORY)  # A holds the conversation and is busy with it, expected to end within a second
    rid = m.submit([*HISTORY, *range(5000, 5100)])
    assert m.dispatch() is None  # B has room, but 19 s of prefill there against ~2 s here
    assert list(m.entry.queue.waiting) == [rid]
    other = m.submit(list(range(9000, 9300)))  # cached nowhere: B takes it meanwhile
    route = m.dispatch()
    assert route is not None and (route.rid, route.replica) == (other, m.b)


def test_a_turn_leaves_for_another_replica_once_the_one_holding_it_overruns_its_expected_time() -> None:
    m = Model()
    first = m.run_on_a(HISTORY)
    rid = m.submit([*HISTORY, *range(5000, 5100)])
    assert m.dispatch() is None
    m.a.started_s[first] = time.monotonic() - 40.0  # 39 s past its expected end: A looks stuck
    route = m.dispatch()
    assert route is not None and (route.rid, route.replica, route.reason) == (rid, m.b, "least_cost")


def test_older_turns_waiting_for_a_replica_send_a_later_one_elsewhere() -> None:
    m = Model()
    m.run_on_a(HISTORY)
    turn = [*HISTORY, *range(5000, 5100)]
    held = [m.submit(turn) for _ in range(24)]  # 24 turns queued for A: 24 s of A's sequence
    route = m.dispatch()
    # B's 20 s of prefill is sooner than A only for a turn with ~18 others ahead of it: that one moves,
    # the oldest keep waiting for A
    assert route is not None and route.replica is m.b and route.rid in held[15:]
    assert held[:15] == list(m.entry.queue.waiting)[:15]


def test_the_balance_guard_sends_past_a_replica_whose_routed_prefill_is_too_far_ahead() -> None:
    m = Model()
    m.a.slots = 2
    m.run_on_a(HISTORY)
    m.a.running.clear()  # finished; A still holds it and has a sequence free
    # 15 s of prefill routed to A and not yet done: past the spread, though restoring there is cheaper
    m.a.prefill_backlog[99] = int((BALANCE_SPREAD_S + 5) * SPEED_TOKENS_PER_S)
    rid = m.submit([*HISTORY, *range(5000, 5100)])
    route = m.dispatch()
    assert route is not None and (route.rid, route.replica, route.reason) == (rid, m.b, "least_cost")


def test_a_turn_goes_to_the_replica_holding_it_when_it_has_room() -> None:
    m = Model()
    first = m.run_on_a(HISTORY)
    m.a.running.discard(first)
    m.router.finished(m.entry, m.a, first, None)
    rid = m.submit([*HISTORY, *range(5000, 5100)])
    route = m.dispatch()
    assert route is not None and (route.rid, route.replica, route.reason) == (rid, m.a, "cache_aware")
    assert route.cached_tokens == len(HISTORY)
