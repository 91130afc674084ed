"""A model with a replica on each of several hosts: cache-aware routing to the host that holds a
conversation, a host's death or a partition from the broker while its replica serves, and placement by
count. Each host is its own process group on its own loopback address (tests/host/cluster.py)."""

from __future__ import annotations

import signal

import pytest

from erllama import ErllamaError
from tests.conftest import wait_for
from tests.host.cluster import BROKER_MACHINE, cluster

SLOW_STUB = {"backend": "stub", "n_ctx": 512, "n_seq_max": 1, "stub_decode_ms": 20}
SENTENCE = "The ferry to the northern islands leaves at dawn when the harbour master rings the bell. "


def test_a_conversations_next_turn_goes_to_the_host_whose_cache_holds_it():
    """Real model, one replica per host: each turn goes where its conversation's rows are, and hits there."""
    with cluster(("h1", "h2")) as cl:
        cl.start_host("h1", "127.0.0.2")
        cl.start_host("h2", "127.0.0.3")
        c = cl.client(timeout_s=180)
        info = c.load_model("m", hosts=["h1", "h2"], n_ctx=1024, n_seq_max=1)
        assert [r["host"] for r in info["replicas"]] == ["h1", "h2"]
        assert info["routing"] == "cache_aware" and all(r["state"] == "ready" for r in info["replicas"])
        prompts = [c.tokenize("m", f"Conversation {i}. " + SENTENCE * 6) for i in range(2)]
        streams = [c.infer("m", p, max_tokens=6, temperature=0) for p in prompts]  # one replica each
        firsts = [s.collect() for s in streams]
        assert sorted(r["routed"] for r in c.model_info("m")["replicas"]) == [1, 1]
        homes: dict[int, str] = {}
        for turn in range(2):
            for i, first in enumerate(firsts):
                follow = first.context_tokens + c.tokenize("m", f" Turn {turn}: and then?", add_special=False)
                result = c.complete("m", follow, max_tokens=4, temperature=0)
                route = c.model_info("m")["last_route"]
                assert route["reason"] == "cache_aware" and route["cached_tokens"] >= 64
                assert route["host"] == homes.setdefault(i, route["host"])
                assert result.cache_hit_kind in ("exact", "partial", "sticky")
                assert result.cache_delta["read"] >= len(first.context_tokens) - 64
        assert homes[0] != homes[1]


def test_a_hosts_death_leaves_the_model_serving_on_the_other_replica():
    with cluster(("h1", "h2")) as cl:
        h1 = cl.start_host("h1", "127.0.0.2")
        cl.start_host("h2", "127.0.0.3")
        c = cl.client(timeout_s=60)
        c.load_model("m", hosts=["h1", "h2"], routing="round_robin", **SLOW_STUB)
        streams = [c.infer("m", f"long reply {i}", max_tokens=400) for i in range(2)]
        for s in streams:
            next(iter(s))
        h1.signal_group(signal.SIGKILL)  # the machine goes away: host, cache store and worker at once
        outcomes = []
        for s in streams:
            try:
                outcomes.append(s.collect().finish_reason)
            except ErllamaError as err:
                outcomes.append(err.code)
                assert err.detail["host"] == "h1"
        assert sorted(outcomes) == ["length", "worker_crashed"]
        info = c.model_info("m")
        assert info["state"] == "ready"
        assert [r["state"] for r in info["replicas"]] == ["unavailable", "ready"]
        for i in range(3):
            assert c.complete("m", f"still served {i}", max_tokens=3).finish_reason == "length"
        cl.start_host("h1", "127.0.0.2")  # it comes back: its replica is placed again
        wait_for(lambda: c.model_info("m")["replicas"][0]["state"] == "ready", 30, "replica on h1 again")


def test_a_host_cut_off_from_the_broker_is_declared_dead_its_requests_move_and_it_rejoins():
    """The host process stops (SIGSTOP: alive, but silent to the broker, as behind a partition) while its
    worker still talks to the broker: the broker stops using that worker all the same; the host, once
    it is heard again, joins from a clean slate and its replica is placed again."""
    with cluster(("h1", "h2")) as cl:
        h1 = cl.start_host("h1", "127.0.0.2")
        cl.start_host("h2", "127.0.0.3")
        c = cl.client(timeout_s=60)
        c.load_model("m", hosts=["h1", "h2"], **SLOW_STUB)
        h1.proc.send_signal(signal.SIGSTOP)  # the host only, not its worker
        try:
            wait_for(lambda: cl.state_of(c, "h1") == "dead", 30, "h1 declared dead")
            assert c.model_info("m")["replicas"][0]["state"] == "unavailable"
            results = [c.complete("m", f"during the partition {i}", max_tokens=3) for i in range(3)]
            assert all(r.finish_reason == "length" for r in results)
            assert c.model_info("m")["replicas"][0]["routed"] == 0
        finally:
            h1.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: cl.state_of(c, "h1") == "up", 30, "h1 rejoins")
        wait_for(lambda: c.model_info("m")["replicas"][0]["state"] == "ready", 30, "replica on h1 again")
        assert next(h for h in c.list_hosts() if h["name"] == "h1")["joins"] == 2


def test_replicas_by_count_are_placed_on_the_machines_that_are_up_the_brokers_own_among_them():
    with cluster(("h1",)) as cl:
        cl.start_host("h1", "127.0.0.2")
        c = cl.client(timeout_s=60)
        info = c.load_model("m", replicas=2, backend="stub", n_ctx=256)
        assert sorted(r["host"] for r in info["replicas"]) == sorted([BROKER_MACHINE, "h1"])
        assert [h["models"] for h in c.list_hosts()] == [["m"], ["m"]]
        for i in range(4):
            assert c.complete("m", f"by count {i}", max_tokens=3).finish_reason == "length"
        with pytest.raises(ErllamaError) as exc:
            c.load_model("too-many", replicas=3, backend="stub", n_ctx=256)
        assert exc.value.code == "invalid_params"
        assert sorted(exc.value.detail["hosts_up"]) == sorted([BROKER_MACHINE, "h1"])


def test_a_replica_placed_by_count_moves_to_another_machine_when_its_host_dies():
    """Two hosts and the broker's own machine, two replicas: the one on a host that dies moves to the
    machine that had none, whichever it is."""
    with cluster(("h1", "h2")) as cl:
        procs = {name: cl.start_host(name, f"127.0.0.{i + 2}") for i, name in enumerate(("h1", "h2"))}
        c = cl.client(timeout_s=60)
        info = c.load_model("m", replicas=2, backend="stub", n_ctx=256)
        placed = [r["host"] for r in info["replicas"]]
        spare = ({BROKER_MACHINE, "h1", "h2"} - set(placed)).pop()
        lost = next(i for i, h in enumerate(placed) if h != BROKER_MACHINE)
        procs[placed[lost]].signal_group(signal.SIGKILL)
        wait_for(lambda: cl.state_of(c, placed[lost]) == "dead", 30, "its host declared dead")
        moved = wait_for(
            lambda: (r := c.model_info("m")["replicas"][lost])["state"] == "ready" and r, 60, "replica moved"
        )
        assert moved["host"] == spare and c.model_info("m")["replicas"][1 - lost]["host"] == placed[1 - lost]
        assert c.complete("m", "served after the move", max_tokens=3).finish_reason == "length"
