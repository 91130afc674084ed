"""Hosts (``erllama-host``) joining a broker over CURVE tcp: placing models on them, drains, host deaths and
refusals. Each host is its own process group on its own loopback address (tests/host/cluster.py)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from erllama import AsyncClient, ErllamaError
from tests.broker.test_curve import keys
from tests.conftest import wait_for
from tests.host.cluster import BROKER_MACHINE, cluster


async def async_hosts(endpoint: str) -> list[str]:
    async with AsyncClient(endpoint, timeout_s=10) as c:
        return [h["name"] for h in await c.list_hosts()]


SLOW_STUB = {"backend": "stub", "n_ctx": 512, "stub_decode_ms": 20}


def test_a_host_joins_advertises_what_it_has_and_serves_a_model_placed_on_it():
    with cluster(("h1",)) as cl:
        cl.start_host("h1", "127.0.0.2")
        c = cl.client(timeout_s=30)
        [h1] = cl.joined(c)
        assert (h1["name"], h1["state"], h1["address"]) == ("h1", "up", "127.0.0.2")
        r = h1["resources"]
        assert r["cores"] >= 1 and r["memory_total_bytes"] >= r["memory_available_bytes"] > 0
        assert r["gpus"] or r["gpu_error"] == "no_gpu"  # this machine has none: reported, never a failure
        assert r["kv_free_bytes"] > 0  # from the host's own cache store
        info = c.load_model("remote", host="h1", backend="stub", n_ctx=256)
        assert (info["state"], info["host"]) == ("ready", "h1")
        c.load_model("local", backend="stub", n_ctx=256)  # the broker's own machine works as before
        assert c.complete("remote", "placed on a host", max_tokens=5).finish_reason == "length"
        assert c.complete("local", "on the broker's machine", max_tokens=5).finish_reason == "length"
        by_id = {m["id"]: m for m in c.list_models()}
        assert by_id["remote"]["host"] == "h1" and by_id["local"]["host"] == BROKER_MACHINE
        pid = by_id["remote"]["worker_pid"]
        wait_for(lambda: [w["pid"] for w in cl.joined(c)[0]["workers"]] == [pid], 10, "the worker in a beat")
        assert cl.joined(c)[0]["models"] == ["remote"]
        assert asyncio.run(async_hosts(cl.broker.endpoint)) == [BROKER_MACHINE, "h1"]
        shown = subprocess.run(
            [sys.executable, "-m", "erllama.cli", "--endpoint", cl.broker.endpoint, "hosts"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        assert shown[shown.index("h1") : shown.index("h1") + 2] == ["h1", "up"] and "remote" in shown
        with pytest.raises(ErllamaError) as exc:
            c.load_model("nowhere", host="h9", backend="stub")
        assert exc.value.code == "host_not_found"


def test_a_model_configured_for_a_host_is_placed_once_that_host_joins(tmp_path: Path):
    config = tmp_path / "erllama.toml"
    stub = 'options = { backend = "stub", n_ctx = 128 }\n'
    config.write_text(
        f'[[models]]\nid = "later"\nhost = "h1"\n{stub}'
        f'[[models]]\nid = "split"\nhosts = ["{BROKER_MACHINE}", "h1"]\n{stub}'
    )
    with cluster(("h1",), "--config", str(config)) as cl:
        c = cl.client(timeout_s=30)
        info = c.model_info("later")
        assert (info["state"], info["host"], info["last_error"]["code"]) == ("unavailable", "h1", "host_down")
        wait_for(lambda: c.model_info("split")["state"] == "ready", 30, "its replica on the broker's machine")
        assert [r["state"] for r in c.model_info("split")["replicas"]] == ["ready", "unavailable"]
        cl.start_host("h1", "127.0.0.2")
        wait_for(lambda: c.model_info("later")["state"] == "ready", 30, "placed on h1")
        wait_for(lambda: c.model_info("split")["replicas"][1]["state"] == "ready", 30, "split placed on h1")
        assert c.complete("later", "configured", max_tokens=3).finish_reason == "length"
        assert [h["models"] for h in c.list_hosts()] == [["split"], ["later", "split"]]


def test_sigterm_drains_a_host_its_running_stream_finishes_new_requests_are_refused_then_it_leaves():
    with cluster(("h1",)) as cl:
        host = cl.start_host("h1", "127.0.0.2")
        c = cl.client(timeout_s=30)
        c.load_model("m", host="h1", **SLOW_STUB)
        stream = c.infer("m", "a long reply", max_tokens=60)
        next(iter(stream))
        host.proc.send_signal(
            signal.SIGTERM
        )  # the host process only, as `kill PID` or systemd's KillMode=mixed
        wait_for(lambda: c.model_info("m")["state"] == "draining", 10, "draining")
        with pytest.raises(ErllamaError) as exc:
            c.complete("m", "too late", max_tokens=2)
        assert exc.value.code == "host_down"
        result = stream.collect()
        assert (result.finish_reason, len(result.generated)) == ("length", 60)  # in flight: it finished
        assert host.wait() == 0
        assert cl.state_of(c, "h1") == "left"
        info = c.model_info("m")
        assert info["state"] == "unavailable" and info["last_error"]["code"] == "host_down"


def test_sigkill_of_a_host_mid_stream_ends_it_with_worker_crashed_others_keep_serving_and_the_host_rejoins():
    with cluster(("h1", "h2")) as cl:
        h1 = cl.start_host("h1", "127.0.0.2")
        cl.start_host("h2", "127.0.0.3")
        c = cl.client(timeout_s=60)
        c.load_model("a", host="h1", **SLOW_STUB)
        c.load_model("b", host="h2", backend="stub", n_ctx=256)
        stream = c.infer("a", "cut off", max_tokens=400)
        next(iter(stream))
        h1.signal_group(signal.SIGKILL)  # the machine goes away: host, cache store and worker at once
        assert c.complete("b", "the other host", max_tokens=3).finish_reason == "length"
        with pytest.raises(ErllamaError) as exc:
            stream.collect()
        assert exc.value.code == "worker_crashed"
        assert exc.value.detail["host"] == "h1"
        assert cl.state_of(c, "h1") == "dead" and cl.state_of(c, "h2") == "up"
        assert c.model_info("a")["state"] == "unavailable"
        with pytest.raises(ErllamaError) as exc:
            c.complete("a", "nowhere to run", max_tokens=2)
        assert exc.value.code == "host_down"
        assert c.complete("b", "still serving", max_tokens=3).finish_reason == "length"
        cl.start_host("h1", "127.0.0.2")  # it comes back: joins again, and its model is placed again
        wait_for(lambda: c.model_info("a")["state"] == "ready", 30, "a placed again")
        assert c.complete("a", "back", max_tokens=3).finish_reason == "length"
        assert next(h for h in c.list_hosts() if h["name"] == "h1")["joins"] == 2


def test_after_a_broker_restart_a_host_joins_the_new_broker_by_itself():
    with cluster(("h1",)) as cl:
        cl.start_host("h1", "127.0.0.2")
        cl.client(timeout_s=30).load_model("m", host="h1", backend="stub", n_ctx=128)
        cl.restart_broker()
        c = cl.client(timeout_s=30)
        wait_for(lambda: cl.state_of(c, "h1") == "up", 30, "h1 up on the new broker")
        assert c.list_models() == []  # a model loaded at run time is loaded again, as without hosts
        c.load_model("m", host="h1", backend="stub", n_ctx=128)
        assert c.complete("m", "new broker", max_tokens=3).finish_reason == "length"


def test_a_host_without_curve_with_an_unknown_key_or_with_a_name_in_use_is_refused(tmp_path: Path):
    with cluster(("h1",)) as cl:
        keys(cl.keys_dir, "mallory")  # a key pair the broker's allowlist does not hold
        c = cl.client(timeout_s=10)
        for kw in ({"curve": False}, {"key": "mallory"}):
            cmd = cl.host_command(
                "intruder", "127.0.0.4", "--no-cache", "--runtime-dir", str(tmp_path / "i"), **kw
            )
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr
            assert "host_refused" in done.stderr
        assert cl.joined(c) == []
        assert c.ping()["hosts_refused"] >= 2  # and the broker logged each refusal
        cl.start_host("h1", "127.0.0.2")
        twin = cl.host_command(
            "h1", "127.0.0.5", "--no-cache", "--runtime-dir", str(tmp_path / "twin")
        )  # an allowed key, but the name is taken
        done = subprocess.run(twin, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "already joined" in done.stderr, done.stderr
        assert [(h["name"], h["state"], h["address"]) for h in cl.joined(c)] == [("h1", "up", "127.0.0.2")]
        usurper = cl.host_command(
            BROKER_MACHINE, "127.0.0.6", "--no-cache", "--runtime-dir", str(tmp_path / "u"), key="h1"
        )  # an allowed key under the broker's own machine's name
        done = subprocess.run(usurper, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "already joined" in done.stderr, done.stderr
        assert [h["name"] for h in c.list_hosts()] == [BROKER_MACHINE, "h1"]


def test_the_brokers_own_machine_is_a_host_that_is_always_up_listed_and_placed_on_by_name():
    with cluster(("h1",)) as cl:
        c = cl.client(timeout_s=30)
        [here] = c.list_hosts()
        assert (here["name"], here["state"], here["local"], here["models"]) == (
            BROKER_MACHINE,
            "up",
            True,
            [],
        )
        r = here["resources"]
        assert r["cores"] >= 1 and r["memory_total_bytes"] >= r["memory_available_bytes"] > 0
        assert r["gpus"] or r["gpu_error"] == "no_gpu"
        wait_for(lambda: (c.list_hosts()[0]["resources"]["kv_free_bytes"] or 0) > 0, 10, "its store's room")
        assert c.list_hosts()[0]["cachestore_up"]
        info = c.load_model("here", host=BROKER_MACHINE, backend="stub", n_ctx=256)
        assert (info["state"], info["host"], info["replicas"][0]["host"]) == ("ready", *[BROKER_MACHINE] * 2)
        [here] = c.list_hosts()
        assert here["models"] == ["here"] and [w["pid"] for w in here["workers"]] == [info["worker_pid"]]
        assert c.complete("here", "on the broker's machine", max_tokens=3).finish_reason == "length"
        assert c.model_info("here")["last_route"]["host"] == BROKER_MACHINE


def test_the_real_model_on_a_host_answers_as_on_the_brokers_machine_and_hits_the_hosts_own_cache():
    prompt = "Notes from a long meeting about the harbour, the ferries and the fish market. " * 10
    with cluster(("h1",)) as cl:
        cl.start_host("h1", "127.0.0.2")
        c = cl.client(timeout_s=120)
        c.load_model("remote", host="h1", n_ctx=1024, n_seq_max=2)  # no path: the host's embedded model
        c.load_model("local", n_ctx=1024, n_seq_max=2)
        cold = c.complete("remote", prompt, max_tokens=12)
        assert cold.generated == c.complete("local", prompt, max_tokens=12).generated
        warm = c.complete("remote", prompt, max_tokens=12)
        assert warm.generated == cold.generated
        assert warm.cache_hit_kind in ("exact", "partial") and warm.cache_delta["read"] > 0
        assert c.model_info("remote")["host"] == "h1"
