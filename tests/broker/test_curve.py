"""A tcp endpoint with CURVE: only clients with an allowed key get in; ipc stays as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from erllama import Client, ErllamaError
from tests.broker.test_endpoints import free_port
from tests.conftest import remove_runtime, short_tmpdir, start_broker


def keys(directory: Path, name: str) -> tuple[Path, Path]:
    subprocess.run(
        [sys.executable, "-m", "erllama.cli", "keys", str(directory), "--name", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def test_only_clients_with_an_allowed_key_reach_a_curve_tcp_endpoint(tmp_path: Path):
    server_pub, server_secret = keys(tmp_path / "server", "server")
    allowed_pub, allowed_secret = keys(tmp_path / "alice", "alice")
    _, stranger_secret = keys(tmp_path / "mallory", "mallory")
    clients = tmp_path / "allowed"
    clients.mkdir()
    (clients / "alice.key").write_bytes(allowed_pub.read_bytes())
    tcp = f"tcp://127.0.0.1:{free_port()}"
    rdir = short_tmpdir("erl-cv-")
    bp = start_broker(
        rdir,
        "--no-default-model",
        "--no-cache",
        "--tcp",
        tcp,
        "--curve-secret-key",
        str(server_secret),
        "--curve-clients",
        str(clients),
    )
    try:
        with Client(
            tcp, curve_key=str(allowed_secret), curve_server_key=str(server_pub), timeout_s=10
        ) as alice:
            alice.load_model("s", backend="stub", n_ctx=128)
            assert alice.complete("s", "over curve", max_tokens=3).finish_reason == "length"
        for who in ({}, {"curve_key": str(stranger_secret), "curve_server_key": str(server_pub)}):
            with Client(tcp, timeout_s=2, **who) as outsider, pytest.raises(ErllamaError) as exc:
                outsider.ping()
            assert exc.value.code in ("timeout", "broker_lost")  # refused at the handshake, never served
        with Client(bp.endpoint, timeout_s=10) as local:  # the ipc socket: guarded by its 0700 directory
            assert local.complete("s", "over ipc", max_tokens=2).finish_reason == "length"
    finally:
        bp.stop()
        remove_runtime(rdir)
