"""The shared tier's Valkey/Redis side: key layout, manifests, and the blocking calls made on the
daemon's shared-tier threads (never on its loop).

Layout (``KEY_PREFIX`` = ``erllama:kv1:``)::

    erllama:kv1:m:<hex row key>                    manifest (msgpack ``Manifest``), written LAST
    erllama:kv1:p:<hex row key>:<nonce>:<i>        part i of the row image (PART_BYTES each, the last shorter)
    erllama:kv1:n:<hex SHA-256(fingerprint)[:32]>  sorted set: the token counts of rows stored under it

A row image is the row file itself (``codec``'s format), so its own checksum covers it. A writer puts its
parts under a fresh nonce, then sets the manifest only if none exists (``SET NX``): two hosts storing the
same row never mix parts, and a reader that sees a manifest sees parts that were complete when it was
written. The server's ``maxmemory`` eviction (allkeys-lru) may drop any key at any time: a manifest
whose parts are gone, or whose image fails its checksum, is a miss, and is deleted (if it is still the
one read).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from erllama.cachestore.codec import KEY_DOMAIN, CorruptRow, RowHeader, verify_image

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "erllama:kv1:"
MANIFEST_VERSION: Final = 1
PART_BYTES: Final = 4 * 1024 * 1024  # well under Redis' 512 MB string limit; one part is one SET
CONNECT_TIMEOUT_S: Final = 0.5
SOCKET_TIMEOUT_S: Final = 2.0
TOKEN_BYTES: Final = 4

# Delete a key only if it still holds what was read: another host may have replaced a stale manifest
# with a good one in between.
_DELETE_IF_UNCHANGED: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Manifest(msgspec.Struct, frozen=True):
    """Where a row's image is: its parts in order, their sizes, and the row's own checksum."""

    v: int
    size: int
    crc: int
    parts: list[str]
    part_sizes: list[int]


class SharedDown(Exception):
    """The server is unreachable or too slow: the tier is down until a retry succeeds."""


class SharedAuthFailed(Exception):
    """The server refused the credentials: the tier is off for this daemon's life."""


class SharedFault(Exception):
    """The server answered with an error (out of memory, a command refused): this operation failed."""


@dataclass(slots=True)
class PutResult:
    stored: bool  # False: a manifest for this row was already there
    nbytes: int  # bytes sent


@dataclass(slots=True)
class FetchResult:
    """A lookup's outcome: the longest stored row that is a prefix of the query, if any."""

    key: bytes | None = None
    header: RowHeader | None = None
    image: bytearray | None = None
    nbytes_read: int = 0
    stale: int = 0  # manifests whose parts were evicted: deleted
    corrupt: int = 0  # images that failed their checks: deleted


def manifest_key(key: bytes) -> str:
    return f"{KEY_PREFIX}m:{key.hex()}"


def lengths_key(fingerprint: bytes) -> str:
    return f"{KEY_PREFIX}n:{hashlib.sha256(fingerprint).hexdigest()[:32]}"


def redact(url: str) -> str:
    """``url`` without its password, for logs and stats."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def prefix_keys(fingerprint: bytes, token_bytes: bytes, lengths: list[int]) -> list[bytes]:
    """The row keys of the first ``n`` tokens for each ``n`` in ``lengths`` (ascending), with one pass of
    SHA-256 over the tokens (``codec.row_key_bytes`` hashes the token ids last)."""
    h = hashlib.sha256(KEY_DOMAIN)
    h.update(len(fingerprint).to_bytes(1, "little"))
    h.update(fingerprint)
    keys, done = [], 0
    for n in lengths:
        h.update(token_bytes[done * TOKEN_BYTES : n * TOKEN_BYTES])
        done = n
        keys.append(h.copy().digest())
    return keys


@contextmanager
def _faults() -> Iterator[None]:
    """redis-py's exceptions as the three outcomes the daemon tells apart."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise SharedAuthFailed(str(exc)) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise SharedDown(str(exc) or type(exc).__name__) from None
    except redis.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS")):
            raise SharedAuthFailed(str(exc)) from None
        raise SharedFault(str(exc)) from None
    except redis.RedisError as exc:
        raise SharedFault(str(exc) or type(exc).__name__) from None


def _blobs(reply: Any) -> list[bytes | None]:
    """A multi-value reply as bytes (the client does not decode responses)."""
    return [v if isinstance(v, bytes) or v is None else bytes(v) for v in reply]


class SharedKV:
    """Blocking operations on the server. Thread-safe (redis-py's connection pool)."""

    def __init__(self, url: str):
        # No retries inside redis-py: a failed call is a miss or a dropped write, and the daemon decides
        # when to try again (its loop must never wait on a retry schedule).
        self._redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._delete_if_unchanged = self._redis.register_script(_DELETE_IF_UNCHANGED)

    def ping(self) -> None:
        with _faults():
            self._redis.ping()

    def close(self) -> None:
        self._redis.close()

    # --- writing -------------------------------------------------------------------------------------------

    def put(self, key: bytes, fingerprint: bytes, n_tokens: int, image: bytearray) -> PutResult:
        """Store a row image (verified first: a row that changed while it was read is not sent)."""
        header = verify_image(image, key)
        mkey = manifest_key(key)
        view = memoryview(image)
        with _faults():
            if self._redis.exists(mkey):
                return PutResult(False, 0)
            nonce = os.urandom(8).hex()
            names, sizes = [], []
            pipe = self._redis.pipeline(transaction=False)
            for i, offset in enumerate(range(0, len(image), PART_BYTES)):
                chunk = view[offset : offset + PART_BYTES]
                names.append(f"{KEY_PREFIX}p:{key.hex()}:{nonce}:{i}")
                sizes.append(len(chunk))
                pipe.set(names[-1], chunk)
            pipe.execute()
            manifest = msgspec.msgpack.encode(
                Manifest(MANIFEST_VERSION, len(image), header.checksum, names, sizes)
            )
            if not self._redis.set(mkey, manifest, nx=True):  # another host was quicker
                self._redis.delete(*names)
                return PutResult(False, len(image))
            self._redis.zadd(lengths_key(fingerprint), {str(n_tokens): n_tokens})
        return PutResult(True, len(image))

    # --- reading -------------------------------------------------------------------------------------------

    def fetch(self, fingerprint: bytes, token_bytes: bytes, min_len: int, max_len: int) -> FetchResult:
        """The longest stored row of ``fingerprint`` whose tokens are a prefix of the query, at least
        ``min_len`` and at most ``max_len`` tokens long, fetched and verified."""
        result = FetchResult()
        hi = min(len(token_bytes) // TOKEN_BYTES, max_len)
        if hi < min_len:
            return result
        with _faults():
            found = self._redis.zrangebyscore(lengths_key(fingerprint), min_len, hi)
            lengths = sorted({int(m) for m in _blobs(found) if m is not None})
            if not lengths:
                return result
            keys = prefix_keys(fingerprint, token_bytes, lengths)
            manifests = _blobs(self._redis.mget([manifest_key(k) for k in keys]))
            for key, raw in reversed(list(zip(keys, manifests, strict=True))):
                if raw is None:
                    continue
                image = self._read(key, raw, result)
                if image is not None:
                    result.key, result.header, result.image = key, image[0], image[1]
                    return result
        return result

    def _read(self, key: bytes, raw: bytes, result: FetchResult) -> tuple[RowHeader, bytearray] | None:
        """The verified image a manifest describes, or None (the manifest deleted, and counted)."""
        try:
            manifest = msgspec.msgpack.decode(raw, type=Manifest)
            if manifest.v != MANIFEST_VERSION or len(manifest.parts) != len(manifest.part_sizes):
                raise CorruptRow("unknown manifest version or shape")
            own = f"{KEY_PREFIX}p:{key.hex()}:"
            if not all(name.startswith(own) for name in manifest.parts):  # never touch other keys
                raise CorruptRow("a part key that is not this row's")
        except (msgspec.DecodeError, CorruptRow) as exc:
            log.warning("shared row %s: bad manifest (%s): deleted", key.hex()[:16], exc)
            result.corrupt += 1
            self._delete_if_unchanged(keys=[manifest_key(key)], args=[raw])
            return None
        fetched = _blobs(self._redis.mget(manifest.parts)) if manifest.parts else []
        parts = [p for p in fetched if p is not None]
        if len(parts) != len(fetched):
            log.info("shared row %s: parts evicted by the server: a miss", key.hex()[:16])
            result.stale += 1
            self._forget(key, raw, manifest)
            return None
        image = bytearray(manifest.size)
        offset = 0
        try:
            for part, size in zip(parts, manifest.part_sizes, strict=True):
                if len(part) != size or offset + size > manifest.size:
                    raise CorruptRow("a part has the wrong size")
                image[offset : offset + size] = part
                offset += size
            result.nbytes_read += offset
            if offset != manifest.size:
                raise CorruptRow("parts do not add up to the row")
            header = verify_image(image, key)
            if header.checksum != manifest.crc:
                raise CorruptRow("checksum differs from the manifest's")
        except CorruptRow as exc:
            log.warning("shared row %s failed verification (%s): deleted", key.hex()[:16], exc)
            result.corrupt += 1
            self._forget(key, raw, manifest)
            return None
        return header, image

    def _forget(self, key: bytes, raw: bytes, manifest: Manifest) -> None:
        if self._delete_if_unchanged(keys=[manifest_key(key)], args=[raw]) and manifest.parts:
            self._redis.delete(*manifest.parts)
