"""``erllama serve``: a broker and the gateway from one command; the SDK works against it at once (a
request sent while the default model still loads waits for it), and stopping it stops the broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import openai
import psutil

from tests.conftest import REAL_MODEL_ID, cache_dirs, remove_runtime, short_tmpdir, wait_for
from tests.gateway.conftest import free_port


def test_erllama_serve_answers_the_openai_sdk_and_stops_its_broker_with_it():
    runtime = short_tmpdir("erl-sv-")
    disk, shm = cache_dirs(runtime)
    env = os.environ | {
        "ERLLAMA_RUNTIME_DIR": str(runtime),
        "ERLLAMA_CACHE_DIR": str(disk),
        "ERLLAMA_SHM_DIR": str(shm),
        "ERLLAMA_BROKER": "",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "erllama.cli", "serve", "--port", str(port)], env=env)
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 120, "erllama serve to answer")
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as oai:
            r = oai.chat.completions.create(
                model=REAL_MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
            )
        assert r.choices[0].message.content and r.usage.completion_tokens == 4
        (broker,) = [p for p in psutil.Process(proc.pid).children() if "erllama.broker.main" in p.cmdline()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not broker.is_running()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        remove_runtime(runtime)
