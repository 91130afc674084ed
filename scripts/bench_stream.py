#!/usr/bin/env python3
"""Single-stream decode speed: client -> broker -> worker process, against llama-cpp-python in one process.

Both decode the same greedy tokens from the same model file with the same context settings,
alternating rounds in one run so that machine noise hits both alike. Prints tokens/s for
each, their ratio (goal >= 0.95), and the p50/p99 time from a token leaving the worker to
the client receiving it.

    python scripts/bench_stream.py [--tokens 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as llama_lowlevel

from erllama import Client, ErllamaError
from erllama.models import default_model_path
from erllama.transport import CLIENT_SOCKET_NAME, ipc_endpoint

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"  # the model keeps counting: no early end of generation
N_CTX = 2048
MODEL_ID = "bench"


def direct_model() -> llama_cpp.Llama:
    default = llama_lowlevel.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False  # the AMX repack path crashes here, and the worker turns it off too
        return p

    llama_lowlevel.llama_model_default_params = params
    try:
        return llama_cpp.Llama(
            model_path=str(default_model_path()),
            n_ctx=N_CTX,
            n_batch=512,
            n_threads=os.cpu_count(),
            n_threads_batch=os.cpu_count(),
            flash_attn=True,
            verbose=False,
        )
    finally:
        llama_lowlevel.llama_model_default_params = default


def direct_round(llm: llama_cpp.Llama, n: int) -> tuple[float, list[int]]:
    """Decode tokens/s of llama-cpp-python's own generate loop, timed from the first token."""
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.reset()
    out: list[int] = []
    t_first = 0.0
    for tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        if not out:
            t_first = time.perf_counter()
        out.append(tok)
        if len(out) == n:
            break
    return (n - 1) / (time.perf_counter() - t_first), out


def erllama_round(c: Client, n: int) -> tuple[float, list[int], list[float]]:
    out: list[int] = []
    lat: list[float] = []
    t_first = 0.0
    stream = c.infer(MODEL_ID, PROMPT, max_tokens=n, temperature=0.0)
    for ev in stream:
        if not out:
            t_first = time.perf_counter()
        out.extend(ev.token_ids)
        if ev.latency_ms is not None:
            lat.append(ev.latency_ms)
    return (len(out) - 1) / (time.perf_counter() - t_first), out, lat


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    rdir = Path(tempfile.mkdtemp(prefix="erl-bench-", dir="/tmp"))
    env = os.environ | {"ERLLAMA_LOG_LEVEL": "WARNING"}
    broker = subprocess.Popen(
        [sys.executable, "-m", "erllama.broker.main", "--no-default-model", "--runtime-dir", str(rdir)],
        env=env,
    )
    try:
        c = Client(ipc_endpoint(rdir, CLIENT_SOCKET_NAME), timeout_s=120)
        deadline = time.monotonic() + 30
        while True:
            try:
                c.ping()
                break
            except ErllamaError:
                if time.monotonic() > deadline:
                    raise
        c.load_model(MODEL_ID, None, n_ctx=N_CTX, n_seq_max=1)
        llm = direct_model()
        erllama_round(c, 16)  # warm both paths once
        direct_round(llm, 16)
        ours, theirs, lat = [], [], []
        same = True
        for _ in range(args.rounds):
            tps, toks, l = erllama_round(c, args.tokens)
            ours.append(tps)
            lat.extend(l)
            dtps, dtoks = direct_round(llm, args.tokens)
            theirs.append(dtps)
            same = same and toks == dtoks
        o, d = statistics.median(ours), statistics.median(theirs)
        print(f"single-stream decode, {args.tokens} tokens, median of {args.rounds} alternating rounds")
        print(f"{'path':<44}{'tokens/s':>10}")
        print(f"{'client -> broker -> worker (erllama)':<44}{o:>10.1f}")
        print(f"{'llama-cpp-python in one process':<44}{d:>10.1f}")
        print(f"{'ratio erllama / direct (goal >= 0.95)':<44}{o / d:>10.3f}")
        print(
            f"worker -> client latency per token: p50 {pct(lat, 0.5):.3f} ms, p99 {pct(lat, 0.99):.3f} ms "
            f"({len(lat)} tokens)"
        )
        print(f"same greedy tokens on both paths: {same}")
        c.close()
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=30)
        shutil.rmtree(rdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
