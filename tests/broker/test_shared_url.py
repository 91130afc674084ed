"""The broker hands the shared tier's URL (flag or TOML) to the cache store it runs, in the store's
environment: the store uses the server, and the password is not on any command line."""

from __future__ import annotations

from typing import Any

import psutil
import pytest

from erllama.cachestore.client import CacheClient
from erllama.protocol import ErllamaError
from erllama.transport import CACHESTORE_SOCKET_NAME, ipc_endpoint
from tests.conftest import BrokerProcess, remove_runtime, short_tmpdir, start_broker, wait_for
from tests.redis_support import PASSWORD, RedisServer


def shared_state(bp: BrokerProcess) -> dict[str, Any]:
    try:
        with CacheClient(ipc_endpoint(bp.runtime_dir, CACHESTORE_SOCKET_NAME), timeout_s=2) as c:
            shared: dict[str, Any] = c.stats()["shared"]
            shared["pid"] = c.stats()["pid"]
            return shared
    except ErllamaError:  # the store is still starting
        return {}


@pytest.mark.parametrize("via", ["toml", "flag"])
def test_the_broker_gives_its_cache_store_the_shared_url_without_showing_the_password(
    redis_server: RedisServer, via: str
) -> None:
    rdir = short_tmpdir("erl-su-")
    config = rdir / "erllama.toml"
    config.write_text(f'[cachestore]\nshared_url = "{redis_server.url}"\n')
    args = ["--config", str(config)] if via == "toml" else ["--shared-url", redis_server.url]
    bp = start_broker(rdir, "--no-default-model", *args)
    try:
        shared = wait_for(lambda: (s := shared_state(bp)).get("state") == "up" and s, 30, "the shared tier")
        assert PASSWORD not in shared["url"]
        assert not any(PASSWORD in arg for arg in psutil.Process(shared["pid"]).cmdline())
    finally:
        bp.stop()
        remove_runtime(rdir)
