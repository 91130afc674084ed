"""One request inside the worker: its state while it runs and the result it ends with."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from erllama.options import SamplingParams
from erllama.protocol import CacheHitKind, CompletionResult, FinishReason, Stats, VerifyOutcome
from erllama.worker.backend import Sampler
from erllama.worker.output import RequestOutput
from erllama.worker.textstream import TextStream


class ReqState(enum.Enum):
    WAITING = "waiting"  # accepted, no free sequence yet
    PREFILLING = "prefilling"
    GENERATING = "generating"


@dataclass(slots=True)
class Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    received_s: float
    queue_ms: float = 0.0
    state: ReqState = ReqState.WAITING
    seq_id: int = -1
    n_past: int = 0  # tokens of this request in its sequence's KV
    generated: list[int] = field(default_factory=list)
    pending_token: int | None = None  # sampled, to be decoded next tick
    stored_logits: bytes | None = None  # a whole prompt restored with its logits: sample from them first
    logits_index: int = -1  # this request's logits in the last decode (-1: none), valid until the next one
    sampler: Sampler | None = None
    out: RequestOutput = field(default_factory=lambda: RequestOutput(TextStream()))
    cancelled: bool = False
    # the cache
    cache_hit_kind: CacheHitKind = CacheHitKind.COLD
    prefix_len: int = 0  # prompt tokens whose KV came from the cache, the session or a donor
    cache_tier: str | None = None  # the tier a restored row came from (ram, shm, disk, shared)
    cache_lookup_ms: float = 0.0
    state_copy_ms: float = 0.0
    cold_save_at: int = 0  # prefill pauses here to save the prompt's aligned prefix (0: no cold save)
    last_save_at: int = 0  # n_past at the last save, for the continued-save interval
    cache_created: int = 0  # tokens this request added to the cache
    adapter_epoch: int = 0  # the adapter set its KV was computed under; no saves once it changes
    # a running request whose prompt starts like ours (worker/sharing.py): we wait, then copy its KV
    donor_rid: int | None = None
    share_len: int = 0  # prompt tokens to take from the donor once it has prefilled them
    finish_key: str | None = None
    # speculative verify: the prompt is prefix + candidates; argmax at every candidate position
    verify_from: int = -1  # first position whose logits are needed (len(prefix) - 1); -1: not a verify
    verify_argmax: list[int] = field(default_factory=list)
    # timing
    prefill_done_s: float = 0.0
    first_token_s: float = 0.0

    @property
    def committed(self) -> list[int]:
        """Exactly the tokens whose KV the sequence holds."""
        return (self.prompt + self.generated)[: self.n_past]

    @property
    def is_verify(self) -> bool:
        return self.verify_from >= 0

    def logits_wanted(self, end: int) -> int:
        """How many trailing tokens of a prefill chunk ending at ``end`` need logits: one (to sample
        from at the prompt's end, and to store with a row saved at the chunk's end), or for a verify
        every candidate position's."""
        if self.is_verify:
            return max(0, end - max(self.n_past, self.verify_from))
        return 1

    def verify_outcome(self, is_eog: Any) -> VerifyOutcome:
        """Candidates accepted while the model's own argmax agrees; then the model's next token."""
        candidates = self.prompt[self.verify_from + 1 :]
        accepted = 0
        while accepted < len(candidates) and self.verify_argmax[accepted] == candidates[accepted]:
            accepted += 1
        nxt = self.verify_argmax[accepted]
        eos = bool(is_eog(nxt))
        return VerifyOutcome(accepted=accepted, next_token=None if eos else nxt, eos=eos)

    def result(self, reason: FinishReason, verify: VerifyOutcome | None = None) -> CompletionResult:
        now = time.monotonic()
        first = self.first_token_s or now
        prefill_end = self.prefill_done_s or now
        committed = self.committed
        return CompletionResult(
            reply=self.out.text.text,
            generated=self.generated,
            context_tokens=committed,
            committed_tokens=len(committed),
            finish_reason=reason,
            stop_sequence=self.out.matched_stop,
            finish_key=self.finish_key,
            cache_hit_kind=self.cache_hit_kind,
            cache_delta={"read": self.prefix_len, "created": self.cache_created},
            cache_tier=self.cache_tier,
            thinking=self.out.thinking,
            tool_calls=self.out.tool_calls,
            stats=Stats(
                prompt_tokens=len(self.prompt),
                completion_tokens=len(self.generated),
                queue_ms=self.queue_ms,
                ttft_ms=self.queue_ms + (first - self.received_s) * 1000.0,
                prefill_ms=(prefill_end - self.received_s) * 1000.0,
                generation_ms=(now - prefill_end) * 1000.0,
                cache_lookup_ms=self.cache_lookup_ms,
                state_copy_ms=self.state_copy_ms,
            ),
            verify=verify,
        )
