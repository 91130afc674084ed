"""Child processes a supervisor watches (the workers and the cache store): spawning, stderr, exit details.

The pieces of one machine's supervision (``host/supervise.py`` ``MachineSupervisor``, which each
``erllama-host`` runs, and the broker in-process for its own machine). The parent learns of a death from
the kernel (a pidfd becomes readable) rather than from a missed heartbeat: a ``GGML_ASSERT`` abort is seen
within one poll. Each child's stderr is a pipe read without blocking; the
lines are passed through to the parent's own stderr and the tail is kept for crash reports.
Operator-started workers have no pidfd; their death or hang shows as silence. A worker placed on
another host is known to the broker by ``host`` and pid only: that host's supervisor watches it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

log = logging.getLogger(__name__)

STDERR_TAIL_LINES: Final = 40
STDERR_TAIL_BYTES: Final = 4096
RESTART_BACKOFF_INITIAL_S: Final = 0.5
RESTART_BACKOFF_MAX_S: Final = 30.0
CRASH_WINDOW_S: Final = 120.0
MAX_CRASHES_IN_WINDOW: Final = 5
TERMINATE_GRACE_S: Final = 10.0


@dataclass(slots=True)
class ChildProcess:
    """A process the broker watches: spawned by it (``proc`` set) or, for workers, operator-started."""

    name: str
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    stderr_fd: int = -1
    started_s: float = field(default_factory=time.monotonic)
    kill_reason: str | None = None  # why the broker killed it (silence, stall), for the crash report
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))
    _partial: bytes = b""

    @property
    def spawned(self) -> bool:
        return self.proc is not None

    def read_stderr(self) -> bool:
        """Pass through what the worker wrote to stderr and keep its tail. False at EOF."""
        try:
            chunk = os.read(self.stderr_fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            chunk = b""
        if not chunk:
            if self._partial:
                self.stderr_tail.append(self._partial.decode(errors="replace"))
                self._partial = b""
            return False
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self.stderr_tail.append(line.decode(errors="replace")[:STDERR_TAIL_BYTES])
        return True

    def tail_text(self) -> str:
        return "\n".join(self.stderr_tail)[-STDERR_TAIL_BYTES:]

    def exit_detail(self) -> dict[str, Any]:
        """How the process ended: exit status or signal name, and the tail of its stderr."""
        detail: dict[str, Any] = {"pid": self.pid, "stderr_tail": self.tail_text()}
        if self.kill_reason:
            detail["killed_because"] = self.kill_reason
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is None:
                try:
                    rc = self.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    rc = None
            if rc is not None and rc < 0:
                detail["signal"] = signal.Signals(-rc).name
            elif rc is not None:
                detail["exit_status"] = rc
        return detail

    def kill(self) -> None:
        """SIGKILL a spawned worker; an operator's worker is not ours to kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, grace_s: float) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns once the process has exited."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()

    def close_fds(self) -> None:
        for fd in (self.pidfd, self.stderr_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.stderr_fd = -1


@dataclass(slots=True)
class WorkerProcess(ChildProcess):
    """A model's worker; ``name`` is the model id."""

    identity: bytes | None = None  # ZeroMQ routing id, known once it sends ``ready``
    last_seen_s: float = field(default_factory=time.monotonic)
    progress: int = 0
    progress_changed_s: float = field(default_factory=time.monotonic)
    busy: bool = False
    host: str | None = None  # the host whose supervisor runs it; None: this machine (or an operator)
    replica: int = 0  # which of the model's replicas it serves

    @property
    def model_id(self) -> str:
        return self.name


@dataclass(slots=True)
class FdWatch:
    """The pidfds and stderr pipes of a supervisor's children, registered with its poller."""

    poller: zmq.Poller
    fds: dict[int, ChildProcess] = field(default_factory=dict)

    def watch(self, child: ChildProcess) -> None:
        for fd in (child.pidfd, child.stderr_fd):
            self.fds[fd] = child
            self.poller.register(fd, zmq.POLLIN)

    def unwatch(self, child: ChildProcess) -> None:
        """Stop watching ``child`` (after reading what is left of its stderr)."""
        if child.stderr_fd >= 0:
            while child.read_stderr():
                pass
        for fd in (child.pidfd, child.stderr_fd):
            if fd in self.fds:
                self.poller.unregister(fd)
                del self.fds[fd]

    def on_fd(self, fd: int) -> ChildProcess | None:
        """Pass its stderr through; returns the child if ``fd`` is its pidfd (it has ended)."""
        child = self.fds[fd]
        if fd == child.stderr_fd:
            if not child.read_stderr():
                self.poller.unregister(fd)
                del self.fds[fd]
            return None
        return child


def console_command(script: str, module: str) -> list[str]:
    """A console script from the same environment as the broker, else ``python -m module``."""
    path = Path(sys.executable).with_name(script)
    if path.exists():
        return [str(path)]
    found = shutil.which(script)
    return [found] if found else [sys.executable, "-m", module]


def _popen(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start a child with its stderr on a non-blocking pipe; returns it, its pidfd and that pipe."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    assert proc.stderr is not None
    stderr_fd = proc.stderr.fileno()
    os.set_blocking(stderr_fd, False)
    return proc, os.pidfd_open(proc.pid), stderr_fd


def spawn_worker(
    model_id: str,
    model_path: str | None,
    options: dict[str, Any],
    endpoint: str,
    runtime_dir: Path,
    log_level: str,
    cachestore: str | None,
    curve: tuple[str, str] | None = None,
    replica: int = 0,
) -> WorkerProcess:
    """Start a worker process; the caller polls its pidfd and stderr. ``curve``: (this machine's key file
    with its secret, the broker's public key file) for a worker that reaches the broker over tcp;
    ``replica``: which of the model's replicas it is."""
    cmd = console_command("erllama-worker", "erllama.worker.main") + [
        "--id",
        model_id,
        "--broker",
        endpoint,
        "--runtime-dir",
        str(runtime_dir),
        "--options",
        json.dumps(options),
        "--parent-pid",
        str(os.getpid()),
        "--log-level",
        log_level,
        "--replica",
        str(replica),
    ]
    if model_path:
        cmd += ["--model", model_path]
    cmd += ["--cachestore", cachestore] if cachestore else ["--no-cache"]
    if curve is not None:
        cmd += ["--curve-key", curve[0], "--curve-server-key", curve[1]]
    proc, pidfd, stderr_fd = _popen(cmd)
    log.info("spawned worker for %s: pid %d", model_id, proc.pid)
    return WorkerProcess(
        name=model_id, pid=proc.pid, proc=proc, pidfd=pidfd, stderr_fd=stderr_fd, replica=replica
    )


def spawn_cachestore(args: list[str], env: dict[str, str] | None = None) -> ChildProcess:
    """Start the cache store with the broker's cache settings (``erllama-cachestore`` flags; ``env``:
    variables added to the broker's environment, for settings that must not show in its argv)."""
    cmd = (
        console_command("erllama-cachestore", "erllama.cachestore.main")
        + args
        + ["--parent-pid", str(os.getpid())]
    )
    proc, pidfd, stderr_fd = _popen(cmd, os.environ | env if env else None)
    log.info("spawned the cache store: pid %d", proc.pid)
    return ChildProcess(name="cachestore", pid=proc.pid, proc=proc, pidfd=pidfd, stderr_fd=stderr_fd)


@dataclass(slots=True)
class RestartPolicy:
    """Exponential backoff between restarts; too many crashes in a window marks the model failed."""

    crash_times: deque[float] = field(default_factory=deque)
    backoff_s: float = RESTART_BACKOFF_INITIAL_S

    def record_crash(self, now: float) -> bool:
        """Note a crash; True if the model may be restarted, False if it has crashed too often."""
        self.crash_times.append(now)
        while self.crash_times and now - self.crash_times[0] > CRASH_WINDOW_S:
            self.crash_times.popleft()
        return len(self.crash_times) < MAX_CRASHES_IN_WINDOW

    def next_delay(self) -> float:
        delay = self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, RESTART_BACKOFF_MAX_S)
        return delay

    def reset(self) -> None:
        self.backoff_s = RESTART_BACKOFF_INITIAL_S
