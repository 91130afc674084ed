"""Test support for the cache store: a real daemon subprocess and helper processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from erllama.cachestore.client import CacheClient
from erllama.protocol import ErllamaError

STARTUP_WAIT_S = 60.0  # a bound on waiting, not a performance assertion
QUIET_WAIT_S = 60.0


class Daemon:
    """One ``erllama-cachestore`` subprocess on private directories."""

    def __init__(self, root: Path, shm_dir: Path, disk_dir: Path):
        self.root = root
        self.endpoint = f"ipc://{root}/cs.sock"
        self.shm_dir = shm_dir
        self.disk_dir = disk_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: list[CacheClient] = []
        self.log_path = root / "daemon.log"
        self.options: dict[str, Any] = {}

    def start(self, **options: Any) -> Daemon:
        """Start (or restart with the same options unless given): ``ram_bytes=...`` -> ``--ram-bytes``."""
        if options:
            self.options = options
        argv = [
            sys.executable,
            "-m",
            "erllama.cachestore.main",
            "--endpoint",
            self.endpoint,
            "--shm-dir",
            str(self.shm_dir),
            "--disk-dir",
            str(self.disk_dir),
            "--log-level",
            "DEBUG",
        ]
        for name, value in self.options.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        with open(self.log_path, "ab") as log:
            # preexec_fn: the test process has threads, but the child only sets resource limits before exec.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._preexec)  # noqa: PLW1509
        self._wait_ready()
        return self

    preexec: Any = None

    def _preexec(self) -> None:
        if self.preexec is not None:
            self.preexec()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_WAIT_S
        probe = CacheClient(self.endpoint, timeout_s=0.5)
        try:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"cache store exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    probe.stats()
                    return
                except ErllamaError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cache store did not come up:\n{self.log()}") from None
        finally:
            probe.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, timeout_s: float = 10.0) -> CacheClient:
        c = CacheClient(self.endpoint, timeout_s=timeout_s)
        self.clients.append(c)
        return c

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def wait_quiet(self, client: CacheClient) -> dict[str, Any]:
        """Stats once no background I/O, move or reservation is in flight."""
        deadline = time.monotonic() + QUIET_WAIT_S
        while True:
            s = client.stats()
            busy = (
                s["pending_io"]
                or s["reservations"]
                or any(t["reserved"] or t["outgoing"] for t in s["tiers"].values())
            )
            if not busy:
                return s
            if time.monotonic() > deadline:
                raise RuntimeError(f"cache store never went quiet: {s}")
            time.sleep(0.02)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        self.kill()


def payload_for(seed: int, size: int) -> bytes:
    """Deterministic, incompressible-looking bytes for a row."""
    import random

    return random.Random(seed).randbytes(size)


def spawn_python(code: str, *args: str) -> subprocess.Popen[str]:
    """A helper process running ``code`` (the real-process half of race and crash tests)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
