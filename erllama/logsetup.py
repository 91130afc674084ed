"""One logging format for every erllama process: time, process role, level, logger, message."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, role: str) -> None:
    """Log to stderr (the broker captures each worker's stderr and keeps its tail for crash reports)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
    )
