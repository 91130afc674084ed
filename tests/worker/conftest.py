"""Worker tests that talk to a real cache store use the cache store's daemon fixtures."""

from tests.cachestore.conftest import daemon, store_dirs

__all__ = ["daemon", "store_dirs"]
