"""Routing, queueing and the broker's own tables, over the stub backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from erllama import Client, ErllamaError
from tests.conftest import BrokerProcess, error_when_closed_mid_stream, wait_for


def test_a_worker_is_never_sent_more_requests_than_it_has_slots(client: Client):
    client.load_model("slow", backend="stub", n_ctx=256, n_seq_max=2, stub_decode_ms=20)
    streams = [client.infer("slow", f"prompt {i}", max_tokens=30) for i in range(6)]
    info = wait_for(lambda: (i := client.model_info("slow"))["running"] == 2 and i, what="two running")
    assert info["pending_len"] == 4 and info["queue_depth"] == 6
    assert client.queue_depth("slow") == 6 and client.queue_depth() == 6
    assert info["phase"] in ("prefilling", "generating")
    results = [s.collect() for s in streams]
    assert all(r.finish_reason == "length" and len(r.generated) == 30 for r in results)
    assert client.queue_depth() == 0
    assert wait_for(lambda: client.phase("slow") == "idle", what="idle")
    assert client.last_cache_hit("slow") == {"kind": "cold", "prefix_len": 0}


def test_each_stream_gets_only_its_own_tokens(stub_client: Client):
    prompts = [f"stream number {i}" for i in range(12)]
    solo = [stub_client.complete("stub", p, max_tokens=20).generated for p in prompts]
    streams = [stub_client.infer("stub", p, max_tokens=20) for p in prompts]
    got = [[t for ev in s for t in ev.token_ids] for s in streams]
    assert got == solo


def test_cancel_of_a_queued_request_answers_cancelled_without_reaching_a_worker(client: Client):
    client.load_model("one", backend="stub", n_ctx=256, n_seq_max=1, stub_decode_ms=20)
    first = client.infer("one", "busy", max_tokens=100)
    second = client.infer("one", "queued", max_tokens=5)
    wait_for(lambda: client.pending_len("one") == 1, what="queued")
    assert client.cancel(second.request_id) is True
    assert second.collect().finish_reason == "cancelled"
    first.cancel()
    assert first.collect().finish_reason == "cancelled"
    assert client.cancel("no-such-request") is False


def test_load_unload_and_list_models(client: Client):
    info = client.load_model("a", backend="stub", n_ctx=128)
    assert info["state"] == "ready" and info["n_ctx"] == 128 and info["options"]["backend"] == "stub"
    with pytest.raises(ErllamaError) as exc:
        client.load_model("a", backend="stub")
    assert exc.value.code == "already_loaded"
    assert [m["id"] for m in client.list_models()] == ["a"]
    client.unload_model("a")
    assert client.list_models() == []
    with pytest.raises(ErllamaError) as exc:
        client.complete("a", "x")
    assert exc.value.code == "model_not_found"


def test_unload_while_streaming_ends_the_stream(client: Client):
    client.load_model("u", backend="stub", n_ctx=256, stub_decode_ms=10)
    stream = client.infer("u", "hello", max_tokens=200)
    next(iter(stream))
    client.unload_model("u")
    assert stream.collect().finish_reason == "cancelled"


def test_a_killed_worker_fails_its_streams_and_is_restarted(client: Client):
    client.load_model("k", backend="stub", n_ctx=256, n_seq_max=2, stub_decode_ms=10)
    pid = client.model_info("k")["worker_pid"]
    stream = client.infer("k", "hello", max_tokens=200)
    next(iter(stream))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ErllamaError) as exc:
        stream.collect()
    assert exc.value.code == "worker_crashed"
    assert exc.value.detail["signal"] == "SIGKILL"
    info = wait_for(lambda: (i := client.model_info("k"))["state"] == "ready" and i, what="restart")
    assert info["worker_pid"] != pid and info["restarts"] == 1
    assert client.complete("k", "again", max_tokens=3).finish_reason == "length"


def test_an_operator_started_worker_registers_and_serves(broker: BrokerProcess, client: Client):
    from erllama.transport import WORKER_SOCKET_NAME, ipc_endpoint

    cmd = [
        sys.executable,
        "-m",
        "erllama.worker.main",
        "--id",
        "manual",
        "--options",
        '{"backend": "stub"}',
        "--broker",
        ipc_endpoint(broker.runtime_dir, WORKER_SOCKET_NAME),
    ]
    proc = subprocess.Popen(cmd)
    try:
        info = wait_for(
            lambda: any(m["id"] == "manual" for m in client.list_models()) and client.model_info("manual")
        )
        assert info["spawned"] is False and info["worker_pid"] == proc.pid
        assert client.complete("manual", "hi", max_tokens=4).finish_reason == "length"
    finally:
        proc.terminate()
        proc.wait(timeout=60)  # a bound, not a timing: on a loaded machine the worker may still be starting


def test_status_cli_prints_phase_queue_depth_and_pending_length(broker: BrokerProcess, stub_client: Client):
    out = subprocess.run(
        [sys.executable, "-m", "erllama.cli", "--endpoint", broker.endpoint, "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[:5] == ["MODEL", "STATE", "PHASE", "QUEUE", "PENDING"]
    assert row.split()[:5] == ["stub", "ready", "idle", "0", "0"]


def test_a_worker_stuck_in_a_decode_is_killed_and_a_request_present_at_two_crashes_fails_as_poison(
    client: Client,
):
    # The stub sleeps 60 s in each decode: heartbeats keep coming, the decode counter does not move.
    client.load_model("stuck", backend="stub", stub_decode_ms=60_000, stall_timeout_s=2)
    first_pid = client.model_info("stuck")["worker_pid"]
    with pytest.raises(ErllamaError) as exc:
        client.complete("stuck", "hello", max_tokens=3)
    assert exc.value.code == "worker_crashed"
    assert exc.value.detail["poison"] is True  # re-queued once after the first kill, failed at the second
    assert "no decode progress" in exc.value.detail["killed_because"]
    info = client.model_info("stuck")
    assert info["restarts"] >= 1 and info["worker_pid"] != first_pid


def test_a_frozen_worker_is_declared_dead_and_restarted(client: Client):
    client.load_model("frozen", backend="stub")
    pid = client.model_info("frozen")["worker_pid"]
    os.kill(pid, signal.SIGSTOP)  # no heartbeats at all from a stopped process
    try:
        info = wait_for(lambda: (i := client.model_info("frozen"))["worker_pid"] not in (pid, None) and i, 60)
        assert "silent" in info["last_error"]["detail"]["killed_because"] or info["state"] == "ready"
        wait_for(lambda: client.model_info("frozen")["state"] == "ready", 60)
        assert client.complete("frozen", "back", max_tokens=2).finish_reason == "length"
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_closing_a_client_fails_its_streams_in_flight_with_client_closed(broker: BrokerProcess):
    c = Client(broker.endpoint, timeout_s=30.0)
    c.load_model("slow", backend="stub", n_ctx=256, n_seq_max=1, stub_decode_ms=20)
    stream = c.infer("slow", "a long one", max_tokens=200, timeout_s=600.0)
    assert error_when_closed_mid_stream(c, stream).code == "client_closed"
