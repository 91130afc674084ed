"""What every erllama process does first: one logging format, and dying with the broker that spawned it.

Every log line written while a request is being worked on starts with ``rid=<the broker's id>``: the
broker and the worker write it themselves, and code that runs on a request's behalf deeper down (a cache
lookup, a save on the saver thread, the cache store handling a request that carries the id) runs inside
``about_request``, whose id the format adds. One grep follows a request through every process's log.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

PR_SET_PDEATHSIG = 1

CURRENT_REQUEST: ContextVar[int | None] = ContextVar("erllama_request", default=None)


@contextmanager
def about_request(rid: int | None) -> Iterator[None]:
    """Log lines written inside (and cache requests sent inside) are about the broker's request ``rid``."""
    token = CURRENT_REQUEST.set(rid)
    try:
        yield
    finally:
        CURRENT_REQUEST.reset(token)


F = TypeVar("F", bound=Callable[..., Any])


def for_request(method: F) -> F:
    """A method whose first argument (after ``self``) is a request with a ``rid``: runs ``about_request``."""

    @functools.wraps(method)
    def wrapper(self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
        with about_request(req.rid):
            return method(self, req, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _RequestTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = CURRENT_REQUEST.get()
        record.request = f"rid={rid} " if rid is not None else ""
        return True


def setup_logging(level: str, role: str) -> None:
    """Log to stderr (the broker captures each worker's stderr and keeps its tail for crash reports)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(request)s%(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RequestTag())


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the spawning broker dies, so no child outlives it (and keeps
    its endpoints or directory locks from the broker that replaces it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(0)
