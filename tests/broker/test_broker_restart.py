"""When the broker dies: streams in flight fail with broker_lost, spawned workers die with it,
operator-started workers register with the next broker, and clients reconnect by themselves."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from erllama import Client, ErllamaError
from erllama.transport import WORKER_SOCKET_NAME, ipc_endpoint
from tests.conftest import remove_runtime, short_tmpdir, start_broker, wait_for


def test_broker_death_and_restart():
    rdir = short_tmpdir("erl-rs-")
    first = start_broker(rdir, "--no-default-model")
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "erllama.worker.main",
            "--id",
            "op",
            "--broker",
            ipc_endpoint(rdir, WORKER_SOCKET_NAME),
            "--options",
            '{"backend": "stub", "stub_decode_ms": 20}',
        ],
    )
    second = None
    client = Client(first.endpoint, timeout_s=30)
    try:
        client.load_model("spawned", backend="stub")
        spawned_pid = client.model_info("spawned")["worker_pid"]
        wait_for(lambda: any(m["id"] == "op" for m in client.list_models()), what="operator worker")
        stream = client.infer("op", "hello", max_tokens=500)
        next(iter(stream))

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        with pytest.raises(ErllamaError) as exc:
            stream.collect()
        assert exc.value.code == "broker_lost"
        wait_for(
            lambda: not psutil.pid_exists(spawned_pid) or psutil.Process(spawned_pid).status() == "zombie",
            what="the spawned worker to exit",
        )
        assert operator.poll() is None  # the operator's worker waits for a broker

        second = start_broker(rdir, "--no-default-model")
        info = wait_for(
            lambda: any(m["id"] == "op" for m in client.list_models()) and client.model_info("op"),
            what="re-registration",
        )
        assert info["worker_pid"] == operator.pid and info["state"] == "ready"
        assert client.complete("op", "again", max_tokens=3).finish_reason == "length"
        assert [m["id"] for m in client.list_models()] == [
            "op"
        ]  # dynamically loaded models are not respawned
    finally:
        client.close()
        operator.send_signal(signal.SIGTERM)
        operator.wait(timeout=10)
        for bp in (first, second):
            if bp is not None:
                bp.stop()
        remove_runtime(rdir)
