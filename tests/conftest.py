"""Fixtures shared by every test: real broker processes in private runtime directories."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from erllama import Client, ErllamaError, InferStream
from erllama.protocol import DEFAULT_MODEL_ID
from erllama.transport import CLIENT_SOCKET_NAME, ipc_endpoint
from tests.redis_support import RedisServer

T = TypeVar("T")
BROKER_START_TIMEOUT_S = 30.0
BROKER_STOP_TIMEOUT_S = 30.0
REAL_MODEL_ID = DEFAULT_MODEL_ID
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (scripts/ is not a package), registered as ``scripts_<name>``:
    dataclasses look their module up while the class is built."""
    module_name = f"scripts_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class BrokerProcess:
    """An ``erllama-broker`` subprocess with its own runtime directory."""

    proc: subprocess.Popen[bytes]
    runtime_dir: Path
    endpoint: str
    clients: list[Client] = field(default_factory=list)

    def client(self, **kw) -> Client:
        c = Client(self.endpoint, **kw)
        self.clients.append(c)
        return c

    def stop(self) -> int:
        for c in self.clients:
            c.close()
        self.clients.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=BROKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def remove_runtime(runtime_dir: Path) -> None:
    """Delete a test broker's runtime dir and its shm tier."""
    shutil.rmtree(cache_dirs(runtime_dir)[1], ignore_errors=True)
    shutil.rmtree(runtime_dir, ignore_errors=True)


def error_when_closed_mid_stream(c: Client, stream: InferStream) -> ErllamaError:
    """Close ``c`` while another thread waits on its running ``stream``; the error that thread gets."""
    next(iter(stream))  # it runs
    outcome: list[ErllamaError] = []
    reader = threading.Thread(
        target=lambda: outcome.append(pytest.raises(ErllamaError, stream.collect).value)
    )
    reader.start()
    c.close()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the reader still waits for a reply that cannot come"
    return outcome[0]


def short_tmpdir(prefix: str) -> Path:
    """ipc socket paths are limited to 107 characters, so runtime dirs live directly under /tmp."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_for(pred: Callable[[], T], timeout_s: float = 30.0, what: str = "condition") -> T:
    """Poll until ``pred`` is truthy and return its value: a guard against hangs, never a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def cache_dirs(runtime_dir: Path) -> tuple[Path, Path]:
    """The disk and shm tier directories a test broker's cache store uses (removed with the broker)."""
    return runtime_dir / "kv", Path("/dev/shm") / f"erllama-test-{runtime_dir.name}"


def start_broker(
    runtime_dir: Path, *args: str, env: dict[str, str] | None = None, stderr: Any = None
) -> BrokerProcess:
    """``stderr``: where the broker's log (and its children's, which it passes through) goes."""
    endpoint = ipc_endpoint(runtime_dir, CLIENT_SOCKET_NAME)
    disk, shm = cache_dirs(runtime_dir)
    cmd = [
        sys.executable,
        "-m",
        "erllama.broker.main",
        "--runtime-dir",
        str(runtime_dir),
        "--cache-dir",
        str(disk),
        "--shm-dir",
        str(shm),
        *args,
    ]
    proc = subprocess.Popen(cmd, env=(os.environ | (env or {})), stdin=subprocess.DEVNULL, stderr=stderr)
    bp = BrokerProcess(proc, runtime_dir, endpoint)
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    with Client(endpoint, timeout_s=1.0) as probe:
        while True:
            try:
                probe.ping()
                return bp
            except ErllamaError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    bp.stop()
                    raise RuntimeError(f"broker did not start (exit {proc.returncode})") from None


@contextmanager
def serving(
    prefix: str,
    model_id: str,
    *broker_args: str,
    env: dict[str, str] | None = None,
    model_path: Path | None = None,
    **load_options: Any,
) -> Iterator[BrokerProcess]:
    """A broker of its own serving ``model_path`` (default: the real default model) as ``model_id``;
    removed on exit."""
    rdir = short_tmpdir(prefix)
    bp = start_broker(rdir, "--no-default-model", *broker_args, env=env)
    try:
        bp.client(timeout_s=120).load_model(model_id, str(model_path) if model_path else None, **load_options)
        yield bp
    finally:
        bp.stop()
        remove_runtime(rdir)


@pytest.fixture(scope="session")
def reference() -> Any:
    """llama-cpp-python's own Llama on the default model, loaded once for the session."""
    from tests.reference import ReferenceModel

    return ReferenceModel.load()


@pytest.fixture(scope="session")
def memory_model() -> Callable[[str], Path]:
    """``memory_model(kind)``: the path of a tiny random-weight model of a llama.cpp memory kind
    (``llama``, ``swa``, ``recurrent``, ``hybrid``, ``encdec``; see ``tests/memory_models.py``), built
    once per machine into ``~/.cache/erllama/test-models/``."""
    from tests.memory_models import memory_model_path

    return memory_model_path


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` of its own (password, ``maxmemory``, ``allkeys-lru``), killed after."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    """A fresh broker with no model loaded."""
    rdir = short_tmpdir("erl-t-")
    bp = start_broker(rdir, "--no-default-model")
    try:
        yield bp
    finally:
        bp.stop()
        remove_runtime(rdir)


@pytest.fixture
def client(broker: BrokerProcess) -> Client:
    return broker.client()


@pytest.fixture
def stub_client(broker: BrokerProcess) -> Client:
    """A client of a broker serving the stub backend as model ``stub``."""
    c = broker.client()
    c.load_model("stub", backend="stub", n_ctx=512, n_seq_max=4)
    return c


@pytest.fixture(scope="session")
def real_broker() -> Iterator[BrokerProcess]:
    """One broker for the session serving the embedded default model (SmolLM2-135M) as
    ``smollm2-135m``. Tests that crash or reconfigure things use their own broker."""
    rdir = short_tmpdir("erl-r-")
    bp = start_broker(rdir, "--no-default-model")
    try:
        with bp.client(timeout_s=60.0) as c:
            c.load_model(REAL_MODEL_ID, None, n_ctx=2048, n_seq_max=4)
        yield bp
    finally:
        bp.stop()
        remove_runtime(rdir)


@pytest.fixture
def real_client(real_broker: BrokerProcess) -> Iterator[Client]:
    c = Client(real_broker.endpoint, timeout_s=60.0)
    try:
        yield c
    finally:
        c.close()
