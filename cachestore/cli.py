"""``erllama cache``: the cache store's view from the command line.

erllama cache [stats] [--json]        tiers (rows, bytes, budget) and counters
erllama cache evict BYTES [--tier T]  free BYTES from tiers (default ram and shm) by demotion/eviction
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from erllama.cachestore.client import CacheClient
from erllama.cachestore.config import parse_size
from erllama.protocol import LOCAL_TIERS, CacheTier, ErllamaError

COUNTER_GROUPS = (
    ("lookups", ("lookups", "hits_exact", "hits_prefix", "misses", "lookup_ns", "loads", "load_ns")),
    (
        "saves",
        (
            "saves_cold",
            "saves_continued",
            "saves_finish",
            "saves_evict",
            "saves_shutdown",
            "already_present",
            "conflicts",
            "saves_dropped",
            "expired_reservations",
        ),
    ),
    (
        "movement",
        (
            "promotions",
            "demotions",
            "evictions",
            "recycled_files",
            "corrupt_rows",
            "leases_reaped",
            "bad_messages",
        ),
    ),
)


SHARED_COUNTERS = (
    "lookups",
    "hits",
    "misses",
    "late",
    "writes",
    "writes_present",
    "writes_failed",
    "writes_skipped",
    "bytes_written",
    "bytes_read",
    "stale_manifests",
    "corrupt_rows",
    "errors",
)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render(stats: dict[str, Any]) -> str:
    """The human view of a ``stats`` reply."""
    lines = [
        (
            f"cache store pid {stats['pid']} on {stats['endpoint']}, up {stats['uptime_s']:.0f} s, "
            f"{stats['rows']} rows, {stats['leases']} leases, {stats['reservations']} reservations"
        )
    ]
    table = [("TIER", "STATE", "ROWS", "BYTES", "BUDGET", "USED", "DIR")]
    for name, t in stats["tiers"].items():
        used = f"{100 * t['bytes'] / t['budget']:.0f}%" if t["budget"] else "-"
        table.append(
            (
                name,
                "on" if t["enabled"] else "off",
                str(t["rows"]),
                _bytes(t["bytes"]),
                _bytes(t["budget"]),
                used,
                stats["dirs"].get(name, "(memfd)"),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in table]
    c = stats["counters"]
    for title, names in COUNTER_GROUPS:
        lines.append(f"{title}: " + ", ".join(f"{n}={c[n]}" for n in names))
    if c["lookups"]:
        lines.append(f"mean lookup {c['lookup_ns'] / c['lookups'] / 1e3:.1f} us")
    if c["loads"]:
        lines.append(f"mean load grant {c['load_ns'] / c['loads'] / 1e3:.1f} us")
    shared = stats.get("shared", {})
    if "state" in shared:  # configured (``enabled`` is false once the server refused the password)
        lines.append(f"shared tier {shared['url']}: {shared['state']}")
        lines.append("shared: " + ", ".join(f"{n}={shared[n]}" for n in SHARED_COUNTERS))
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="erllama cache", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--endpoint", help="cache store endpoint (default: $ERLLAMA_CACHESTORE, else the ipc default)"
    )
    ap.add_argument("--timeout", type=float, default=2.0)
    sub = ap.add_subparsers(dest="cmd")
    st = sub.add_parser("stats", help="tiers and counters (the default)")
    st.add_argument("--json", action="store_true")
    ev = sub.add_parser("evict", help="free bytes from some tiers")
    ev.add_argument("bytes", type=parse_size)
    ev.add_argument("--tier", action="append", choices=[t.value for t in LOCAL_TIERS])
    args = ap.parse_args(argv)
    try:
        with CacheClient(args.endpoint, timeout_s=args.timeout) as client:
            if args.cmd == "evict":
                tiers = [CacheTier(t) for t in (args.tier or ["ram", "shm"])]
                freed = client.evict_bytes(args.bytes, tiers)
                sys.stdout.write(f"{_bytes(freed)} leaving {', '.join(t.value for t in tiers)}\n")
                return 0
            stats = client.stats()
    except ErllamaError as exc:
        sys.stderr.write(f"erllama cache: {exc}\n")
        return 1
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render(stats) + "\n")
    return 0
