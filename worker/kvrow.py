"""What a worker stores in a cache row's payload: the sequence's KV state and the logits of its last
token.

The cache store keeps payloads as opaque bytes; this module gives them their shape. A row that
carries the next-token logits of its last token lets an exact hit sample its first token without
decoding anything again: that makes an exact hit on a recurrent model possible (its state cannot be
truncated by one token to re-decode it), and saves a decode step on every other model. A row may
carry no logits (an idle session's KV, or a sequence that was not in the last decode): it is still
good for every prompt that continues past it.

    head (24 bytes) | state (state_len bytes) | logits (logits_len bytes: float32 per vocabulary entry)
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Final

ROW_MAGIC: Final = b"ERKV"
ROW_VERSION: Final = 1
_HEAD: Final = struct.Struct("<4sHHQQ")  # magic, version, reserved, state_len, logits_len
HEAD_BYTES: Final = _HEAD.size


class BadRow(ValueError):
    """The payload is not a row this worker wrote (another layout, or damaged)."""


def pack_head(state_len: int, logits_len: int) -> bytes:
    return _HEAD.pack(ROW_MAGIC, ROW_VERSION, 0, state_len, logits_len)


@dataclass(frozen=True, slots=True)
class RowParts:
    """Where the state and the logits lie in a payload."""

    state_offset: int
    state_len: int
    logits_offset: int
    logits_len: int

    @classmethod
    def parse(cls, payload: memoryview) -> RowParts:
        if len(payload) < HEAD_BYTES:
            raise BadRow(f"a {len(payload)}-byte payload has no row head")
        magic, version, _, state_len, logits_len = _HEAD.unpack_from(payload)
        if magic != ROW_MAGIC or version != ROW_VERSION:
            raise BadRow(f"row head {magic!r} v{version} is not {ROW_MAGIC!r} v{ROW_VERSION}")
        if HEAD_BYTES + state_len + logits_len != len(payload):
            raise BadRow(
                f"row head says {state_len} + {logits_len} bytes, the payload has {len(payload) - HEAD_BYTES}"
            )
        return cls(HEAD_BYTES, state_len, HEAD_BYTES + state_len, logits_len)

    def state_array(self, payload_array: ctypes.Array[ctypes.c_uint8]) -> ctypes.Array[ctypes.c_uint8]:
        """The state as a ctypes array over the payload's own memory (no copy): valid while the row is open."""
        base = ctypes.addressof(payload_array) + self.state_offset
        return (ctypes.c_uint8 * self.state_len).from_address(base)

    def logits(self, payload: memoryview) -> bytes | None:
        """A copy of the logits (the row's memory goes away when it is closed), or None if it has none."""
        if not self.logits_len:
            return None
        return bytes(payload[self.logits_offset : self.logits_offset + self.logits_len])
