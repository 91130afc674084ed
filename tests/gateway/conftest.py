"""One broker (the default model, with thinking and tool-call markers; a spare copy with one sequence; a copy
with the whole 8k context) and one real gateway process in front of it, shared by every gateway test; the
``openai`` SDK pointed at it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from erllama import Client
from erllama.transport import CACHESTORE_SOCKET_NAME, ipc_endpoint
from tests.conftest import REAL_MODEL_ID, BrokerProcess, serving

API_KEY = "sk-test-gateway"
MAX_BODY_BYTES = 1_000_000
GATEWAY_START_TIMEOUT_S = 60.0
TOOL_MARKERS = {"start": "<tool_call>", "end": "</tool_call>"}
THINK_MARKERS = {"start": "<think>", "end": "</think>"}
SPARE_MODEL = "spare"  # one request at a time, a queue of one: for overload and crash tests
# the default model with its whole trained context, for long prompts; in llama.cpp's fast mode: exact mode
# prefills a 4k-token prompt at ~45 tok/s on 2 cores (README, What exact mode costs), the fast one ~115
LONG_MODEL = "long"
LONG_N_CTX = 8192


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(broker_endpoint: str, *args: str, env: dict[str, str] | None = None) -> GatewayProcess:
    """An ``erllama-gateway`` subprocess on a free loopback port, once it answers HTTP."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "erllama.gateway.main",
        "--broker",
        broker_endpoint,
        "--port",
        str(port),
        *args,
    ]
    proc = subprocess.Popen(cmd, env=os.environ | (env or {}), stdin=subprocess.DEVNULL)
    gw = GatewayProcess(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
    while True:
        try:
            httpx.get(f"{gw.url}/health", timeout=5.0)
            return gw
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                gw.stop()
                raise RuntimeError(f"gateway did not start (exit {proc.returncode})") from None
            time.sleep(0.05)


@pytest.fixture(scope="package")
def gw_broker() -> Iterator[BrokerProcess]:
    with serving(
        "erl-gw-",
        REAL_MODEL_ID,
        n_ctx=2048,
        n_seq_max=4,
        tool_call_markers=TOOL_MARKERS,
        thinking_markers=THINK_MARKERS,
    ) as bp:
        with bp.client(timeout_s=120) as c:
            c.load_model(SPARE_MODEL, None, n_ctx=512, n_seq_max=1, max_queue=1)
            c.load_model(LONG_MODEL, None, n_ctx=LONG_N_CTX, n_seq_max=1, exact=False)
        yield bp


@pytest.fixture(scope="package")
def gateway(gw_broker: BrokerProcess) -> Iterator[GatewayProcess]:
    cachestore = ipc_endpoint(Path(gw_broker.runtime_dir), CACHESTORE_SOCKET_NAME)
    gw = start_gateway(
        gw_broker.endpoint,
        "--cachestore",
        cachestore,
        "--max-body-bytes",
        str(MAX_BODY_BYTES),
        env={"ERLLAMA_API_KEYS": API_KEY},
    )
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def oai(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    """The official SDK, no retries (a retried 429 or 503 would hide the status under test)."""
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def erl(gw_broker: BrokerProcess) -> Iterator[Client]:
    with Client(gw_broker.endpoint, timeout_s=120) as c:
        yield c


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
