"""Exact replay: a conversation sent back is rebuilt from the tokens the model actually sampled.

A client resends the whole conversation every turn, as JSON. Rendering that JSON through the chat
template again rarely gives back the model's own tokens (a tool call's spacing, a thinking block the
template drops, a token boundary the tokenizer draws elsewhere), and one differing token loses the KV
prefix after it: minutes of prefill for a coding agent's 30k-token prompt on a CPU.

So every reply the gateway sends is remembered: its *record* is the exact token sequence the model held
at its end (the prompt it was given + the tokens it sampled), stored under a key that is an HMAC of the
conversation through that reply, in a canonical form that names every tool-call id and thinking
signature. When a later request's conversation, up to one of its assistant messages, has the key of a
record, the prompt is that record's tokens, the template's end-of-turn tokens, then the rest of the
conversation rendered by the template. Anything else (an id erllama never issued, an edited tool call, a
tampered signature, a record evicted) has no record and is rendered as it comes.

Records are small msgpack files (``<key>.rec``, token ids as int32 bytes) under ``replay_dir``, so a
restart keeps them, as the cache store's disk tier keeps the KV rows they point at; the oldest go when
there are more than ``MAX_RECORDS``.
"""

from __future__ import annotations

import array
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from erllama.client import AsyncClient

log = logging.getLogger(__name__)

MAX_RECORDS: Final = 4096  # on disk; a record of a 30k-token context is 120 KB
MEMORY_RECORDS: Final = 64  # the most recent, also in memory
KEY_FILE: Final = "signing.key"
RECORD_SUFFIX: Final = ".rec"
KEY_BYTES: Final = 32


def default_replay_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "erllama" / "replay"


def load_signing_key(directory: Path, configured: bytes) -> bytes:
    """``configured`` if set, else the key kept in ``directory`` (made once, owner-only), so that ids
    and signatures issued before a restart still verify after it."""
    if configured:
        return configured
    path = directory / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        key = secrets.token_bytes(KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex())
        return key


def canonical(value: Any) -> bytes:
    """One byte string per JSON value, whatever its key order or spacing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Conversation:
    """A request as the chat template sees it, and what identifies each message for replay.

    ``messages[i]`` is in template form; ``canon[i]`` is its canonical identity (the template form plus
    tool-call ids and thinking blocks with their signatures, which the template form loses)."""

    model: str
    system: str | None
    tools: list[dict[str, Any]] | None
    messages: list[dict[str, Any]]
    canon: list[Any]


@dataclass(frozen=True, slots=True)
class Prompt:
    tokens: list[int]
    replayed_tokens: int  # how many came from a record (0: all rendered)


class _Record(msgspec.Struct, frozen=True):
    model: str
    tokens: bytes  # int32 token ids


class Replay:
    """The record store and the prompt builder; one per gateway."""

    def __init__(self, directory: Path, key: bytes):
        self.dir = directory
        self.key = key
        self._memory: OrderedDict[str, list[int]] = OrderedDict()
        self._suffix: dict[str, list[int]] = {}

    # --- ids and signatures ----------------------------------------------------------------------------

    def sign(self, *parts: str) -> str:
        """HMAC-SHA256 of ``parts`` with the gateway's key, hex: unguessable without the key."""
        return hmac.new(self.key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()

    def verify(self, signature: str, *parts: str) -> bool:
        return hmac.compare_digest(signature.encode(), self.sign(*parts).encode())

    def key_of(self, conv: Conversation, upto: int, extra: Any = None) -> str:
        """The record key of ``conv``'s messages ``[:upto]`` (plus ``extra``, a reply's canon)."""
        head = [conv.model, conv.system, conv.tools, conv.canon[:upto]]
        if extra is not None:
            head[3] = [*conv.canon[:upto], extra]
        return hmac.new(self.key, canonical(head), hashlib.sha256).hexdigest()

    # --- records -----------------------------------------------------------------------------------------

    def remember(self, conv: Conversation, reply_canon: Any, prompt: list[int], generated: list[int]) -> None:
        """Keep the tokens of the reply just given to ``conv`` (``prompt`` + ``generated``)."""
        key = self.key_of(conv, len(conv.canon), reply_canon)
        tokens = [*prompt, *generated]
        self._keep(key, tokens)
        record = _Record(conv.model, array.array("i", tokens).tobytes())
        tmp = self.dir / f".{key}.tmp"
        tmp.write_bytes(msgspec.msgpack.encode(record))
        tmp.replace(self.dir / f"{key}{RECORD_SUFFIX}")
        self._trim()

    def lookup(self, key: str, model: str) -> list[int] | None:
        tokens = self._memory.get(key)
        if tokens is not None:
            self._memory.move_to_end(key)
            return tokens
        try:
            record = msgspec.msgpack.decode((self.dir / f"{key}{RECORD_SUFFIX}").read_bytes(), type=_Record)
        except (FileNotFoundError, msgspec.DecodeError):
            return None
        if record.model != model:
            return None
        tokens = array.array("i", record.tokens).tolist()
        self._keep(key, tokens)
        return tokens

    def _keep(self, key: str, tokens: list[int]) -> None:
        self._memory[key] = tokens
        self._memory.move_to_end(key)
        while len(self._memory) > MEMORY_RECORDS:
            self._memory.popitem(last=False)

    def _trim(self) -> None:
        files = list(self.dir.glob(f"*{RECORD_SUFFIX}"))
        if len(files) <= MAX_RECORDS:
            return
        files.sort(key=lambda p: p.stat().st_mtime)
        for path in files[: len(files) - MAX_RECORDS]:
            path.unlink(missing_ok=True)

    # --- prompts -------------------------------------------------------------------------------------------

    async def prompt(self, client: AsyncClient, conv: Conversation) -> Prompt:
        """The prompt for ``conv``: from the latest assistant message with a record, else rendered."""
        full = await self._render(client, conv, conv.messages, True)
        for k in range(len(conv.messages) - 1, -1, -1):
            if conv.messages[k].get("role") != "assistant":
                continue
            tokens = self.lookup(self.key_of(conv, k + 1), conv.model)
            if tokens is None:
                continue
            head = await self._render(client, conv, conv.messages[: k + 1], False)
            if full[: len(head)] != head:  # the template renders history differently later: no cut
                log.info("replay: the template does not render %d messages as a prefix", k + 1)
                break
            suffix = await self._end_of_turn(client, conv)
            return Prompt([*tokens, *suffix, *full[len(head) :]], len(tokens))
        return Prompt(full, 0)

    async def _render(
        self, client: AsyncClient, conv: Conversation, messages: list[dict[str, Any]], generation: bool
    ) -> list[int]:
        return await client.apply_chat_template(
            conv.model, messages, system=conv.system, tools=conv.tools, add_generation_prompt=generation
        )

    async def _end_of_turn(self, client: AsyncClient, conv: Conversation) -> list[int]:
        """The tokens the template writes after an assistant message's content (``<|im_end|>\\n``): the
        model stops before them (an end-of-generation token is never part of a reply)."""
        suffix = self._suffix.get(conv.model)
        if suffix is None:
            user = {"role": "user", "content": "x"}
            opened = await client.apply_chat_template(conv.model, [user], add_generation_prompt=True)
            closed = await client.apply_chat_template(
                conv.model, [user, {"role": "assistant", "content": ""}], add_generation_prompt=False
            )
            suffix = closed[len(opened) :] if closed[: len(opened)] == opened else []
            self._suffix[conv.model] = suffix
        return suffix


def open_replay(directory: str | None, configured_key: bytes) -> Replay:
    path = Path(directory) if directory else default_replay_dir()
    path.mkdir(parents=True, exist_ok=True)
    return Replay(path, load_signing_key(path, configured_key))
