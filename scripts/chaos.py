#!/usr/bin/env python3
"""Chaos run: a mixed load against a private broker while random workers and the cache store are
SIGKILLed or SIGSTOPped. Every request must end completed or failed with a typed error; none may be
lost or hung, and no completed request may have been served a wrong (corrupt) cached KV row.

    .venv/bin/python scripts/chaos.py --minutes 10 [--seed 1] [--clients 6] [--real-model] [--broker-log FILE]
        [--cache-ram SIZE]

It starts its own ``erllama-broker`` (private runtime dir under /tmp, disk tier under it, shm tier
under /dev/shm; all removed at the end, and every process it started is gone, even after Ctrl-C)
and loads three stub-backend models (``stub-a``/``-b``/``-c``: 4, 2 and 1 sequences, a few ms per
decode, the KV cache on with small save boundaries so rows are saved and restored all the time);
``--real-model`` adds the embedded default model as ``real`` (n_ctx 1024, 2 sequences).

**Load** (``--clients`` threads, one ``Client`` each; one more thread for ``real``): streamed
``infer`` (streamed token ids must equal the result's), ``complete`` (greedy, seeded sampling,
stop strings), cancels mid-stream, prompts from a few shared prefixes and suffixes (exact and
partial cache hits), multi-turn sticky ``session_id`` conversations, ``prefill_only`` followed by
a request with its ``parent_key``, and bad requests (each must fail with its own typed code).

**Chaos** (one thread, every 2-7 s; the first action is always a worker SIGKILL): SIGKILL a worker;
SIGSTOP a worker and SIGCONT it 1-5 s later (below the broker's silence timeout); SIGSTOP a worker
and leave it stopped (the broker must declare it dead and restart it); SIGKILL the cache store;
SIGSTOP the cache store for 1-20 s. Actions that make a worker die are kept to 3 per model per
2 minutes, under the broker's restart limit (5 crashes in 2 minutes mark a model failed); a model
that fails anyway is counted and reloaded.

**Classification** of every request:

- completed: ended with ``done`` and a finish reason (``cancelled`` only when we cancelled it).
- failed (typed): an ``ErllamaError`` with a code the situation allows: ``worker_crashed`` or
  ``model_failed`` for any request (chaos kills workers), the specific code a bad request provokes
  (``invalid_params``, ``context_overflow``, ``model_not_found``), ``model_not_found`` while a failed
  model is being reloaded. Any other code (``internal``, ``timeout`` from the broker, ``overloaded``,
  ``sticky_busy``, ...) is an *anomaly*.
- lost: neither: an untyped code, ``broker_lost`` (the broker is never killed), a ``done`` without a
  finish reason, an exception other than ``ErllamaError``.
- hung: no event for ``HANG_S`` (120 s), far beyond any restart backoff (30 s) plus a model load.
- corrupt cache row served: a completed request whose tokens differ from the expected ones while
  its prompt came from the cache (``cache_hit_kind`` exact/partial). The stub's next token is a
  hash of the last 16 tokens of the sequence's KV (and of the seed), so the expected tokens are
  computed here by running ``StubBackend`` over the prompt; a restored row whose tail is not the
  prompt's shows. For ``real`` the expected tokens are two calm runs of each prompt before the
  chaos (they must agree; per-sequence KV streams make greedy decoding reproducible in this build).
  A mismatch on a cold or sticky request is an anomaly (wrong output) too. Output only shows the
  last 16 restored tokens, so the rows themselves are audited as well: an auditor thread loads the
  rows of recent stub completions from the store (the finish row by key, else the longest cached
  prefix of the prompt) and checks that the stub KV inside is exactly the row's token list; a row
  that is not is a corrupt row in the store.

The table at the end shows requests by outcome, failures by code, cache hits by kind, chaos
actions by target, worker restarts (``model_info``) and cache-store restarts, and whether every
model and the store came back. Exit status 1 if anything was lost, hung, corrupt or anomalous, or
did not recover; 130 on Ctrl-C. A failed run keeps the broker's log (with every worker's stderr)
in /tmp and prints its path. ``tests/test_chaos.py`` runs a short version in the default suite.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import psutil

from erllama import Client, ErllamaError
from erllama.cachestore.client import CacheClient
from erllama.cachestore.codec import row_key
from erllama.client.results import CompletionResult
from erllama.options import SamplingParams
from erllama.processes import CRASH_WINDOW_S, MAX_CRASHES_IN_WINDOW, RESTART_BACKOFF_MAX_S
from erllama.protocol import HEARTBEAT_INTERVAL_S, MODEL_LOAD_TIMEOUT_S, WORKER_SILENCE_TIMEOUT_S, ErrorCode
from erllama.transport import CACHESTORE_SOCKET_NAME, CLIENT_SOCKET_NAME, ipc_endpoint
from erllama.worker.backend import BatchRow
from erllama.worker.kvrow import BadRow, RowParts
from erllama.worker.stub_backend import STATE_MAGIC, StubBackend

log = logging.getLogger("chaos")

# --- timing ---------------------------------------------------------------------------------------------
HANG_S: Final = 120.0  # a request with no event for this long is hung
BROKER_START_TIMEOUT_S: Final = 30.0
BROKER_STOP_TIMEOUT_S: Final = 60.0
CHILD_EXIT_TIMEOUT_S: Final = 10.0
ADMIN_TIMEOUT_S: Final = 30.0  # model_info, list_models, tokenize from the chaos and setup clients
CHAOS_TICK_S: Final = 0.1
CHAOS_FIRST_ACTION_S: Final = 2.0
CHAOS_MIN_GAP_S: Final = 2.0
CHAOS_MAX_GAP_S: Final = 7.0
BRIEF_STOP_MIN_S: Final = 1.0
# Below the broker's silence timeout with room for one missed heartbeat and a busy machine.
BRIEF_STOP_MAX_S: Final = min(5.0, WORKER_SILENCE_TIMEOUT_S - 3 * HEARTBEAT_INTERVAL_S)
STORE_STOP_MIN_S: Final = 1.0
STORE_STOP_MAX_S: Final = 20.0
LEFT_STOPPED_LIMIT_S: Final = WORKER_SILENCE_TIMEOUT_S + 30.0  # a frozen worker not killed by then: anomaly
MODEL_WATCH_INTERVAL_S: Final = 1.0
CRASH_BUDGET: Final = MAX_CRASHES_IN_WINDOW - 2  # worker deaths we cause per model per CRASH_WINDOW_S
RECOVERY_TIMEOUT_S: Final = MODEL_LOAD_TIMEOUT_S  # after the chaos: every model ready, the store back
RECOVERY_POLL_S: Final = 0.2
DRAIN_TIMEOUT_S: Final = 2 * HANG_S + 30.0  # load threads finish their last request within this
AUDIT_INTERVAL_S: Final = 1.0
AUDIT_TIMEOUT_S: Final = 2.0  # per cache-store request; a stopped or restarting store skips a round
AUDIT_BATCH: Final = 16  # rows checked per round
AUDIT_QUEUE_LEN: Final = 512  # recent completions waiting to have their rows checked
AUDIT_FINAL_ROWS: Final = 256  # checked once more after the chaos, with the store resumed

# --- models ---------------------------------------------------------------------------------------------
STUB_N_CTX: Final = 1024
# Small save boundaries: prompts of a few hundred tokens are saved cold, continued and at the finish.
STUB_CACHE_OPTIONS: Final[dict[str, Any]] = {
    "cache_min_tokens": 16,
    "cold_trim_tokens": 4,
    "cold_align_tokens": 16,
    "continued_interval_tokens": 32,
}
STUB_BASE: Final[dict[str, Any]] = {"backend": "stub", "n_ctx": STUB_N_CTX} | STUB_CACHE_OPTIONS
STUB_MODELS: Final[dict[str, dict[str, Any]]] = {
    "stub-a": STUB_BASE | {"n_seq_max": 4, "stub_decode_ms": 3},
    "stub-b": STUB_BASE | {"n_seq_max": 2, "stub_decode_ms": 5},
    "stub-c": STUB_BASE | {"n_seq_max": 1, "stub_decode_ms": 2},
}
REAL_MODEL: Final = "real"
REAL_OPTIONS: Final[dict[str, Any]] = {
    "n_ctx": 1024,
    "n_seq_max": 2,
    "cache_min_tokens": 16,
    "cold_trim_tokens": 4,
    "cold_align_tokens": 16,
    "continued_interval_tokens": 64,
}
REAL_MAX_TOKENS: Final = 12
REAL_STORY: Final = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, "
    "trimmed the wick and polished the great lens until it shone. Ships passed in the night, and the "
    "keeper wrote their names in a leather book. "
)
REAL_QUESTIONS: Final = (
    "The first ship he saw was",
    "In winter the sea froze and",
    "His only friend was a",
    "One night a storm came, and",
    "The leather book was kept",
    "When he grew old, the keeper",
)

# --- load -----------------------------------------------------------------------------------------------
WORDS: Final = (
    "harbour",
    "lamp",
    "keeper",
    "stone",
    "river",
    "tide",
    "north",
    "wind",
    "ledger",
    "brass",
    "lens",
    "night",
    "ship",
    "gull",
    "rope",
    "anchor",
    "quay",
    "salt",
    "fog",
    "bell",
    "lantern",
    "reef",
    "chart",
    "compass",
    "sail",
    "mast",
    "cabin",
    "storm",
    "shore",
    "cliff",
    "beacon",
    "current",
    "drift",
    "hull",
    "deck",
)
N_PREFIXES: Final = 8
N_SUFFIXES: Final = 12
PREFIX_CHARS: Final = (120, 420)
SUFFIX_CHARS: Final = (8, 60)
MAX_TOKENS_CHOICES: Final = (4, 8, 16, 32, 64)
CANCEL_MAX_TOKENS: Final = 200
CANCEL_AFTER_EVENTS: Final = (1, 12)
SESSION_MAX_TOKENS: Final = STUB_N_CTX - 64  # a conversation that would outgrow this starts over
SEEDED_TEMPERATURE: Final = 0.8
STOP_CHOICES: Final = ("a ", " t", "ee", "s r")
KIND_WEIGHTS: Final[dict[str, int]] = {
    "stream": 30,
    "complete": 25,
    "cancel": 10,
    "session": 15,
    "prefill_parent": 8,
    "bad": 7,
}
REAL_KIND_WEIGHTS: Final[dict[str, int]] = {"complete": 60, "stream": 25, "cancel": 15}
ACTION_WEIGHTS: Final[dict[str, int]] = {
    "kill_worker": 4,
    "stop_worker_brief": 2,
    "stop_worker_left": 1,
    "kill_store": 2,
    "stop_store": 2,
}
CRASH_ACTIONS: Final = frozenset({"kill_worker", "stop_worker_left"})
ACTION_LABELS: Final[dict[str, str]] = {
    "kill_worker": "SIGKILL worker",
    "stop_worker_brief": "SIGSTOP worker, SIGCONT after 1-5 s",
    "stop_worker_left": "SIGSTOP worker, left stopped",
    "kill_store": "SIGKILL cache store",
    "stop_store": "SIGSTOP cache store, SIGCONT after 1-20 s",
}

# --- outcomes -------------------------------------------------------------------------------------------
TYPED_CODES: Final = frozenset(c.value for c in ErrorCode)
CHAOS_FAILURES: Final = frozenset({ErrorCode.WORKER_CRASHED.value, ErrorCode.MODEL_FAILED.value})
HIT_FROM_STORE: Final = frozenset({"exact", "partial"})
MAX_EXAMPLES: Final = 30
PR_SET_PDEATHSIG: Final = 1
# The broker runs under this launcher: it asks the kernel for SIGTERM when this script dies (even by
# SIGKILL; the setting survives exec), then becomes the broker. No preexec_fn: we have threads.
BROKER_LAUNCHER: Final = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl({pdeathsig}, signal.SIGTERM); "
    "os.getppid() == {parent} or sys.exit(1); "
    "os.execv(sys.executable, [sys.executable, '-m', 'erllama.broker.main', *sys.argv[1:]])"
)


class StopRun(Exception):
    """Raised in the main thread by SIGTERM so that cleanup runs."""


# --- expected output ------------------------------------------------------------------------------------


def stub_tokenize(text: str) -> list[int]:
    return StubBackend(1, 1, 1).tokenize(text)


@functools.lru_cache(maxsize=8192)
def stub_expected(
    prompt: tuple[int, ...], max_tokens: int, temperature: float, seed: int | None
) -> tuple[int, ...]:
    """What the stub backend generates for ``prompt`` on any sequence, computed here. Greedy output
    depends only on the token history; seeded sampling on the history, the seed and the draw count.
    The stub never samples EOS, so without stop strings every request runs to ``max_tokens``."""
    n = len(prompt) + max_tokens + 1
    backend = StubBackend(n_ctx=n, n_seq_max=1, n_batch=n)
    sampler = backend.new_sampler(SamplingParams(temperature=temperature, seed=seed), prompt)
    idx = backend.decode([BatchRow(0, list(prompt), 0, 1)])[0]
    out: list[int] = []
    while len(out) < max_tokens:
        tok = backend.sample(sampler, idx)
        if backend.is_eog(tok):
            break
        out.append(tok)
        if len(out) < max_tokens:
            idx = backend.decode([BatchRow(0, [tok], len(prompt) + len(out) - 1, 1)])[0]
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Expect:
    """What a request must produce: ``tokens`` exactly (prefix only when cancelled or with stops)."""

    tokens: tuple[int, ...]
    prompt_tokens: tuple[int, ...]
    prefix_only: bool = False


# --- the tally ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Every outcome, counted from many threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    bad_rejected: int = 0  # of the failed: bad requests rejected with their own code
    lost: int = 0
    hung: int = 0
    corrupt: int = 0
    anomalies: Counter[str] = field(default_factory=Counter)
    hit_kinds: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)
    models_failed: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    frozen_detect_s: list[float] = field(default_factory=list)  # SIGSTOP left -> the broker killed it
    store_back_s: list[float] = field(default_factory=list)  # cache store SIGKILL -> its successor runs
    rows_audited: int = 0
    corrupt_stored: int = 0  # rows in the store whose KV is not their tokens' (audit)
    store_counters: dict[int, dict[str, int]] = field(default_factory=dict)  # store pid -> its last counters

    def add(self, what: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + n)

    def count(self, counter: str, key: Any) -> None:
        with self.lock:
            getattr(self, counter)[key] += 1

    def note(self, category: str, text: str) -> None:
        log.error("%s: %s", category, text)
        with self.lock:
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{category}: {text}")


@dataclass
class ChaosReport:
    """What a chaos run found; ``ok`` is the verdict."""

    minutes: float
    seed: int
    clients: int
    models: list[str]
    duration_s: float
    tally: Tally
    restarts: dict[str, int]
    store_pids: int
    recovered: bool
    recovery_problems: list[str]
    broker_log: Path | None
    interrupted: bool = False

    @property
    def lost(self) -> int:
        return self.tally.lost

    @property
    def hung(self) -> int:
        return self.tally.hung

    @property
    def corrupt(self) -> int:
        """Corrupt rows served (seen in a request's output) plus corrupt rows found in the store."""
        return self.tally.corrupt + self.tally.corrupt_stored

    @property
    def anomalies(self) -> int:
        return sum(self.tally.anomalies.values())

    @property
    def kills(self) -> int:
        return sum(n for (action, _), n in self.tally.actions.items() if action.startswith("kill"))

    @property
    def chaos_actions(self) -> int:
        return sum(self.tally.actions.values())

    @property
    def ok(self) -> bool:
        return (
            not self.interrupted
            and self.recovered
            and self.lost == self.hung == self.corrupt == self.anomalies == 0
        )

    def table(self) -> str:
        t = self.tally
        rows: list[tuple[str, str]] = []

        def row(label: str, value: Any = "") -> None:
            rows.append((label, str(value)))

        row("requests started", t.started)
        row("  completed", f"{t.completed}  (of which cancelled by the client: {t.cancelled})")
        row(
            "  failed with a typed error",
            f"{sum(t.failed.values())}  (bad requests rejected as expected: {t.bad_rejected})",
        )
        for code, n in sorted(t.failed.items(), key=lambda kv: -kv[1]):
            row(f"    {code}", n)
        row("  lost (must be 0)", t.lost)
        row("  hung (must be 0)", t.hung)
        row("  corrupt cache rows served (must be 0)", t.corrupt)
        row("  other anomalies (must be 0)", self.anomalies)
        for what, n in sorted(t.anomalies.items()):
            row(f"    {what}", n)
        row(
            "  in flight at the end",
            t.started - t.completed - sum(t.failed.values()) - t.lost - t.hung - t.corrupt - self.anomalies,
        )
        row(
            "completed requests by cache hit",
            ", ".join(f"{k} {v}" for k, v in sorted(t.hit_kinds.items())) or "-",
        )
        row("  restored rows by tier", ", ".join(f"{k} {v}" for k, v in sorted(t.tiers.items())) or "-")
        moved = Counter[str]()
        for counters in t.store_counters.values():
            moved.update({k: counters[k] for k in ("demotions", "promotions", "evictions", "recycled_files")})
        row("cache store movement (all its lives)", ", ".join(f"{k} {v}" for k, v in moved.items()) or "-")
        row("cache rows audited in the store", t.rows_audited)
        row("  corrupt rows found there (must be 0)", t.corrupt_stored)
        row("chaos actions", self.chaos_actions)
        for action, label in ACTION_LABELS.items():
            per = {tgt: n for (a, tgt), n in t.actions.items() if a == action}
            detail = ", ".join(f"{tgt} {n}" for tgt, n in sorted(per.items()))
            row(f"  {label}", f"{sum(per.values())}" + (f"  ({detail})" if detail else ""))
        if t.frozen_detect_s:
            row("  left-stopped worker killed by the broker after", f"max {max(t.frozen_detect_s):.1f} s")
        if t.store_back_s:
            back = t.store_back_s
            row(
                "  cache store running again after SIGKILL",
                f"first {back[0]:.1f} s, last {back[-1]:.1f} s, "
                f"max {max(back):.1f} s (polled every {MODEL_WATCH_INTERVAL_S:g} s)",
            )
        row(
            "worker restarts (model_info)",
            ", ".join(f"{m} {n}" for m, n in self.restarts.items()) or "not read",
        )
        row("cache store restarts (pids seen - 1)", max(0, self.store_pids - 1))
        row("models failed (5 crashes in 2 min; reloaded)", sum(t.models_failed.values()))
        recovered = "yes" if self.recovered else "NO: " + "; ".join(self.recovery_problems)
        row("recovered after the chaos", "not checked (interrupted)" if self.interrupted else recovered)
        width = max(len(label) for label, _ in rows) + 2
        head = (
            f"erllama chaos: {self.minutes:g} min (ran {self.duration_s:.0f} s), seed {self.seed}, "
            f"{self.clients} clients, models {' '.join(self.models)}"
        )
        lines = [head, "-" * len(head)] + [f"{label:<{width}}{value}" for label, value in rows]
        verdict = "INTERRUPTED" if self.interrupted else ("PASS" if self.ok else "FAIL")
        lines.append(f"{'result':<{width}}{verdict}")
        if t.examples:
            lines.append("first problems:")
            lines += [f"  {e}" for e in t.examples]
        if self.broker_log is not None:
            lines.append(f"broker log kept at {self.broker_log}")
        return "\n".join(lines)


# --- the broker -----------------------------------------------------------------------------------------


@dataclass
class PrivateBroker:
    """An ``erllama-broker`` on private temp directories; ``close`` leaves no process and no file."""

    runtime_dir: Path
    shm_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: TextIO | None = None
    descendants: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    extra_args: tuple[str, ...] = ()

    @classmethod
    def create(cls) -> PrivateBroker:
        runtime = Path(tempfile.mkdtemp(prefix="erl-chaos-", dir="/tmp"))  # ipc paths must stay short
        return cls(runtime, Path("/dev/shm") / runtime.name, runtime / "broker.log")

    @property
    def endpoint(self) -> str:
        return ipc_endpoint(self.runtime_dir, CLIENT_SOCKET_NAME)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        launcher = BROKER_LAUNCHER.format(pdeathsig=PR_SET_PDEATHSIG, parent=os.getpid())
        cmd = [
            sys.executable,
            "-c",
            launcher,
            "--no-default-model",
            "--runtime-dir",
            str(self.runtime_dir),
            "--cache-dir",
            str(self.runtime_dir / "kv"),
            "--shm-dir",
            str(self.shm_dir),
            "--log-level",
            "INFO",
            *self.extra_args,
        ]
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        # Its own session: a Ctrl-C in the terminal reaches this script only, which stops the broker itself.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        with Client(self.endpoint, timeout_s=1.0) as probe:
            while True:
                try:
                    probe.ping()
                    break
                except ErllamaError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"the broker did not start (exit {self.proc.poll()}); see {self.log_path}"
                        ) from None
        log.info("broker up: pid %d, runtime dir %s", self.proc.pid, self.runtime_dir)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[psutil.Process]:
        """The broker's children now (workers, the cache store); remembered for the final sweep."""
        if not self.alive():
            return []
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        for p in kids:
            try:
                self.descendants.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        return kids

    def close(self, keep_log_to: Path | None) -> Path | None:
        """SIGTERM the broker (it stops its workers and the store), kill whatever is left by pid, then
        remove every directory. Returns where the broker log was kept, if asked to keep it."""
        self.children()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=BROKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("the broker ignored SIGTERM for %.0f s; killing it", BROKER_STOP_TIMEOUT_S)
                self.proc.kill()
                self.proc.wait()
        for pid, created in self.descendants.items():
            p = _same_process(pid, created)
            if p is None:
                continue
            try:
                p.resume()  # a stopped process cannot act on SIGTERM (nor exit with its parent)
                p.wait(timeout=CHILD_EXIT_TIMEOUT_S)
            except psutil.TimeoutExpired:
                log.warning("process %d outlived the broker; killing it", pid)
                p.kill()
            except psutil.Error:
                pass
        if self.log_file is not None:
            self.log_file.close()
        kept = None
        if keep_log_to is not None and self.log_path.exists():
            shutil.copyfile(self.log_path, keep_log_to)
            kept = keep_log_to
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return kept


def _same_process(pid: int, create_time: float) -> psutil.Process | None:
    """The process ``pid`` if it is still the one created at ``create_time`` (not a reused pid)."""
    try:
        p = psutil.Process(pid)
        if p.create_time() != create_time or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


# --- prompts --------------------------------------------------------------------------------------------


class PromptBook:
    """Prompts built from a few shared prefixes and suffixes: repeats give exact hits, shared
    prefixes partial ones."""

    def __init__(self, rng: random.Random):
        self.prefixes = [self._text(rng, *PREFIX_CHARS) for _ in range(N_PREFIXES)]
        self.suffixes = [self._text(rng, *SUFFIX_CHARS) for _ in range(N_SUFFIXES)]

    @staticmethod
    def _text(rng: random.Random, lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < n:
            words.append(rng.choice(WORDS))
        return " ".join(words) + " "

    def pick(self, rng: random.Random) -> str:
        return rng.choice(self.prefixes) + rng.choice(self.suffixes)


# --- one request ----------------------------------------------------------------------------------------


class Requester:
    """Runs one request and files its outcome."""

    def __init__(
        self,
        client: Client,
        tally: Tally,
        reload_epochs: Callable[[str], int],
        audit: Callable[[str, list[int], list[int]], None] | None = None,
    ):
        self.c = client
        self.tally = tally
        self.reload_epochs = reload_epochs
        self.audit = audit  # hands (model, context tokens, prompt tokens) of a completion to the row auditor

    def run(
        self,
        label: str,
        model: str,
        prompt: str | list[int],
        params: dict[str, Any],
        expect: Expect | None,
        cancel_after: int | None = None,
        expect_codes: frozenset[str] | None = None,
    ) -> CompletionResult | None:
        """The result of a request that completed as it should, else None (the outcome is filed)."""
        self.tally.add("started")
        epoch = self.reload_epochs(model)
        streamed: list[int] = []
        events = 0
        last_event = time.monotonic()
        what = f"{label} on {model} ({len(prompt)}-{'char' if isinstance(prompt, str) else 'token'} prompt, {params})"
        try:
            stream = self.c.infer(model, prompt, timeout_s=HANG_S, **params)
            for ev in stream:
                last_event = time.monotonic()
                streamed.extend(ev.token_ids)
                events += 1
                if cancel_after is not None and events == cancel_after:
                    stream.cancel()
            result = stream.result
        except ErllamaError as err:
            self._failed(err, what, model, epoch, time.monotonic() - last_event, expect_codes)
            return None
        except Exception as exc:  # noqa: BLE001 - the client library itself broke: the request is lost
            self.tally.add("lost")
            self.tally.note("lost", f"{what}: {type(exc).__name__}: {exc}")
            return None
        if result is None or result.finish_reason not in ("stop", "length", "cancelled"):
            self.tally.add("lost")
            self.tally.note("lost", f"{what}: ended without a finish reason ({result})")
            return None
        if expect_codes is not None:
            self._anomaly("bad request accepted", f"{what} completed ({result.finish_reason})")
            return None
        if streamed != result.generated:
            self._anomaly("streamed tokens differ from the result", what)
            return None
        if result.finish_reason == "cancelled" and cancel_after is None:
            self._anomaly("cancelled without a cancel", what)
            return None
        if expect is not None and not self._as_expected(result, expect, cancel_after is not None):
            detail = (
                f"{what}: hit {result.cache_hit_kind} (read {result.cache_delta.get('read')}, tier "
                f"{result.cache_tier}), got {result.generated[:20]}, expected {list(expect.tokens[:20])}"
            )
            if result.cache_hit_kind in HIT_FROM_STORE:
                self.tally.add("corrupt")
                self.tally.note("corrupt row", detail)
                return None
            self._anomaly(f"wrong output ({result.cache_hit_kind} request)", detail)
            return None
        with self.tally.lock:
            self.tally.completed += 1
            self.tally.cancelled += result.finish_reason == "cancelled"
            if result.cache_hit_kind:
                self.tally.hit_kinds[result.cache_hit_kind] += 1
            if result.cache_tier:
                self.tally.tiers[result.cache_tier] += 1
        if self.audit is not None and expect is not None:
            self.audit(model, result.context_tokens, list(expect.prompt_tokens))
        return result

    @staticmethod
    def _as_expected(r: CompletionResult, expect: Expect, cancelled: bool) -> bool:
        got = tuple(r.generated)
        if r.finish_reason == "cancelled" or cancelled or expect.prefix_only:
            ok = got == expect.tokens[: len(got)]
        else:
            ok = got == expect.tokens
        # context_tokens are exactly the KV the worker held: a prefix of prompt + generated.
        whole = expect.prompt_tokens + got
        ctx = tuple(r.context_tokens)
        return ok and (not ctx or ctx == whole[: len(ctx)])

    def _failed(
        self,
        err: ErllamaError,
        what: str,
        model: str,
        epoch: int,
        silent_s: float,
        expect_codes: frozenset[str] | None,
    ) -> None:
        code = err.code
        if code == ErrorCode.TIMEOUT and silent_s >= HANG_S * 0.99:
            self.tally.add("hung")
            self.tally.note("hung", f"{what}: no event for {silent_s:.0f} s")
        elif code == ErrorCode.BROKER_LOST or code not in TYPED_CODES:
            self.tally.add("lost")
            self.tally.note("lost", f"{what}: {code}: {err.message}")
        elif expect_codes is not None and code in expect_codes:
            with self.tally.lock:
                self.tally.failed[code] += 1
                self.tally.bad_rejected += 1
        elif code in CHAOS_FAILURES or (
            code == ErrorCode.MODEL_NOT_FOUND and self.reload_epochs(model) != epoch
        ):
            self.tally.count("failed", code)
        else:
            self._anomaly(f"unexpected error {code}", f"{what}: {err.message} {err.detail or ''}")

    def _anomaly(self, category: str, text: str) -> None:
        self.tally.count("anomalies", category)
        self.tally.note("anomaly", f"{category}: {text}")


# --- load threads ---------------------------------------------------------------------------------------


class StubLoad(threading.Thread):
    """One client's mixed load on the stub models until ``stop`` is set."""

    def __init__(
        self,
        index: int,
        endpoint: str,
        book: PromptBook,
        models: list[str],
        seed: int,
        tally: Tally,
        reload_epochs: Callable[[str], int],
        audit: Callable[[str, list[int], list[int]], None],
        stop: threading.Event,
    ):
        super().__init__(name=f"chaos-load-{index}", daemon=True)
        self.audit = audit
        self.index = index
        self.endpoint = endpoint
        self.book = book
        self.models = models
        self.weights = [STUB_MODELS[m]["n_seq_max"] for m in models]
        self.rng = random.Random(seed * 1000 + index)
        self.tally = tally
        self.reload_epochs = reload_epochs
        self.stop = stop
        self.sessions: dict[str, tuple[str, list[int]]] = {}  # model -> (session id, tokens so far)
        self.n_sessions = 0
        self.current = ""  # what this thread is doing, for a report if it never ends

    def run(self) -> None:
        kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
        with Client(self.endpoint, timeout_s=ADMIN_TIMEOUT_S) as c:
            req = Requester(c, self.tally, self.reload_epochs, self.audit)
            while not self.stop.is_set():
                kind = self.rng.choices(kinds, weights)[0]
                model = self.rng.choices(self.models, self.weights)[0]
                self.current = f"{kind} on {model}"
                getattr(self, f"_{kind}")(req, model)
            self.current = ""

    def _prompt(self) -> tuple[str | list[int], list[int]]:
        text = self.book.pick(self.rng)
        tokens = stub_tokenize(text)
        return (text if self.rng.random() < 0.5 else tokens), tokens

    def _stream(self, req: Requester, model: str) -> None:
        prompt, tokens = self._prompt()
        n = self.rng.choice(MAX_TOKENS_CHOICES)
        req.run(
            "stream",
            model,
            prompt,
            {"max_tokens": n},
            Expect(stub_expected(tuple(tokens), n, 0.0, None), tuple(tokens)),
        )

    def _complete(self, req: Requester, model: str) -> None:
        prompt, tokens = self._prompt()
        n = self.rng.choice(MAX_TOKENS_CHOICES)
        params: dict[str, Any] = {"max_tokens": n}
        temperature, seed = 0.0, None
        if self.rng.random() < 0.25:
            temperature, seed = SEEDED_TEMPERATURE, self.rng.randrange(2**31)
            params |= {"temperature": temperature, "seed": seed}
        stops = self.rng.random() < 0.25
        if stops:
            params["stop"] = [self.rng.choice(STOP_CHOICES)]
        expected = stub_expected(tuple(tokens), n, temperature, seed)
        req.run("complete", model, prompt, params, Expect(expected, tuple(tokens), prefix_only=stops))

    def _cancel(self, req: Requester, model: str) -> None:
        prompt, tokens = self._prompt()
        expected = stub_expected(tuple(tokens), CANCEL_MAX_TOKENS, 0.0, None)
        req.run(
            "cancel",
            model,
            prompt,
            {"max_tokens": CANCEL_MAX_TOKENS},
            Expect(expected, tuple(tokens)),
            cancel_after=self.rng.randint(*CANCEL_AFTER_EVENTS),
        )

    def _session(self, req: Requester, model: str) -> None:
        sid, history = self.sessions.get(model, ("", []))
        turn = stub_tokenize(f"user: {self.book.pick(self.rng)}\nassistant:")
        n = self.rng.choice(MAX_TOKENS_CHOICES)
        if not sid or len(history) + len(turn) + n > SESSION_MAX_TOKENS:
            if sid:
                try:
                    req.c.end_session(model, sid)
                except ErllamaError as err:  # the worker may be restarting; the session dies with it anyway
                    log.debug("end_session %s: %s", sid, err)
            self.n_sessions += 1
            sid, history = f"chaos-{self.index}-{model}-{self.n_sessions}", []
        tokens = history + turn[1:] if history else turn
        result = req.run(
            "session",
            model,
            tokens,
            {"max_tokens": n, "session_id": sid},
            Expect(stub_expected(tuple(tokens), n, 0.0, None), tuple(tokens)),
        )
        if result is not None:
            history = tokens + result.generated
        self.sessions[model] = (sid, history)

    def _prefill_parent(self, req: Requester, model: str) -> None:
        base = stub_tokenize(self.book.pick(self.rng))
        primed = req.run("prefill_only", model, base, {"max_tokens": 0}, Expect((), tuple(base)))
        more = base + stub_tokenize(self.book.pick(self.rng))[1:]
        key = primed.finish_key if primed is not None and primed.finish_key else None
        if key is None and self.rng.random() < 0.5:
            key = f"{self.rng.getrandbits(256):064x}"  # a key that names no row: the lookup falls back
        n = self.rng.choice(MAX_TOKENS_CHOICES)
        params: dict[str, Any] = {"max_tokens": n} | ({"parent_key": key} if key else {})
        req.run(
            "parent_key", model, more, params, Expect(stub_expected(tuple(more), n, 0.0, None), tuple(more))
        )

    def _bad(self, req: Requester, model: str) -> None:
        # Only the code the mistake provokes; worker_crashed and model_failed stay acceptable as for any request.
        invalid = frozenset({ErrorCode.INVALID_PARAMS.value})
        choice = self.rng.randrange(7)
        if choice == 0:
            req.run("bad: unknown param", model, "hello", {"temprature": 0.5}, None, expect_codes=invalid)
        elif choice == 1:
            req.run("bad: max_tokens -1", model, "hello", {"max_tokens": -1}, None, expect_codes=invalid)
        elif choice == 2:
            req.run("bad: parent_key", model, "hello", {"parent_key": "xyz"}, None, expect_codes=invalid)
        elif choice == 3:
            req.run("bad: empty prompt", model, "", {}, None, expect_codes=invalid)
        elif choice == 4:
            req.run(
                "bad: unknown model",
                "no-such-model",
                "hello",
                {},
                None,
                expect_codes=frozenset({ErrorCode.MODEL_NOT_FOUND.value}),
            )
        elif choice == 5:
            too_long = [0] + [2 + (i % 256) for i in range(STUB_N_CTX + 8)]
            req.run(
                "bad: context overflow",
                model,
                too_long,
                {"max_tokens": 4},
                None,
                expect_codes=frozenset({ErrorCode.CONTEXT_OVERFLOW.value}),
            )
        else:
            req.run("bad: token id", model, [0, 5, 10**6], {"max_tokens": 4}, None, expect_codes=invalid)


class RealLoad(threading.Thread):
    """One client on the real model: greedy requests checked against calm runs made before the chaos."""

    def __init__(
        self,
        endpoint: str,
        prompts: list[list[int]],
        reference: list[tuple[int, ...]],
        seed: int,
        tally: Tally,
        reload_epochs: Callable[[str], int],
        stop: threading.Event,
    ):
        super().__init__(name="chaos-load-real", daemon=True)
        self.endpoint = endpoint
        self.prompts = prompts
        self.reference = reference
        self.rng = random.Random(seed * 1000 + 999)
        self.tally = tally
        self.reload_epochs = reload_epochs
        self.stop = stop
        self.current = ""

    def run(self) -> None:
        kinds, weights = list(REAL_KIND_WEIGHTS), list(REAL_KIND_WEIGHTS.values())
        with Client(self.endpoint, timeout_s=ADMIN_TIMEOUT_S) as c:
            req = Requester(c, self.tally, self.reload_epochs)
            while not self.stop.is_set():
                kind = self.rng.choices(kinds, weights)[0]
                i = self.rng.randrange(len(self.prompts))
                expect = Expect(self.reference[i], tuple(self.prompts[i]))
                self.current = f"real {kind}"
                cancel = self.rng.randint(1, REAL_MAX_TOKENS // 2) if kind == "cancel" else None
                req.run(
                    f"real {kind}",
                    REAL_MODEL,
                    self.prompts[i],
                    {"max_tokens": REAL_MAX_TOKENS},
                    expect,
                    cancel,
                )
            self.current = ""


# --- the row auditor ------------------------------------------------------------------------------------


def stub_state_tokens(payload: bytes) -> list[int] | None:
    """The token list a stub row's KV state holds (a ``kvrow`` payload around ``StubBackend.seq_state``),
    or None if it is not one."""
    try:
        parts = RowParts.parse(memoryview(payload))
    except BadRow:
        return None
    state = payload[parts.state_offset : parts.state_offset + parts.state_len]
    head = len(STATE_MAGIC) + 4
    if not state.startswith(STATE_MAGIC) or len(state) < head:
        return None
    (n,) = struct.unpack_from("<I", state, len(STATE_MAGIC))
    if len(state) != head + 4 * n:
        return None
    return list(struct.unpack_from(f"<{n}I", state, head))


class RowAuditor(threading.Thread):
    """Loads the rows of recent stub completions from the cache store and checks that the KV inside
    is exactly the row's tokens (a stub state is its token list). Runs until ``stop``; ``final``
    checks what is left once more at the end."""

    def __init__(
        self, store_endpoint: str, fingerprints: dict[str, bytes], tally: Tally, stop: threading.Event
    ):
        super().__init__(name="chaos-auditor", daemon=True)
        self.store_endpoint = store_endpoint
        self.fingerprints = fingerprints
        self.tally = tally
        self.stop = stop
        self.lock = threading.Lock()
        self.recent: deque[tuple[str, list[int], list[int]]] = deque(maxlen=AUDIT_QUEUE_LEN)

    def offer(self, model: str, context: list[int], prompt: list[int]) -> None:
        if model in self.fingerprints:
            with self.lock:
                self.recent.append((model, context, prompt))

    def run(self) -> None:
        with CacheClient(self.store_endpoint, timeout_s=AUDIT_TIMEOUT_S) as cc:
            while not self.stop.wait(AUDIT_INTERVAL_S):
                self.audit(cc, AUDIT_BATCH)

    def final(self, limit: int) -> None:
        with CacheClient(self.store_endpoint, timeout_s=AUDIT_TIMEOUT_S) as cc:
            self.audit(cc, limit)

    def audit(self, cc: CacheClient, limit: int) -> None:
        try:
            stats = cc.stats()
        except ErllamaError as err:
            log.debug("audit skipped: %s", err)
            return
        with self.tally.lock:
            self.tally.store_counters[stats["pid"]] = stats["counters"]
        for _ in range(limit):
            with self.lock:
                if not self.recent:
                    return
                model, context, prompt = self.recent.pop()  # newest first: its rows are the likeliest present
            try:
                self._check(cc, self.fingerprints[model], context, prompt)
            except ErllamaError as err:  # the store is stopped or restarting: try again next round
                log.debug("audit skipped: %s", err)
                return

    def _check(self, cc: CacheClient, fp: bytes, context: list[int], prompt: list[int]) -> None:
        row = cc.load(row_key(fp, context)) if context else None  # the finish row
        if row is None:
            hit = cc.longest_prefix(fp, prompt, 1)
            row = cc.load(hit.key) if hit is not None else None
        if row is None:
            return
        try:
            tokens, state = list(row.tokens), bytes(row.payload)  # copies: no view outlives the lease
        finally:
            row.close()
        held = stub_state_tokens(state)
        with self.tally.lock:
            self.tally.rows_audited += 1
            if held != tokens:
                self.tally.corrupt_stored += 1
        if held != tokens:
            self.tally.note(
                "corrupt row in the store",
                f"row {row.key.hex()[:16]} ({row.tier.value}) of "
                f"{len(tokens)} tokens holds the KV of {held if held is None else len(held)} other tokens",
            )


# --- the chaos thread -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Stopped:
    pid: int
    create_time: float
    target: str
    stopped_at: float
    resume_at: float | None  # None: left stopped for the broker to find


class ChaosMonkey(threading.Thread):
    """Signals workers and the cache store at random; resumes what it stopped; reloads failed models."""

    def __init__(
        self,
        broker: PrivateBroker,
        models: dict[str, tuple[str | None, dict[str, Any]]],
        seed: int,
        tally: Tally,
        stop: threading.Event,
    ):
        super().__init__(name="chaos-monkey", daemon=True)
        self.broker = broker
        self.models = models
        self.rng = random.Random(seed * 1000 + 7)
        self.tally = tally
        self.stop = stop
        self.stopped: list[Stopped] = []
        self.crashes: dict[str, deque[float]] = {m: deque() for m in models}
        self.store_pids: set[int] = set()
        self.store_killed_at: float | None = None
        self.epochs: Counter[str] = Counter()
        self.epoch_lock = threading.Lock()
        self.error: BaseException | None = None
        self._client: Client | None = None

    def reload_epoch(self, model: str) -> int:
        with self.epoch_lock:
            return self.epochs[model]

    def run(self) -> None:
        try:
            with Client(self.broker.endpoint, timeout_s=ADMIN_TIMEOUT_S) as c:
                self._client = c
                self._loop(c)
        except Exception as exc:  # reported by run_chaos: the thread must not die silently
            log.exception("the chaos thread failed")
            self.error = exc
        finally:
            self.resume_all()

    def _loop(self, c: Client) -> None:
        next_action = time.monotonic() + CHAOS_FIRST_ACTION_S
        next_watch = 0.0
        first = True
        while not self.stop.is_set():
            now = time.monotonic()
            self._resume_due(now)
            if not self.broker.alive():
                self.tally.count("anomalies", "the broker died")
                self.tally.note(
                    "anomaly",
                    f"the broker exited with {self.broker.proc.poll() if self.broker.proc else None}",
                )
                return
            if now >= next_watch:
                self._store()  # notes the store's pid (restarts are counted by distinct pids)
                self._watch_models(c)
                next_watch = now + MODEL_WATCH_INTERVAL_S
            if now >= next_action:
                done = self._act(c, "kill_worker" if first else None)
                first = first and not done  # the first action is a worker SIGKILL, retried until one lands
                next_action = time.monotonic() + self.rng.uniform(CHAOS_MIN_GAP_S, CHAOS_MAX_GAP_S)
            self.stop.wait(CHAOS_TICK_S)

    # --- targets -------------------------------------------------------------------------------------------

    def _store(self) -> psutil.Process | None:
        for p in self.broker.children():
            try:
                if _is_store(p.cmdline()):
                    if p.pid not in self.store_pids and self.store_killed_at is not None:
                        with self.tally.lock:
                            self.tally.store_back_s.append(time.monotonic() - self.store_killed_at)
                        self.store_killed_at = None
                    self.store_pids.add(p.pid)
                    return p
            except psutil.Error:
                continue
        return None

    def _worker(self, c: Client, model: str) -> psutil.Process | None:
        try:
            info = c.model_info(model)
        except ErllamaError:
            return None
        pid = info.get("worker_pid")
        if info.get("state") not in ("ready", "restarting") or not isinstance(pid, int):
            return None
        try:
            p = psutil.Process(pid)
            if p.ppid() != self.broker.pid or model not in p.cmdline():
                return None
            return p
        except psutil.Error:
            return None

    def _paused(self, p: psutil.Process) -> bool:
        return any(s.pid == p.pid for s in self.stopped)

    def _may_crash(self, model: str, now: float) -> bool:
        q = self.crashes[model]
        while q and now - q[0] > CRASH_WINDOW_S:
            q.popleft()
        return len(q) < CRASH_BUDGET

    # --- actions -------------------------------------------------------------------------------------------

    def _act(self, c: Client, forced: str | None) -> bool:
        """One random action (or ``forced``); False if no target could take it now."""
        now = time.monotonic()
        action = forced or self.rng.choices(list(ACTION_WEIGHTS), list(ACTION_WEIGHTS.values()))[0]
        if action in ("kill_store", "stop_store"):
            store = self._store()
            if store is None or self._paused(store):
                return False  # being restarted, or already stopped: skip this turn
            return self._signal(store, "cachestore", action, now)
        candidates = list(self.models)
        self.rng.shuffle(candidates)
        for model in candidates:
            if action in CRASH_ACTIONS and not self._may_crash(model, now):
                continue
            p = self._worker(c, model)
            if p is None or self._paused(p):
                continue
            if action in CRASH_ACTIONS:
                self.crashes[model].append(now)
            return self._signal(p, model, action, now)
        log.info("no worker may take %s now (crash budgets spent or restarting)", action)
        return False

    def _signal(self, p: psutil.Process, target: str, action: str, now: float) -> bool:
        try:
            created = p.create_time()
            if action.startswith("kill"):
                p.send_signal(signal.SIGKILL)
                if action == "kill_store":
                    self.store_killed_at = now
            else:
                p.send_signal(signal.SIGSTOP)
                if action == "stop_worker_left":
                    resume_at = None
                elif action == "stop_store":
                    resume_at = now + self.rng.uniform(STORE_STOP_MIN_S, STORE_STOP_MAX_S)
                else:
                    resume_at = now + self.rng.uniform(BRIEF_STOP_MIN_S, BRIEF_STOP_MAX_S)
                self.stopped.append(Stopped(p.pid, created, target, now, resume_at))
        except psutil.Error as exc:
            log.info("%s of %s (pid %d) missed: %s", action, target, p.pid, exc)
            return False
        log.info("chaos: %s %s (pid %d)", ACTION_LABELS[action], target, p.pid)
        self.tally.count("actions", (action, target))
        return True

    def _resume_due(self, now: float) -> None:
        for s in list(self.stopped):
            p = _same_process(s.pid, s.create_time)
            if p is None:  # gone: killed by the broker (a left-stopped worker) or by us
                self.stopped.remove(s)
                if s.resume_at is None:
                    with self.tally.lock:
                        self.tally.frozen_detect_s.append(now - s.stopped_at)
                continue
            if s.resume_at is None and now - s.stopped_at > LEFT_STOPPED_LIMIT_S:
                self.tally.count("anomalies", "frozen worker not declared dead")
                self.tally.note(
                    "anomaly",
                    f"the stopped worker of {s.target} (pid {s.pid}) still lives after "
                    f"{now - s.stopped_at:.0f} s; resuming it",
                )
                s.resume_at = now
            if s.resume_at is not None and now >= s.resume_at:
                self._resume(p, s)

    def _resume(self, p: psutil.Process, s: Stopped) -> None:
        try:
            p.send_signal(signal.SIGCONT)
            log.info(
                "chaos: SIGCONT %s (pid %d) after %.1f s", s.target, s.pid, time.monotonic() - s.stopped_at
            )
        except psutil.Error:
            pass
        self.stopped.remove(s)

    def resume_all(self) -> None:
        """SIGCONT everything still stopped (the end of the run, or an error)."""
        for s in list(self.stopped):
            p = _same_process(s.pid, s.create_time)
            if p is not None:
                self._resume(p, s)
            else:
                self.stopped.remove(s)

    def _watch_models(self, c: Client) -> None:
        """A model the broker marked failed (too many crashes) is counted and loaded again."""
        try:
            states = {m["id"]: m["state"] for m in c.list_models()}
        except ErllamaError as err:
            log.warning("list_models: %s", err)
            return
        for model, (path, options) in self.models.items():
            if states.get(model) == "failed":
                self.tally.count("models_failed", model)
                self.tally.note("model failed", f"{model} crashed too often; reloading it")
                with self.epoch_lock:
                    self.epochs[model] += 1
                try:
                    c.unload_model(model)
                    c.load_model(model, path, **options)
                except ErllamaError as err:
                    self.tally.note("model failed", f"reloading {model}: {err}")
                self.crashes[model].clear()
                with self.epoch_lock:
                    self.epochs[model] += 1


# --- the run --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    minutes: float
    seed: int = 1
    clients: int = 6
    real_model: bool = False
    broker_log: Path | None = None  # keep the broker's log here (always kept, to a /tmp file, on failure)
    cache_ram: str | None = (
        None  # the store's RAM budget (--cache-ram); small: rows move, full tiers reuse files
    )


def _real_reference(c: Client) -> tuple[list[list[int]], list[tuple[int, ...]]]:
    """Token prompts for the real model and their greedy output from two calm runs, which must agree."""
    prompts = [c.tokenize(REAL_MODEL, REAL_STORY + q) for q in REAL_QUESTIONS]
    reference: list[tuple[int, ...]] = []
    for p in prompts:
        first = c.infer(REAL_MODEL, p, max_tokens=REAL_MAX_TOKENS, timeout_s=HANG_S).collect()
        second = c.infer(REAL_MODEL, p, max_tokens=REAL_MAX_TOKENS, timeout_s=HANG_S).collect()
        if first.generated != second.generated:
            raise RuntimeError(
                f"the real model is not reproducible before any chaos ({first.cache_hit_kind} "
                f"{first.generated} vs {second.cache_hit_kind} {second.generated})"
            )
        reference.append(tuple(first.generated))
    return prompts, reference


def _recover(broker: PrivateBroker, models: list[str], book: PromptBook) -> list[str]:
    """After the chaos: every model ready and answering correctly, and a cache store running."""
    problems: list[str] = []
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    with Client(broker.endpoint, timeout_s=ADMIN_TIMEOUT_S) as c:
        for model in models:
            state = ""
            while time.monotonic() < deadline:
                try:
                    state = c.model_info(model)["state"]
                except ErllamaError as err:
                    state = err.code
                if state == "ready":
                    break
                time.sleep(RECOVERY_POLL_S)
            if state != "ready":
                problems.append(f"{model} is {state}")
                continue
            if model == REAL_MODEL:
                try:
                    c.infer(model, "Hello", max_tokens=2, timeout_s=HANG_S).collect()
                except ErllamaError as err:
                    problems.append(f"{model}: {err}")
                continue
            tokens = stub_tokenize("recovery check: " + book.pick(random.Random(model)))
            try:
                r = c.infer(model, tokens, max_tokens=8, timeout_s=HANG_S).collect()
                if tuple(r.generated) != stub_expected(tuple(tokens), 8, 0.0, None):
                    problems.append(f"{model} answered wrongly ({r.cache_hit_kind})")
            except ErllamaError as err:
                problems.append(f"{model}: {err}")
    while time.monotonic() < deadline + RESTART_BACKOFF_MAX_S:
        if any(_is_store(_cmdline(p)) for p in broker.children()):
            break
        time.sleep(RECOVERY_POLL_S)
    else:
        problems.append("no cache store is running")
    return problems


def _is_store(cmdline: list[str]) -> bool:
    """The cache store's command line (a worker's names the store's socket, ``--cachestore ...``)."""
    return any(
        Path(arg).name == "erllama-cachestore" or arg == "erllama.cachestore.main" for arg in cmdline[:3]
    )


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """Start a private broker, load the models, run the load and the chaos for ``cfg.minutes``, then
    check recovery and clean up. Never leaves a process or a directory behind."""
    t0 = time.monotonic()
    tally = Tally()
    book = PromptBook(random.Random(cfg.seed))
    models: dict[str, tuple[str | None, dict[str, Any]]] = {
        m: (None, dict(o)) for m, o in STUB_MODELS.items()
    }
    if cfg.real_model:
        models[REAL_MODEL] = (None, dict(REAL_OPTIONS))
    broker = PrivateBroker.create()
    if cfg.cache_ram is not None:
        broker.extra_args = ("--cache-ram", cfg.cache_ram)
    load_stop, chaos_stop, audit_stop = threading.Event(), threading.Event(), threading.Event()
    auditor: RowAuditor | None = None
    threads: list[StubLoad | RealLoad] = []
    monkey: ChaosMonkey | None = None
    restarts: dict[str, int] = {}
    problems: list[str] = []
    interrupted = False
    keep_log: Path | None = cfg.broker_log
    kept: Path | None = None
    try:
        broker.start()
        with Client(broker.endpoint, timeout_s=ADMIN_TIMEOUT_S) as c:
            for model, (path, options) in models.items():
                c.load_model(model, path, **options)
            fingerprints = {m: bytes.fromhex(c.model_info(m)["model"]["fingerprint"]) for m in STUB_MODELS}
            prompts, reference = _real_reference(c) if cfg.real_model else ([], [])
        broker.children()
        auditor = RowAuditor(
            ipc_endpoint(broker.runtime_dir, CACHESTORE_SOCKET_NAME), fingerprints, tally, audit_stop
        )
        monkey = ChaosMonkey(broker, models, cfg.seed, tally, chaos_stop)
        threads = [
            StubLoad(
                i,
                broker.endpoint,
                book,
                list(STUB_MODELS),
                cfg.seed,
                tally,
                monkey.reload_epoch,
                auditor.offer,
                load_stop,
            )
            for i in range(cfg.clients)
        ]
        if cfg.real_model:
            threads.append(
                RealLoad(broker.endpoint, prompts, reference, cfg.seed, tally, monkey.reload_epoch, load_stop)
            )
        for t in threads:
            t.start()
        auditor.start()
        monkey.start()
        log.info("chaos running for %.1f min with %d load threads", cfg.minutes, len(threads))
        end = time.monotonic() + cfg.minutes * 60.0
        while time.monotonic() < end and monkey.is_alive():
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        if monkey.error is not None:
            problems.append(f"the chaos thread failed: {monkey.error!r}")
        chaos_stop.set()
        monkey.join()  # every stopped process resumed
        load_stop.set()
        drain_end = time.monotonic() + DRAIN_TIMEOUT_S
        for t in threads:
            t.join(max(0.0, drain_end - time.monotonic()))
            if t.is_alive():
                tally.add("hung")
                tally.note(
                    "hung", f"{t.name} still busy with {t.current} {DRAIN_TIMEOUT_S:.0f} s after the end"
                )
        audit_stop.set()
        auditor.join()
        problems += _recover(broker, list(models), book)
        auditor.final(AUDIT_FINAL_ROWS)  # the store is back: what the chaos left in it
        with Client(broker.endpoint, timeout_s=ADMIN_TIMEOUT_S) as c:
            restarts = {m: int(c.model_info(m).get("restarts", 0)) for m in models}
    except (KeyboardInterrupt, StopRun):
        interrupted = True
        log.warning("interrupted: cleaning up")
    finally:
        chaos_stop.set()
        load_stop.set()
        audit_stop.set()
        if monkey is not None:
            if monkey.is_alive():
                monkey.join(CHILD_EXIT_TIMEOUT_S)
            monkey.resume_all()
        report = ChaosReport(
            cfg.minutes,
            cfg.seed,
            cfg.clients,
            list(models),
            time.monotonic() - t0,
            tally,
            restarts,
            len(monkey.store_pids) if monkey else 0,
            not problems,
            problems,
            None,
            interrupted,
        )
        if keep_log is None and not report.ok and not interrupted:
            keep_log = Path(tempfile.mkstemp(prefix="erllama-chaos-broker-", suffix=".log", dir="/tmp")[1])
        kept = broker.close(keep_log)
    report.broker_log = kept
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--minutes", type=float, required=True, help="how long the load and the chaos run")
    ap.add_argument("--seed", type=int, default=1, help="seeds the prompts, the load mix and the chaos")
    ap.add_argument(
        "--clients", type=int, default=6, help="load threads on the stub models (one Client each)"
    )
    ap.add_argument(
        "--real-model", action="store_true", help="also load the embedded default model as 'real'"
    )
    ap.add_argument("--broker-log", type=Path, help="keep the broker's log (with its workers' stderr) here")
    ap.add_argument(
        "--cache-ram",
        help="the cache store's RAM budget, e.g. 32M: rows then move between tiers all the time",
    )
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(threadName)s %(levelname)s %(message)s",
    )

    def on_term(signum: int, _frame: Any) -> None:
        raise StopRun(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (a & job)
    cfg = ChaosConfig(args.minutes, args.seed, args.clients, args.real_model, args.broker_log, args.cache_ram)
    report = run_chaos(cfg)
    print(report.table(), flush=True)
    if report.interrupted:
        return 130
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
