"""Raw wire maps for tests that send what no erllama process would: unknown types, missing or wrongly
typed fields. Everything else builds the typed messages of ``erllama.protocol``."""

from __future__ import annotations

from typing import Any

import msgpack

from erllama.protocol import PROTOCOL_VERSION


def raw_frame(t: str, **fields: Any) -> bytes:
    """One message as the map a peer would pack: ``v``, ``t`` and exactly ``fields``."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": str(t), **fields}, use_bin_type=True)
