"""The cluster benchmark runs end to end (tiny sizes, no calibration: this checks the script, not the
speed): a broker with two hosts, the single-host baseline and two routing policies, and its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cluster_prints_restored_tokens_and_ttft_per_configuration_and_the_goals() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_cluster.py"),
            *("--no-calibrate", "--prefill-us", "20", "--decode-ms", "1", "--hosts", "2", "--seqs", "1"),
            *("--convs", "3", "--turns", "2", "--system-tokens", "100", "--conv-tokens", "20"),
            *(
                "--new-tokens",
                "20",
                "--gen",
                "4",
                "--routings",
                "cache_aware",
                "round_robin",
                "--tiers",
                "off",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["single host, 2 seqs", "cache_aware, shared off", "round_robin, shared off"], out
    assert "cache_aware / round_robin mean TTFT" in out and "cache_aware restored / single host's" in out
