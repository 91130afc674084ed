"""Cache-store throughput and latency, side by side with this machine's raw copy and read speeds.

    python scripts/bench_cachestore.py [--sizes-mb 10 50 100] [--reps 5] [--rows 10000]

Starts its own ``erllama-cachestore`` on temporary directories (shm under /dev/shm, disk under
``--disk-root``, default ~/.cache), measures, prints one table, removes everything.

- memcpy: ``ctypes.memmove`` between two pre-faulted buffers (the raw memory copy).
- file read: ``readinto`` of a page-cache-warm file into a pre-faulted buffer.
- save: ``CacheClient.save`` (reserve, write into the mapped temp, checksum, commit: the daemon
  verifies, fsyncs on disk, publishes), into a new file or, in a full RAM or shm tier, into the file of
  the row that left to make room (timed inside the writer process).
- load: ``CacheClient.load`` + one pass over the payload (a ``memmove`` into a pre-faulted buffer,
  as ``llama_state_seq_set_data`` would do); ``close`` is not timed (one message, not waited for).
  Each rep loads a fresh row so a promotion never changes the tier being measured; disk rows are page-
  cache warm (just written). Four cases:
  - first map: a process that has never mapped the row's file (the cache of mappings is cleared
    first), as a restarted worker: a page fault per 64 KiB of tmpfs (4 KiB pages) is part of its time;
  - written here: the process that saved the row loads it, through the mapping it wrote it with;
  - reused file: the steady state of a full RAM or shm tier. Another process writes each new row into
    the file of the row that just left for the next tier; this process had loaded that row, so its
    mapping and page tables are still there;
  - same row again: a second load of a row this process holds (a hot row).
- lookup: ``longest_prefix`` round trips with ``--rows`` rows indexed (client-observed, ipc).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from erllama.cachestore.client import CacheClient
from erllama.cachestore.codec import row_key, row_key_bytes, tokens_to_bytes
from erllama.cachestore.index import Index, RowEntry
from erllama.cachestore.mapping import MAPPINGS
from erllama.protocol import LOCAL_TIERS, CacheTier, ErllamaError, SaveOutcome, SaveReason

MB = 1_000_000


class Baselines:
    """Raw memory copy and page-cache file read of ``size`` bytes, into the same pre-faulted buffer the
    loads use; measured once per rep, interleaved with the store's operations, so machine load hits
    both sides alike."""

    def __init__(self, size: int, scratch: Path):
        self.size = size
        self.src = bytearray(os.urandom(size))
        self.dst = bytearray(size)
        self.d = (ctypes.c_char * size).from_buffer(self.dst)
        self._s = (ctypes.c_char * size).from_buffer(self.src)
        self.path = scratch
        scratch.write_bytes(self.src)
        self.memcpy_s: list[float] = []
        self.read_s: list[float] = []
        self.measure()  # warm both

    def measure(self) -> None:
        t0 = time.perf_counter()
        ctypes.memmove(self.d, self._s, self.size)
        self.memcpy_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(self.path, "rb", buffering=0) as f:
            f.readinto(self.dst)
        self.read_s.append(time.perf_counter() - t0)

    def rates(self) -> tuple[float, float]:
        return (rate(self.size, self.memcpy_s[1:]), rate(self.size, self.read_s[1:]))


def rate(nbytes: int, seconds: list[float]) -> float:
    """GB/s at the median time."""
    return nbytes / statistics.median(seconds) / 1e9


def start_daemon(
    root: Path, shm_dir: Path, endpoint: str, ram: int, shm_bytes: int, disk_bytes: int
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "erllama.cachestore.main",
        "--endpoint",
        endpoint,
        "--shm-dir",
        str(shm_dir),
        "--disk-dir",
        str(root / "kv"),
        "--ram-bytes",
        str(ram),
        "--shm-bytes",
        str(shm_bytes),
        "--disk-bytes",
        str(disk_bytes),
        "--log-level",
        "WARNING",
    ]
    with open(root / "daemon.log", "ab") as log:
        proc = subprocess.Popen(argv, stderr=log)
    probe = CacheClient(endpoint, timeout_s=0.5)
    for _ in range(200):
        try:
            probe.stats()
            break
        except ErllamaError:
            if proc.poll() is not None:
                raise SystemExit((root / "daemon.log").read_text()) from None
    probe.close()
    return proc


class Daemon:
    """A store on fresh directories (shm under /dev/shm, disk under ``disk_root``), removed on exit."""

    def __init__(self, disk_root: Path, ram: int, shm_bytes: int, disk_bytes: int):
        self.root = Path(tempfile.mkdtemp(prefix="ecs-bench-", dir=disk_root))
        self.shm = Path(tempfile.mkdtemp(prefix="ecs-bench-", dir="/dev/shm"))
        sock = Path(tempfile.mkdtemp(prefix="ecs-bench-", dir="/tmp"))
        self.sock_dir = sock
        endpoint = f"ipc://{sock}/cs.sock"
        self.proc = start_daemon(self.root, self.shm / "shm", endpoint, ram, shm_bytes, disk_bytes)
        self.client = CacheClient(endpoint, timeout_s=60)

    def __enter__(self) -> CacheClient:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait()
        for d in (self.root, self.shm, self.sock_dir):
            shutil.rmtree(d, ignore_errors=True)


def wait_idle(c: CacheClient) -> dict:
    """Until no background copy, verification or delete is running."""
    while (s := c.stats())["pending_io"]:
        time.sleep(0.005)
    return s


def settle(c: CacheClient) -> None:
    """An empty, idle store: every row evicted (their files truncated, so none is reused)."""
    while True:
        c.evict_bytes(1 << 40, tiers=list(LOCAL_TIERS))
        s = wait_idle(c)
        if s["rows"] == 0:
            return


def timed_load(c: CacheClient, key: bytes, tier: CacheTier, base: Baselines) -> tuple[float, float]:
    """(first, again): ``load`` + the pass ``llama_state_seq_set_data`` makes (a ``memmove`` into a
    pre-faulted buffer), then the same again while the first still holds the row (no promotion can
    move it meanwhile)."""
    t0 = time.perf_counter()
    row = c.load(key)
    assert row is not None and row.tier is tier, (row and row.tier, tier)
    ctypes.memmove(base.d, row.payload_array, base.size)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = c.load(key)
    assert again is not None and again.tier is tier
    ctypes.memmove(base.d, again.payload_array, base.size)
    second = time.perf_counter() - t0
    again.close()  # not timed, in neither: a release is one message sent without waiting
    row.close()
    return first, second


RESIDENT_ROWS = 3  # rows a tier holds in the steady-state runs: each new one pushes the oldest out

WRITER = """
import os, sys, time
from erllama.cachestore.client import CacheClient
from erllama.protocol import CacheTier
c = CacheClient(sys.argv[1], timeout_s=60)
payload = bytearray(os.urandom(int(sys.argv[2])))
for line in sys.stdin:
    seq, tier = line.split()
    t0 = time.perf_counter()
    outcome = c.save(b"bench", [int(seq)] * 64, payload, "cold", tier=CacheTier(tier))
    print(outcome.value, time.perf_counter() - t0, flush=True)
"""


class Writer:
    """Another process that saves rows: what the bench process then loads, it never wrote itself."""

    def __init__(self, endpoint: str, size: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, endpoint, str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def save(self, seq: int, tier: CacheTier) -> tuple[bytes, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{seq} {tier.value}\n")
        self.proc.stdin.flush()
        outcome, seconds = self.proc.stdout.readline().split()
        assert outcome == SaveOutcome.STORED.value, outcome
        return row_key(b"bench", [seq] * 64), float(seconds)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Series:
    def __init__(self) -> None:
        self.save_new: list[float] = []
        self.save_reused: list[float] = []
        self.first_map: list[float] = []
        self.written_here: list[float] = []
        self.reused_file: list[float] = []
        self.again: list[float] = []


def bench_size(size_mb: int, reps: int, disk_root: Path, seq: itertools.count) -> list[tuple[str, ...]]:
    size = size_mb * MB
    budget = int((RESIDENT_ROWS + 0.5) * (size + 64 * 1024))
    base = Baselines(size, disk_root / "bench-read.tmp")
    series = {t: Series() for t in LOCAL_TIERS}

    def save(c: CacheClient, tier: CacheTier) -> bytes:
        tokens = [next(seq)] * 64
        base.measure()
        t0 = time.perf_counter()
        assert c.save(b"bench", tokens, base.src, "cold", tier=tier) is SaveOutcome.STORED
        series[tier].save_new.append(time.perf_counter() - t0)
        wait_idle(c)
        return row_key(b"bench", tokens)

    # New files: every row is evicted (and truncated) before the next is written.
    with Daemon(disk_root, budget, budget, 8 * budget) as c:
        for _ in range(reps):
            for tier in LOCAL_TIERS:
                key = save(c, tier)
                MAPPINGS.clear()  # as in a process that never mapped this file (a restarted worker)
                first, again = timed_load(c, key, tier, base)
                series[tier].first_map.append(first)
                series[tier].again.append(again)
                settle(c)
                key = save(c, tier)  # the writer keeps its mapping of what it stored
                series[tier].written_here.append(timed_load(c, key, tier, base)[0])
                settle(c)
    # Steady state: the tier is full, so each new row takes the file of the row that leaves for the
    # next tier, and another process writes it. The RAM tier is off for the shm run: a load would
    # otherwise promote its row to RAM.
    for tier, ram in ((CacheTier.RAM, budget), (CacheTier.SHM, 0)):
        with Daemon(disk_root, ram, budget, 8 * budget) as c:
            writer = Writer(c.endpoint, size)
            try:
                for _ in range(RESIDENT_ROWS):
                    key, _ = writer.save(next(seq), tier)
                    timed_load(c, key, tier, base)  # this process reads each row once, as a worker would
                before = wait_idle(c)["counters"]["recycled_files"]
                for _ in range(reps):
                    base.measure()
                    key, seconds = writer.save(next(seq), tier)
                    series[tier].save_reused.append(seconds)
                    wait_idle(c)
                    series[tier].reused_file.append(timed_load(c, key, tier, base)[0])
            finally:
                writer.close()
            recycled = c.stats()["counters"]["recycled_files"] - before
            assert recycled == reps, f"{recycled} of {reps} {tier.value} rows reused a file"
    base.path.unlink()
    mcpy, fread = base.rates()

    def ratio(times: list[float]) -> str:
        return f"{rate(size, times) / mcpy:.2f}" if times else "-"

    out = []
    for tier in LOCAL_TIERS:
        sr = series[tier]
        first = rate(size, sr.first_map)
        out.append(
            (
                f"{size_mb} MB",
                tier.value,
                f"{mcpy:.2f}",
                f"{fread:.2f}",
                ratio(sr.save_new),
                ratio(sr.save_reused),
                f"{first:.2f}",
                f"{first / mcpy:.2f}",
                f"{first / fread:.2f}",
                ratio(sr.written_here),
                ratio(sr.reused_file),
                ratio(sr.again),
            )
        )
    return out


def bench_lookup(c: CacheClient, n_rows: int, queries: int) -> tuple[float, float, float, float]:
    rng = random.Random(7)
    prompts = [[rng.randrange(50_000) for _ in range(rng.randint(20, 400))] for _ in range(100)]
    stored = []
    for i in range(n_rows):
        base = prompts[i % len(prompts)]
        tokens = base + [rng.randrange(50_000) for _ in range(rng.randint(1, 300))]
        c.save(b"lookup", tokens, b"\0" * 512, "finish", tier=CacheTier.SHM)
        stored.append(tokens)
    before = c.stats()["counters"]
    lat = []
    for _ in range(queries):
        t = rng.choice(stored)
        q = t[: rng.randint(1, len(t))] + [rng.randrange(50_000) for _ in range(rng.randint(0, 200))]
        t0 = time.perf_counter()
        c.longest_prefix(b"lookup", q)
        lat.append(time.perf_counter() - t0)
    after = c.stats()["counters"]
    daemon_mean_us = (
        (after["lookup_ns"] - before["lookup_ns"]) / max(1, after["lookups"] - before["lookups"]) / 1e3
    )
    lat.sort()
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6, daemon_mean_us, len(stored)


def bench_index(n_rows: int, queries: int) -> tuple[float, float]:
    """The daemon's in-memory answer alone (no socket): ``Index.longest_prefix`` with ``n_rows`` rows."""
    rng = random.Random(11)
    index = Index()
    prompts = [[rng.randrange(50_000) for _ in range(rng.randint(20, 400))] for _ in range(100)]
    stored = []
    for i in range(n_rows):
        tokens = prompts[i % len(prompts)] + [rng.randrange(50_000) for _ in range(rng.randint(1, 300))]
        tb = tokens_to_bytes(tokens)
        index.add(
            RowEntry(
                key=row_key_bytes(b"idx", tb),
                fingerprint=b"idx",
                token_bytes=tb,
                size=1,
                payload_offset=64,
                payload_len=1,
                reason=SaveReason.COLD,
                created_ns=0,
                hits=0,
                last_used_ns=0,
                tier=CacheTier.RAM,
                path="",
            )
        )
        stored.append(tokens)
    lat = []
    for _ in range(queries):
        t = rng.choice(stored)
        q = tokens_to_bytes(
            t[: rng.randint(1, len(t))] + [rng.randrange(50_000) for _ in range(rng.randint(0, 200))]
        )
        t0 = time.perf_counter_ns()
        index.longest_prefix(b"idx", q, 1)
        lat.append(time.perf_counter_ns() - t0)
    lat.sort()
    return lat[len(lat) // 2] / 1e3, lat[int(len(lat) * 0.99)] / 1e3


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--disk-root", default=str(Path.home() / ".cache"))
    args = ap.parse_args()
    disk_root = Path(args.disk_root)
    disk_root.mkdir(parents=True, exist_ok=True)
    seq = itertools.count(1)
    rows = [r for size_mb in args.sizes_mb for r in bench_size(size_mb, args.reps, disk_root, seq)]
    print(
        table(
            (
                "row",
                "tier",
                "memcpy GB/s",
                "read GB/s",
                "save/memcpy: new file",
                "reused file",
                "load, first map: GB/s",
                "/memcpy",
                "/read",
                "load/memcpy: written here",
                "reused file",
                "same row again",
            ),
            rows,
        )
    )
    with Daemon(disk_root, 3 * 1024**3, 3 * 1024**3, 6 * 1024**3) as c:
        p50, p99, mean_us, n = bench_lookup(c, args.rows, args.queries)
    print(
        f"\nlongest_prefix with {n} rows: p50 {p50:.0f} us, p99 {p99:.0f} us "
        "(client round trip over ipc); "
        f"daemon-side mean {mean_us:.1f} us"
    )
    ip50, ip99 = bench_index(args.rows, args.queries * 10)
    print(f"index.longest_prefix alone with {args.rows} rows: p50 {ip50:.1f} us, p99 {ip99:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
