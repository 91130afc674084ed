"""What every erllama process does first: one logging format, and dying with the broker that spawned it."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def setup_logging(level: str, role: str) -> None:
    """Log to stderr (the broker captures each worker's stderr and keeps its tail for crash reports)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
    )


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the spawning broker dies, so no child outlives it (and keeps
    its endpoints or directory locks from the broker that replaces it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(0)
