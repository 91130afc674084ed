"""A model on several replicas (one worker process each) behind one queue, and the routing policies that
pick a replica per request, over the stub backend on the broker's own machine (tests/host covers
replicas on hosts, with the real model)."""

from __future__ import annotations

import os
import random
import signal
import socket

import pytest

from erllama import Client, ErllamaError
from tests.conftest import wait_for

STUB = {"backend": "stub", "n_ctx": 1024, "n_seq_max": 1}
SLOW_STUB = STUB | {"stub_decode_ms": 20}


def words(seed: int, n_tokens: int) -> list[int]:
    """A token prompt of the stub's byte tokens (ids 2..257), different for each seed."""
    rng = random.Random(seed)
    return [rng.randrange(2 + 97, 2 + 123) for _ in range(n_tokens)]


def routed(c: Client, model: str) -> list[int]:
    return [r["routed"] for r in c.model_info(model)["replicas"]]


def test_two_replicas_run_two_workers_behind_one_queue(client: Client):
    info = client.load_model("m", replicas=2, **SLOW_STUB)
    pids = [r["worker_pid"] for r in info["replicas"]]
    assert len(set(pids)) == 2 and info["slots"] == 2
    streams = [client.infer("m", f"prompt {i}", max_tokens=30) for i in range(5)]
    info = wait_for(lambda: (i := client.model_info("m"))["running"] == 2 and i, what="both replicas busy")
    assert [r["running"] for r in info["replicas"]] == [1, 1]
    assert info["pending_len"] == 3 and client.queue_depth("m") == 5
    assert all(s.collect().finish_reason == "length" for s in streams)
    assert sum(routed(client, "m")) == 5 and min(routed(client, "m")) >= 1
    # a broker without hosts lists its own machine, named for its hostname, with both workers
    [here] = client.list_hosts()
    assert (here["name"], here["state"], here["local"]) == (socket.gethostname(), "up", True)
    assert sorted(w["pid"] for w in here["workers"]) == sorted(pids) and "m" in here["models"]
    assert {r["host"] for r in client.model_info("m")["replicas"]} == {socket.gethostname()}


def test_round_robin_sends_each_request_to_the_next_replica(client: Client):
    client.load_model("rr", replicas=3, routing="round_robin", **STUB)
    for i in range(6):
        client.complete("rr", f"turn {i}", max_tokens=2)
    assert routed(client, "rr") == [2, 2, 2]
    assert client.model_info("rr")["last_route"]["reason"] == "round_robin"


def test_least_loaded_sends_a_request_past_a_busy_replica(client: Client):
    client.load_model("ll", replicas=2, routing="least_loaded", **(SLOW_STUB | {"n_seq_max": 2}))
    long = client.infer("ll", "a long one", max_tokens=200)
    wait_for(lambda: client.model_info("ll")["running"] == 1, what="one running")
    busy = next(r["index"] for r in client.model_info("ll")["replicas"] if r["running"])
    client.complete("ll", "a short one", max_tokens=2)
    assert client.model_info("ll")["last_route"]["replica"] != busy
    long.cancel()


def test_cache_aware_sends_a_conversations_next_turn_to_the_replica_that_ran_it(client: Client):
    client.load_model("ca", replicas=2, **SLOW_STUB)
    firsts = [words(seed, 300) for seed in range(2)]
    # both at once: one replica each (one sequence each)
    streams = [client.infer("ca", prompt, max_tokens=8) for prompt in firsts]
    results = [s.collect() for s in streams]
    assert all(r.finish_reason == "length" for r in results)
    assert routed(client, "ca") == [1, 1]
    ran_on: dict[int, int] = {}
    # each conversation's next turn, in turn, while both replicas are free: the one holding it is chosen
    for _ in range(2):
        for seed, (prompt, result) in enumerate(zip(firsts, results)):
            nxt = result.context_tokens + words(100 + seed, 40)
            client.complete("ca", nxt, max_tokens=4)
            route = client.model_info("ca")["last_route"]
            assert route["reason"] == "cache_aware" and route["cached_tokens"] >= 256
            assert route["replica"] == ran_on.setdefault(seed, route["replica"])
    assert ran_on[0] != ran_on[1]


def test_a_sessions_requests_stay_on_the_replica_holding_it(client: Client):
    client.load_model("ss", replicas=2, routing="round_robin", **STUB)
    replicas = set()
    for i in range(4):
        client.complete("ss", f"session turn {i}", max_tokens=2, session_id="s1")
        replicas.add(client.model_info("ss")["last_route"]["replica"])
    assert len(replicas) == 1
    assert client.model_info("ss")["last_route"]["reason"] == "session"


def test_a_crashed_replica_restarts_while_the_other_keeps_the_model_serving(client: Client):
    info = client.load_model("cr", replicas=2, **STUB)
    victim = info["replicas"][0]["worker_pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: client.model_info("cr")["replicas"][0]["state"] != "ready", what="replica 0 down")
    assert client.model_info("cr")["state"] == "ready"
    for i in range(4):
        assert client.complete("cr", f"still serving {i}", max_tokens=3).finish_reason == "length"
    back = wait_for(
        lambda: (r := client.model_info("cr")["replicas"][0])["state"] == "ready" and r, 60, "replica 0 back"
    )
    assert back["restarts"] == 1 and back["worker_pid"] != victim


@pytest.mark.parametrize(
    "placement",
    [{"replicas": 0}, {"replicas": 65}, {"replicas": 2, "host": "h1"}, {"hosts": ["h1", "h1"]}],
)
def test_a_placement_out_of_range_or_contradictory_is_invalid_params(client: Client, placement: dict):
    with pytest.raises(ErllamaError) as exc:
        client.load_model("bad", backend="stub", n_ctx=256, **placement)
    assert exc.value.code == "invalid_params"
    assert client.list_models() == []


def test_an_unknown_routing_policy_is_invalid_params(client: Client):
    with pytest.raises(ErllamaError) as exc:
        client.load_model("bad", backend="stub", n_ctx=256, routing="random")
    assert exc.value.code == "invalid_params" and "routing" in exc.value.message
