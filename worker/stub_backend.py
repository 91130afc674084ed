"""A deterministic backend with no model file, for fast tests of the scheduler, broker and client.

Tokens are bytes: id 0 is BOS, id 1 is EOS, ids 2..257 are the byte values 0..255, so
tokenize/detokenize round-trip exactly and tests can write stop strings in plain text.
The "KV state" of a sequence is its token list, so save/restore and truncation are
observable. ``memory`` imitates llama.cpp's other memory kinds: ``swa`` keeps only the last
``n_swa`` positions known (older ones become unknown, in a live sequence and in a saved state, and
a decode that depends on an unknown token fails), ``recurrent`` and ``hybrid`` cannot be cut back
to an earlier position. The next token is a hash of the sequence's recent history (and, when sampling
with a temperature, of the seed and the number of draws), mapped to a lower-case letter or a
space: output depends on the prompt, on the sampler and on nothing else, so a request whose
stream got mixed up with another's is visible at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from erllama.options import SamplingParams
from erllama.protocol import MemoryKind
from erllama.worker.backend import BackendError, BatchRow, Logits

BOS_ID: Final = 0
EOS_ID: Final = 1
BYTE_BASE: Final = 2
N_VOCAB: Final = BYTE_BASE + 256
ALPHABET: Final = b"abcdefghijklmnopqrstuvwxyz    "
HISTORY_TOKENS: Final = 16
STATE_MAGIC: Final = b"STUBKV1\0"
UNKNOWN: Final = 0xFFFFFFFF  # a position whose KV a sliding-window state did not keep
STUB_SWA_TOKENS: Final = 32  # the stub's window; HISTORY_TOKENS < this, so a decode in the window is exact


@dataclass(slots=True)
class StubSampler:
    greedy: bool
    seed: int
    draws: int = 0


class StubBackend:
    """See the module docstring. ``decode_ms`` sleeps per decode to stand in for compute, and
    ``prefill_us_per_token`` more per token of the batch: a model whose time to first token grows with
    the prompt tokens not restored from a cache (benchmarks calibrate both from the real model)."""

    def __init__(
        self,
        n_ctx: int,
        n_seq_max: int,
        n_batch: int,
        decode_ms: int = 0,
        memory: MemoryKind = MemoryKind.TRANSFORMER,
        prefill_us_per_token: int = 0,
    ):
        self.memory = memory
        self.n_swa = STUB_SWA_TOKENS if memory is MemoryKind.SWA else 0
        self.n_ctx_seq = n_ctx
        self.n_ctx = n_ctx * n_seq_max
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        self.n_vocab = N_VOCAB
        self._decode_s = decode_ms / 1000.0
        self._token_s = prefill_us_per_token / 1e6
        self._kv: list[list[int]] = [[] for _ in range(n_seq_max)]
        self._logits: list[tuple[int, ...]] = []  # per logits index: the history it was computed from
        self._seed_counter = 0

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        body = [BYTE_BASE + b for b in text.encode()]
        return [BOS_ID, *body] if add_special else body

    def token_bytes(self, token: int) -> bytes:
        return bytes([token - BYTE_BASE]) if token >= BYTE_BASE else b""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token == EOS_ID

    def decode(self, rows: Sequence[BatchRow]) -> list[int]:
        n_tokens = sum(len(r.tokens) for r in rows)
        if n_tokens > self.n_batch:
            raise BackendError("batch_overflow", "more tokens than n_batch")
        self._logits = []
        out: list[int] = []
        for row in rows:
            kv = self._kv[row.seq_id]
            if row.pos != len(kv):
                raise BackendError("bad_position", f"seq {row.seq_id}: pos {row.pos} != {len(kv)}")
            if len(kv) + len(row.tokens) > self.n_ctx_seq:
                raise BackendError("no_kv_slot", f"seq {row.seq_id} is full")
            kv.extend(row.tokens)
            if self.memory is MemoryKind.SWA:
                self._forget_outside_window(kv)
            n = min(row.n_logits, len(row.tokens))
            for end in range(len(kv) - n + 1, len(kv) + 1):  # the history each logits row depends on
                history = tuple(kv[max(0, end - HISTORY_TOKENS) : end])
                if UNKNOWN in history:  # llama.cpp would attend to missing cells and compute garbage
                    raise BackendError(
                        "missing_kv", f"seq {row.seq_id}: the window before {end} was not restored"
                    )
                self._logits.append(history)
            out.append(len(self._logits) - 1 if n else -1)
        if self._decode_s or self._token_s:
            time.sleep(self._decode_s + n_tokens * self._token_s)
        return out

    def new_sampler(self, params: SamplingParams, history: Sequence[int]) -> StubSampler:
        if params.seed is None:
            self._seed_counter += 1
            seed = int(time.monotonic_ns() + self._seed_counter) & 0xFFFFFFFF
        else:
            seed = params.seed
        return StubSampler(greedy=params.temperature == 0.0, seed=seed)

    def sample(self, sampler: StubSampler, logits: Logits, greedy: bool = False) -> int:
        history = (
            self._logits[logits]
            if isinstance(logits, int)
            else struct.unpack(f"<{len(logits) // 4}I", logits)
        )
        h = hashlib.blake2b(struct.pack(f"<{len(history)}I", *history), digest_size=8)
        if not (sampler.greedy or greedy):
            h.update(struct.pack("<II", sampler.seed, sampler.draws))
        sampler.draws += 1
        return BYTE_BASE + ALPHABET[h.digest()[0] % len(ALPHABET)]

    def argmax(self, logits_index: int) -> int:
        return self.sample(StubSampler(greedy=True, seed=0), logits_index)

    def logits_blob(self, logits_index: int) -> bytes:
        history = self._logits[logits_index]
        return struct.pack(f"<{len(history)}I", *history)

    def free_sampler(self, sampler: StubSampler) -> None:
        pass

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """A 16-dimensional unit vector hashed from the tokens."""
        digest = hashlib.blake2b(struct.pack(f"<{len(tokens)}I", *tokens), digest_size=16).digest()
        vec = [b - 127.5 for b in digest]
        norm = sum(v * v for v in vec) ** 0.5
        return [v / norm for v in vec]

    def load_adapter(self, path: str) -> Any:
        raise BackendError("not_supported", "the stub backend has no adapters")

    def set_adapters(self, adapters: Sequence[tuple[Any, float]]) -> None:
        if adapters:
            raise BackendError("not_supported", "the stub backend has no adapters")

    def free_adapter(self, adapter: Any) -> None:
        pass

    def seq_clear(self, seq_id: int) -> None:
        self._kv[seq_id] = []

    def seq_keep(self, seq_id: int, n_held: int, n_keep: int) -> bool:
        if n_keep >= n_held:
            return True
        if self.memory in (MemoryKind.RECURRENT, MemoryKind.HYBRID):
            return False
        kv = self._kv[seq_id]
        del kv[n_keep:]
        return UNKNOWN not in kv[max(0, n_keep - self.n_swa) :] if self.memory is MemoryKind.SWA else True

    def seq_state_size(self, seq_id: int) -> int:
        return len(STATE_MAGIC) + 4 * (1 + len(self._kv[seq_id]))

    def seq_state(self, seq_id: int) -> bytes:
        kv = self._kv[seq_id]
        return STATE_MAGIC + struct.pack(f"<I{len(kv)}I", len(kv), *kv)

    def _forget_outside_window(self, kv: list[int]) -> None:
        for i in range(max(0, len(kv) - self.n_swa) - 1, -1, -1):  # newest first: stop at the forgotten
            if kv[i] == UNKNOWN:
                break
            kv[i] = UNKNOWN

    def seq_restore(self, seq_id: int, state: bytes | bytearray | ctypes.Array[ctypes.c_uint8]) -> None:
        state = bytes(state)
        if not state.startswith(STATE_MAGIC):
            raise BackendError("bad_state", "not a stub KV state")
        (n,) = struct.unpack_from("<I", state, len(STATE_MAGIC))
        self._kv[seq_id] = list(struct.unpack_from(f"<{n}I", state, len(STATE_MAGIC) + 4))

    def state_layout(self) -> dict[str, Any]:
        return {"backend": "stub", "state": STATE_MAGIC.hex(), "memory": self.memory.value}

    def info(self) -> dict[str, Any]:
        return {
            "backend": "stub",
            "n_vocab": self.n_vocab,
            "description": "deterministic stub",
            "memory": self.memory.value,
            "n_swa": self.n_swa,
        }

    def close(self) -> None:
        self._kv = []
