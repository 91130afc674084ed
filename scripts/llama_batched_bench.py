#!/usr/bin/env python3
"""llama.cpp's own ``llama-batched-bench``, built from the llama.cpp source that the installed
llama-cpp-python was compiled from, as the hardware's reference for batched decoding.

    python scripts/llama_batched_bench.py build           # prints the binary's path (~8 min on 2 cores)
    python scripts/llama_batched_bench.py run [--npl 1,8] [--runs 3] [--npp 32] [--ntg 128] [--n-ctx 1024]

``build`` downloads the llama-cpp-python source distribution of the installed version (pip), and
builds only the ``llama-batched-bench`` target with CMake's defaults (``-march=native``, OpenMP: what
``pip install llama-cpp-python`` builds) under ``~/.cache/erllama/``. ``scripts/bench_batching.py
--llama-batched-bench PATH`` runs it once per round next to ours and the direct loop, so the
scaling goal can be read against what llama.cpp itself reaches on this machine at the same time.

``run`` alone prints its decode speed (S_TG) per number of sequences and the scaling from the
fewest to the most, over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from erllama.models import default_model_path
from erllama.options import LoadOptions, parse_load_options

log = logging.getLogger("llama_batched_bench")

CACHE_DIR: Final = Path.home() / ".cache" / "erllama"
TARGET: Final = "llama-batched-bench"
# One row of its table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|(?:[^|]*\|){4}\s*([\d.]+)\s*\|")


def binary_path(target: str = TARGET) -> Path:
    """Where ``build`` puts a tool (``llama-batched-bench``, ``llama-server``) for the installed
    llama-cpp-python version."""
    version = importlib.metadata.version("llama_cpp_python")
    return CACHE_DIR / f"llama-cpp-python-{version}" / "build" / "bin" / target


def build(target: str = TARGET) -> Path:
    """Build (once) and return a llama.cpp tool from the installed version's source (also used by
    ``scripts/bench_gateway.py`` for ``llama-server``)."""
    out = binary_path(target)
    if out.exists():
        return out
    version = importlib.metadata.version("llama_cpp_python")
    root = out.parents[2]
    root.parent.mkdir(parents=True, exist_ok=True)
    if not (root / "vendor" / "llama.cpp").is_dir():  # another tool may have been built from it already
        _unpack_source(version, root)
    src = root / "vendor" / "llama.cpp"
    build_dir = root / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_SERVER=ON",  # only what --target names is compiled
        ],
        check=True,
    )
    jobs = str(os.cpu_count() or 1)  # a bare -j starts every compiler at once: ~30 on this tree
    subprocess.run(["cmake", "--build", str(build_dir), "--target", target, "-j", jobs], check=True)
    built = build_dir / "bin" / target
    if not built.exists():
        raise SystemExit(f"the build did not produce {built}")
    return built


def _unpack_source(version: str, root: Path) -> None:
    """The llama-cpp-python source distribution of ``version``, unpacked as ``root``."""
    sdists = root.parent / "sdist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            str(sdists),
        ],
        check=True,
    )
    archive = sdists / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(root.parent, filter="data")
    unpacked = root.parent / f"llama_cpp_python-{version}"
    if unpacked != root:
        shutil.rmtree(root, ignore_errors=True)
        unpacked.rename(root)


def parse_decode_speeds(table: str) -> dict[int, float]:
    """S_TG (decode tokens/s over all sequences) per number of sequences B, from its printed table."""
    speeds: dict[int, float] = {}
    for line in table.splitlines():
        m = _ROW.match(line)
        if m:
            speeds[int(m.group(3))] = float(m.group(4))
    return speeds


def run_once(
    binary: Path, opts: LoadOptions, npl: Sequence[int], prompt_tokens: int, gen_tokens: int
) -> dict[int, float]:
    """One run; its decode speed S_TG (tokens/s over all sequences) per number of sequences.

    The context matches the worker's: ``n_ctx`` cells per sequence for ``n_seq_max`` sequences, the
    same batch sizes, thread count, flash attention, KV layout and weight repacking."""
    cmd = [
        str(binary),
        "-m",
        str(default_model_path()),
        "-c",
        str(opts.n_ctx * opts.n_seq_max),
        "-b",
        str(opts.n_batch),
        "-ub",
        str(opts.n_ubatch),
        "-t",
        str(opts.threads),
        "-fa",
        "on" if opts.exact else opts.flash_attn,
        "-ctk",
        opts.kv_types()[0],  # the default model's heads (64) take the exact mode's q8_0
        "-ctv",
        opts.kv_types()[1],
        "-npp",
        str(prompt_tokens),
        "-ntg",
        str(gen_tokens),
        "-npl",
        ",".join(map(str, npl)),
        "--repack" if opts.use_extra_bufts else "--no-repack",
        "--kv-unified" if opts.kv_unified else "--no-kv-unified",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{TARGET} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    speeds = parse_decode_speeds(proc.stdout)
    if set(speeds) != set(npl):
        raise RuntimeError(f"{TARGET} printed no row for {sorted(set(npl) - set(speeds))} sequences")
    return speeds


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("action", choices=("build", "run"))
    ap.add_argument("--npl", default="1,8", help="numbers of parallel sequences")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--npp", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--ntg", type=int, default=128, help="generated tokens per sequence")
    ap.add_argument("--n-ctx", type=int, default=1024, help="context tokens per sequence")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "build":
        print(build())
        return 0
    binary = binary_path()
    if not binary.exists():
        ap.error(f"no {binary}: run `python {sys.argv[0]} build` first")
    npl = [int(x) for x in args.npl.split(",")]
    opts = parse_load_options({"n_ctx": args.n_ctx, "n_seq_max": max(npl)})
    runs = [run_once(binary, opts, npl, args.npp, args.ntg) for _ in range(args.runs)]
    for n in npl:
        print(
            f"{n:>3} sequences: S_TG {statistics.median(r[n] for r in runs):7.1f} tok/s "
            f"(runs: {', '.join(f'{r[n]:.1f}' for r in runs)})"
        )
    lo, hi = min(npl), max(npl)
    print(f"scaling {hi} / {lo}: median of runs {statistics.median(r[hi] / r[lo] for r in runs):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
