"""llama.cpp's own ``llama-server`` beside erllama in one benchmark run: started on a free port with the
default model, stopped on exit. Built from the vendored llama.cpp source (``llama_batched_bench.build``)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import httpx
from llama_batched_bench import build as build_llama_tool

from erllama.models import default_model_path

START_TIMEOUT_S: Final = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def http_server(cmd: list[str], url: str, ready_path: str) -> Iterator[str]:
    """A server subprocess, once ``ready_path`` answers 200; stopped (SIGTERM, then SIGKILL) on exit."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(url + ready_path, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start (exit {proc.poll()})")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def llama_server(
    n_ctx_per_slot: int, slots: int, threads: int, alias: str, model: Path | None = None
) -> Iterator[str]:
    """``llama-server`` with its defaults but for the context (``n_ctx_per_slot`` cells for each of
    ``slots`` slots, as erllama gives each sequence), threads, flash attention on (what its ``auto`` picks
    on a CPU) and the model's own template; its base URL."""
    binary = str(build_llama_tool("llama-server"))
    port = free_port()
    cmd = [
        binary,
        "-m",
        str(model or default_model_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(n_ctx_per_slot * slots),
        "-np",
        str(slots),
        "-t",
        str(threads),
        "-fa",
        "on",
        "--jinja",
        "--alias",
        alias,
    ]
    with http_server(cmd, f"http://127.0.0.1:{port}", "/health") as url:
        yield url
