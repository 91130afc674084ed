"""The cache-store benchmark runs end to end (tiny sizes: this checks the script, not the speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_cachestore_prints_every_tier_and_the_lookup_latency(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_cachestore.py"),
            *("--sizes-mb", "1", "--reps", "2", "--rows", "200", "--queries", "20"),
            *("--disk-root", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith(("|   1 MB |", "| 1 MB |"))]
    assert [r.split("|")[2].strip() for r in rows] == ["ram", "shm", "disk"], out
    assert rows[2].split("|")[-3].strip() == "-"  # disk files are not reused
    assert "longest_prefix with 200 rows" in out
    assert list(tmp_path.iterdir()) == []  # it removed everything it made


def test_bench_shared_prints_the_shared_and_local_lookups_per_size() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_shared.py"), "--sizes-mb", "1", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("|      1 MB |")]
    assert len(rows) == 1 and rows[0].split("|")[4].strip() == "0/1", out  # fetched, not late
