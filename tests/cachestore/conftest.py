"""Fixtures for the cache store: real daemons in temporary directories, cleaned up even on failure."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cachestore.cachestore_support import Daemon


@pytest.fixture
def store_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(runtime root, shm dir, disk dir): a short /tmp dir for the ipc path, /dev/shm for shm."""
    root = Path(tempfile.mkdtemp(prefix="ecs-", dir="/tmp"))
    shm_base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    shm_root = Path(tempfile.mkdtemp(prefix="ecs-test-", dir=shm_base))
    try:
        yield root, shm_root / "shm", tmp_path / "disk"
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(shm_root, ignore_errors=True)


@pytest.fixture
def daemon(store_dirs: tuple[Path, Path, Path]) -> Iterator[Daemon]:
    """A daemon object, not started: call ``.start(ram_bytes=..., ...)``."""
    d = Daemon(*store_dirs)
    try:
        yield d
    finally:
        d.close()
