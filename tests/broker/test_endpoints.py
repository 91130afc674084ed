"""Endpoints: ipc in a private runtime dir, optional tcp on loopback, one broker per runtime dir."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys

from erllama import Client
from tests.conftest import BrokerProcess, remove_runtime, short_tmpdir, start_broker, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runtime_dir_is_private_and_a_second_broker_on_it_refuses_to_start(broker: BrokerProcess):
    mode = stat.S_IMODE(broker.runtime_dir.stat().st_mode)
    assert mode == 0o700
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "erllama.broker.main",
            "--no-default-model",
            "--runtime-dir",
            str(broker.runtime_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode != 0 and "broker.lock" in second.stderr
    assert broker.client().ping()["pid"] == broker.proc.pid  # the first one still owns its endpoints


def test_a_loopback_tcp_endpoint_serves_clients_and_a_public_one_is_refused():
    rdir = short_tmpdir("erl-tcp-")
    tcp = f"tcp://127.0.0.1:{free_port()}"
    bp = start_broker(rdir, "--no-default-model", "--tcp", tcp)
    try:
        with Client(tcp) as c:
            c.load_model("s", backend="stub", n_ctx=128)
            assert c.complete("s", "over tcp", max_tokens=3).finish_reason == "length"
    finally:
        bp.stop()
        remove_runtime(rdir)
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "erllama.broker.main",
            "--no-default-model",
            "--runtime-dir",
            str(rdir),
            "--tcp",
            f"tcp://0.0.0.0:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr
    remove_runtime(rdir)


def test_the_client_reads_its_endpoint_from_the_environment(broker: BrokerProcess, monkeypatch):
    monkeypatch.setenv("ERLLAMA_BROKER", broker.endpoint)
    with Client() as c:
        assert c.ping()["pid"] == broker.proc.pid


def test_a_toml_config_loads_its_models_at_start(tmp_path):
    cfg = tmp_path / "erllama.toml"
    cfg.write_text(
        '[[models]]\nid = "from-config"\noptions = { backend = "stub", n_ctx = 256, n_seq_max = 2 }\n'
    )
    rdir = short_tmpdir("erl-cfg-")
    bp = start_broker(rdir, "--config", str(cfg))
    try:
        c = bp.client(timeout_s=30)

        info = wait_for(lambda: (i := c.model_info("from-config"))["state"] == "ready" and i)
        assert info["slots"] == 2 and info["options"]["n_ctx"] == 256
    finally:
        bp.stop()
        remove_runtime(rdir)
