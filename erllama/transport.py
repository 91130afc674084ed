"""Runtime directory, endpoints and ZeroMQ socket construction shared by every process.

All sockets are made here so that every one of them gets a size limit, LINGER 0 and the
ROUTER options that make an unroutable reply an error instead of a silent drop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq

from erllama.protocol import ErllamaError, ErrorCode

log = logging.getLogger(__name__)

RUNTIME_DIR_ENV = "ERLLAMA_RUNTIME_DIR"
BROKER_ENDPOINT_ENV = "ERLLAMA_BROKER"
CLIENT_SOCKET_NAME = "broker.sock"
WORKER_SOCKET_NAME = "workers.sock"
CACHESTORE_SOCKET_NAME = "cachestore.sock"
BROKER_LOCK_NAME = "broker.lock"
IPC_PATH_MAX_CHARS = 107  # sun_path on Linux, without the "ipc://" prefix


def default_runtime_dir() -> Path:
    """``$ERLLAMA_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/erllama``, else ``/tmp/erllama-<uid>``."""
    env = os.environ.get(RUNTIME_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "erllama"
    return Path(f"/tmp/erllama-{os.getuid()}")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` mode 0700 and refuse one owned by another user or open to others.

    ipc sockets have no authentication of their own: the directory's permissions are the
    access control, so a directory someone else could write into is an error, not a warning.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ErllamaError(ErrorCode.INVALID_PARAMS, f"runtime directory {path} is owned by uid {st.st_uid}")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(path, 0o700)
    return path


def ipc_endpoint(runtime_dir: Path, name: str) -> str:
    path = str(runtime_dir / name)
    if len(path) > IPC_PATH_MAX_CHARS:
        raise ErllamaError(
            ErrorCode.INVALID_PARAMS,
            f"ipc path {path!r} exceeds {IPC_PATH_MAX_CHARS} characters; use a shorter runtime dir",
        )
    return f"ipc://{path}"


def default_client_endpoint() -> str:
    """The endpoint a client connects to: ``$ERLLAMA_BROKER``, else the broker's default ipc socket."""
    return os.environ.get(BROKER_ENDPOINT_ENV) or ipc_endpoint(default_runtime_dir(), CLIENT_SOCKET_NAME)


def check_tcp_bind(endpoint: str, allow_remote: bool) -> None:
    """Refuse a tcp bind beyond loopback unless the operator said so explicitly."""
    if not endpoint.startswith("tcp://"):
        return
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return
    if not allow_remote:
        raise ErllamaError(
            ErrorCode.INVALID_PARAMS,
            f"{endpoint} is not loopback; pass --allow-remote to bind it (and use --curve)",
        )


@dataclass(slots=True)
class InstanceLock:
    """An flock held for the life of a process: a second broker on the same runtime dir fails fast
    instead of silently stealing the ipc endpoints (a second ipc bind takes them over)."""

    path: Path
    fd: int = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ErllamaError(ErrorCode.ALREADY_LOADED, f"another process holds {self.path}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def make_socket(
    ctx: zmq.Context, kind: int, max_frame_bytes: int, *, identity: bytes | None = None
) -> zmq.Socket:
    """A socket with the options every erllama socket needs. Options that only apply to later
    binds or connects (MAXMSGSIZE) are set here, before either."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
    if kind == zmq.DEALER:
        # No IMMEDIATE: a client or worker that starts before the broker queues its first
        # messages on the pending connection instead of blocking or dropping them.
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock
