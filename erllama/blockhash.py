"""Prefix-block hashes: the names under which cache stores announce what they hold (KV events) and
under which the broker's routing index looks a prompt up.

A token sequence is cut into blocks of ``KV_BLOCK_TOKENS``; block ``i``'s hash covers the model's
fingerprint and every token up to the end of block ``i`` (each hash chains the previous one), so equal
hashes mean equal prefixes, and the longest run of a prompt's hashes known on a host is how much of the
prompt that host could restore, to within one block. A trailing partial block has no hash: routing
counts whole blocks only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from erllama.cachestore.codec import tokens_to_bytes

KV_BLOCK_TOKENS: Final = 64
_BLOCK_BYTES: Final = KV_BLOCK_TOKENS * 4  # tokens are stored as 4-byte little-endian ids
_PERSON: Final = b"erllama-kvblock1"  # blake2b's personalisation: 16 bytes


def block_hashes_of_bytes(fingerprint: bytes, token_bytes: bytes | memoryview) -> list[int]:
    """The chained hash (a 64-bit unsigned int) of every whole block of ``token_bytes`` (the cache
    store's encoding of a row's tokens), under ``fingerprint`` (the model's cache fingerprint)."""
    prev = hashlib.blake2b(fingerprint, digest_size=8, person=_PERSON).digest()
    out: list[int] = []
    for start in range(0, len(token_bytes) - _BLOCK_BYTES + 1, _BLOCK_BYTES):
        prev = hashlib.blake2b(prev + token_bytes[start : start + _BLOCK_BYTES], digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


def block_hashes(fingerprint: bytes, tokens: Sequence[int]) -> list[int]:
    """``block_hashes_of_bytes`` of a token list."""
    return block_hashes_of_bytes(fingerprint, tokens_to_bytes(tokens))
