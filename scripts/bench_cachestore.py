"""Cache-store throughput and latency, side by side with this machine's raw copy and read speeds.

    python scripts/bench_cachestore.py [--sizes-mb 10 50 100] [--reps 5] [--rows 10000]

Starts its own ``erllama-cachestore`` on temporary directories (shm under /dev/shm, disk under
``--disk-root``, default ~/.cache), measures, prints one table, removes everything.

- memcpy: ``ctypes.memmove`` between two pre-faulted buffers (the raw memory copy).
- file read: ``readinto`` of a page-cache-warm file into a pre-faulted buffer.
- save: ``CacheClient.save`` (reserve, write into the mapped temp, checksum, commit: the daemon
  verifies, fsyncs on disk, publishes).
- load: ``CacheClient.load`` + one pass over the payload (a ``memmove`` into a pre-faulted buffer,
  as ``llama_state_seq_set_data`` would do) + release. Each rep loads a fresh row so a promotion
  never changes the tier being measured; disk rows are page-cache warm (just written).
- lookup: ``longest_prefix`` round trips with ``--rows`` rows indexed (client-observed, ipc).
"""

from __future__ import annotations

import argparse
import ctypes
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
from erllama.protocol import CacheTier, ErllamaError, SaveOutcome, SaveReason

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


def start_daemon(root: Path, shm: Path, disk: Path, endpoint: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "erllama.cachestore.main",
        "--endpoint",
        endpoint,
        "--shm-dir",
        str(shm),
        "--disk-dir",
        str(disk),
        "--ram-bytes",
        "3G",
        "--shm-bytes",
        "3G",
        "--disk-bytes",
        "6G",
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(argv, stderr=open(root / "daemon.log", "wb"))
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


def settle(c: CacheClient) -> None:
    while True:
        c.evict_bytes(1 << 40, tiers=list(CacheTier))
        s = c.stats()
        if s["rows"] == 0 and s["pending_io"] == 0:
            return
        time.sleep(0.01)


def bench_tiers(c: CacheClient, sizes_mb: list[int], reps: int, disk: Path) -> list[tuple[str, ...]]:
    rows = []
    seq = 0
    for size_mb in sizes_mb:
        size = size_mb * MB
        base = Baselines(size, disk / "bench-read.tmp")
        payload = base.src
        times: dict[CacheTier, tuple[list[float], list[float]]] = {t: ([], []) for t in CacheTier}
        for _ in range(reps):
            for tier in CacheTier:
                base.measure()
                seq += 1
                tokens = [seq] * 64
                t0 = time.perf_counter()
                assert c.save(b"bench", tokens, payload, "cold", tier=tier) is SaveOutcome.STORED
                times[tier][0].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                row = c.load(row_key(b"bench", tokens))
                assert row is not None and row.tier is tier
                src = (ctypes.c_char * size).from_buffer(row.payload)
                ctypes.memmove(base.d, src, size)  # the pass llama_state_seq_set_data makes
                del src
                row.close()
                times[tier][1].append(time.perf_counter() - t0)
                settle(c)  # an empty, idle store for the next measurement: no promotion or eviction running
        base.path.unlink()
        mcpy, fread = base.rates()
        for tier in CacheTier:
            save_r, load_r = rate(size, times[tier][0]), rate(size, times[tier][1])
            rows.append(
                (
                    f"{size_mb} MB",
                    tier.value,
                    f"{mcpy:.2f}",
                    f"{fread:.2f}",
                    f"{save_r:.2f}",
                    f"{save_r / mcpy:.2f}",
                    f"{load_r:.2f}",
                    f"{load_r / mcpy:.2f}",
                    f"{load_r / fread:.2f}",
                )
            )
    return rows


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
    root = Path(tempfile.mkdtemp(prefix="ecs-bench-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="ecs-bench-", dir="/dev/shm"))
    Path(args.disk_root).mkdir(parents=True, exist_ok=True)
    disk = Path(tempfile.mkdtemp(prefix="ecs-bench-", dir=args.disk_root))
    proc = start_daemon(root, shm / "shm", disk / "kv", f"ipc://{root}/cs.sock")
    c = CacheClient(f"ipc://{root}/cs.sock", timeout_s=60)
    try:
        rows = bench_tiers(c, args.sizes_mb, args.reps, disk)
        print(
            table(
                (
                    "row",
                    "tier",
                    "memcpy GB/s",
                    "read GB/s",
                    "save GB/s",
                    "save/memcpy",
                    "load GB/s",
                    "load/memcpy",
                    "load/read",
                ),
                rows,
            )
        )
        p50, p99, mean_us, n = bench_lookup(c, args.rows, args.queries)
        print(
            f"\nlongest_prefix with {n} rows: p50 {p50:.0f} us, p99 {p99:.0f} us "
            "(client round trip over ipc); "
            f"daemon-side mean {mean_us:.1f} us"
        )
        ip50, ip99 = bench_index(args.rows, args.queries * 10)
        print(f"index.longest_prefix alone with {args.rows} rows: p50 {ip50:.1f} us, p99 {ip99:.1f} us")
    finally:
        c.close()
        proc.terminate()
        proc.wait()
        for d in (root, shm, disk):
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
