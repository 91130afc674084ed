"""A broker that takes hosts, and ``erllama-host`` processes on their own loopback addresses, for tests.

Each host is its own process group (so a SIGKILL of the group is the machine going away: the host, its
cache store and its workers at once) with its own runtime, shm and disk directories, and connects from
its own loopback address (127.0.0.2, 127.0.0.3, ...) through ZeroMQ's source-address syntax.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erllama import Client
from tests.broker.test_curve import keys
from tests.broker.test_endpoints import free_port
from tests.conftest import BrokerProcess, remove_runtime, short_tmpdir, start_broker, wait_for

HOST_STOP_TIMEOUT_S = 30.0
BROKER_MACHINE = "hub"  # the broker's own machine's name among the hosts (``--name``)


@dataclass
class HostProcess:
    name: str
    address: str
    proc: subprocess.Popen[bytes]
    runtime_dir: Path
    shm_dir: Path

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout_s: float = HOST_STOP_TIMEOUT_S) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
        self.signal_group(signal.SIGKILL)  # whatever of its group is left
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


@dataclass
class Cluster:
    broker: BrokerProcess
    keys_dir: Path
    hosts_endpoint: str
    broker_args: tuple[str, ...]
    hosts: list[HostProcess] = field(default_factory=list)

    def restart_broker(self) -> None:
        """Stop the broker and start another on the same directories and endpoints."""
        self.broker.stop()
        self.broker = start_broker(self.broker.runtime_dir, *self.broker_args)

    def client(self, **kw: Any) -> Client:
        return self.broker.client(**kw)

    def host_command(
        self, name: str, address: str, *args: str, curve: bool = True, key: str | None = None
    ) -> list[str]:
        """``erllama-host`` connecting from ``address``; ``key``: another key pair's name than ``name``."""
        port = self.hosts_endpoint.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "erllama.host.main", "--broker", f"tcp://{address}:0;127.0.0.1:{port}"]
        cmd += ["--name", name, *args]
        if curve:
            k = key or name
            cmd += ["--curve-key", str(self.keys_dir / f"{k}.key_secret")]
            cmd += ["--curve-server-key", str(self.keys_dir / "server.key")]
        return cmd

    def start_host(self, name: str, address: str, *args: str) -> HostProcess:
        """A host of its own, waited for until the broker lists it ``up``."""
        rdir = short_tmpdir(f"erl-h-{name}-")
        shm = Path("/dev/shm") / f"erllama-test-{rdir.name}"
        cmd = self.host_command(
            name,
            address,
            "--runtime-dir",
            str(rdir),
            "--cache-dir",
            str(rdir / "kv"),
            "--shm-dir",
            str(shm),
            *args,
        )
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        host = HostProcess(name, address, proc, rdir, shm)
        self.hosts.append(host)
        with Client(self.broker.endpoint, timeout_s=10) as c:
            wait_for(lambda: self.state_of(c, name) == "up" or proc.poll() is not None, 60, f"host {name} up")
        assert proc.poll() is None, f"host {name} exited with {proc.returncode}"
        return host

    @staticmethod
    def joined(c: Client) -> list[dict[str, Any]]:
        """``list_hosts`` without the broker's own machine (always its first row)."""
        rows = c.list_hosts()
        assert rows[0]["name"] == BROKER_MACHINE and rows[0]["local"]
        return rows[1:]

    @staticmethod
    def state_of(c: Client, name: str) -> str | None:
        return next((h["state"] for h in c.list_hosts() if h["name"] == name), None)


@contextmanager
def cluster(host_names: tuple[str, ...] = ("h1",), *broker_args: str) -> Iterator[Cluster]:
    """A broker with a CURVE host endpoint (and no model), whose allowlist holds the keys of ``host_names``."""
    work = short_tmpdir("erl-cl-")
    keys_dir, allowed = work / "keys", work / "allowed"
    allowed.mkdir()
    keys(keys_dir, "server")
    for name in host_names:
        public, _ = keys(keys_dir, name)
        (allowed / public.name).write_bytes(public.read_bytes())
    hosts_endpoint = f"tcp://127.0.0.1:{free_port()}"
    rdir = short_tmpdir("erl-clb-")
    args = (
        "--no-default-model",
        "--name",
        BROKER_MACHINE,
        "--hosts",
        hosts_endpoint,
        "--curve-secret-key",
        str(keys_dir / "server.key_secret"),
    )
    args += ("--curve-clients", str(allowed), *broker_args)
    cl = Cluster(start_broker(rdir, *args), keys_dir, hosts_endpoint, args)
    try:
        yield cl
    finally:
        for host in cl.hosts:
            host.stop()
        cl.broker.stop()
        remove_runtime(rdir)
        shutil.rmtree(work, ignore_errors=True)
