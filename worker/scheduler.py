"""The worker's scheduler: sequences, admission and the tick that calls ``decode`` once.

Each tick packs one batch: a decode row for every generating request first (so streams keep
flowing), then prefill chunks of requests still reading their prompt, as the prefill policy
(``worker/prefill.py``) hands out the rest of the tick's budget. After the single ``decode`` every row that reached the end of its
prompt, and every decode row, samples its next token right away (``_sample``). A sampled token
is decoded (committed to the KV cache) by the next tick, so the last token of a finished
request is never in the cache; ``context_tokens`` reports exactly what is.

At admission a request gets a sequence and as much of its prompt as is already known: its
sticky session's KV, else the longest usable cached prefix from the cache store, or, when a
running request's prompt starts the same way for longer, that request's KV once it has prefilled
the shared part (``worker/sharing.py``). ``worker/placement.py`` decides what of each is kept so
that it is exactly what a cold prefill makes. A whole prompt restored with its stored logits
samples its first token before anything is decoded. Saves copy KV (and the last token's logits)
out and hand them to the store's saver thread, so they never wait on the store.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Protocol

from erllama.logsetup import for_request
from erllama.options import SamplingParams, validate_prompt
from erllama.protocol import (
    CacheHitKind,
    CompletionResult,
    ErllamaError,
    ErrorCode,
    FinishReason,
    Phase,
    SaveReason,
)
from erllama.worker.backend import Backend, BackendError, BatchRow, Logits
from erllama.worker.kvcache import KVCache
from erllama.worker.kvrow import HEAD_BYTES, pack_head
from erllama.worker.markers import MarkerSpec, SpanAutomaton
from erllama.worker.output import TEXT, THINKING_END, TOOL_CALL_END, RequestOutput
from erllama.worker.placement import Placement
from erllama.worker.prefill import PrefillPolicy
from erllama.worker.request import ReqState, Request
from erllama.worker.sessions import SequencePool, Session
from erllama.worker.sharing import SHARE_MIN_TOKENS, common_prefix_len, find_donor
from erllama.worker.textstream import TextStream

log = logging.getLogger(__name__)


class Emitter(Protocol):
    """Where the scheduler sends what happens to a request (the worker's socket loop)."""

    def admitted(self, rid: int, cache_hit_kind: CacheHitKind, prefix_len: int) -> None: ...
    def token(self, rid: int, text: str, token_ids: list[int], kind: str = TEXT) -> None: ...
    def span_end(self, rid: int, kind: str, data: str, signature: bytes) -> None: ...
    def done(self, rid: int, result: CompletionResult) -> None: ...
    def error(self, rid: int, err: ErllamaError) -> None: ...
    def flush(self) -> None: ...  # send the tokens held so far (they are sent as one message per flush)


class Scheduler:
    """Owns the backend's sequences. Not thread-safe: the worker loop calls it from one thread."""

    def __init__(
        self,
        backend: Backend[Any],
        emit: Emitter,
        prefill: PrefillPolicy,
        cache: KVCache | None = None,
        markers: MarkerSpec | None = None,
        signing_key: bytes = b"",
        share_prefix: bool = True,
    ):
        self.backend = backend
        self.emit = emit
        self.cache = cache
        self.markers = markers
        self.signing_key = signing_key
        self.prefill = prefill
        self.share_prefix = share_prefix
        self.placement = Placement(backend, cache)
        self.pool = SequencePool(backend.n_seq_max, backend.seq_clear, self._save_idle_session)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # rid -> request, in admission order
        self.progress = 0  # decodes done; heartbeats carry it so a stuck decode shows
        self.tokens_generated = 0
        self.tokens_prefilled = 0  # prompt tokens decoded: what a long prefill's progress shows
        self.adapter_epoch = 0  # bumped when the LoRA set changes

    # --- requests in -------------------------------------------------------------------------------------

    def submit(
        self, rid: int, prompt: str | list[int], params: SamplingParams, queue_ms: float = 0.0
    ) -> None:
        """Accept a request or raise ``invalid_params`` / ``context_overflow`` / ``invalid_grammar``
        / ``sticky_busy`` before anything is decoded."""
        if rid in self.running or any(r.rid == rid for r in self.waiting):
            # Events are addressed by rid: a second request under a live one's id would mix both streams.
            raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"request id {rid} is already in use in this worker")
        prompt = validate_prompt(prompt, self.backend.n_vocab)
        tokens = self.backend.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        verify_from = -1
        if params.verify is not None:
            validate_prompt(list(params.verify), self.backend.n_vocab)
            verify_from = len(tokens) - 1
            tokens += params.verify
        limit = self.backend.n_ctx_seq
        if len(tokens) >= limit:
            raise ErllamaError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"prompt of {len(tokens)} tokens does not fit the context of {limit} (one cell is needed to generate)",
                {"prompt_tokens": len(tokens), "n_ctx": limit},
            )
        if params.max_tokens > limit:
            raise ErllamaError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"max_tokens {params.max_tokens} exceeds the context of {limit}",
                {"max_tokens": params.max_tokens, "n_ctx": limit},
            )
        try:
            sampler = self.backend.new_sampler(params, tokens)  # a grammar is parsed here
        except BackendError as exc:
            raise ErllamaError(ErrorCode.INVALID_GRAMMAR, exc.message) from None
        if params.session_id is not None:
            try:
                self.pool.claim(params.session_id, rid)
            except ErllamaError:
                self.backend.free_sampler(sampler)
                raise
        req = Request(rid=rid, prompt=tokens, params=params, received_s=time.monotonic(), queue_ms=queue_ms)
        req.sampler, req.verify_from = sampler, verify_from
        spans = None
        if self.markers is not None:
            spans = SpanAutomaton(
                self.markers,
                thinking=params.thinking,
                tool_calls=self.markers.has_tool_calls,
                thinking_budget_tokens=params.thinking_budget_tokens,
                signing_key=self.signing_key,
            )
        req.out = RequestOutput(TextStream(stops=params.stop), spans)
        self.waiting.append(req)

    def end_session(self, session_id: str) -> bool:
        """Release a session's pinned sequence (at once, or when its running request ends)."""
        return self.pool.end(session_id)

    def cancel_all(self) -> None:
        """End every request with ``cancelled`` now (the worker is shutting down)."""
        for req in list(self.waiting) + list(self.running.values()):
            req.cancelled = True
        self._finish_cancelled()

    def fail_all(self, err: ErllamaError) -> None:
        """End every request with ``err`` (after an internal error left their state unknown)."""
        for req in list(self.running.values()) + list(self.waiting):
            self._fail(req, err)
        self.waiting.clear()

    def cancel(self, rid: int) -> None:
        """Mark a request cancelled; it ends with ``cancelled`` at the start of the next tick."""
        req = self.running.get(rid)
        if req is not None:
            req.cancelled = True
            return
        for req in self.waiting:
            if req.rid == rid:
                req.cancelled = True

    # --- state for heartbeats ------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def phase(self) -> Phase:
        if any(r.state is ReqState.PREFILLING for r in self.running.values()):
            return Phase.PREFILLING
        return Phase.GENERATING if self.running else Phase.IDLE

    # --- the tick ------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Finish cancelled requests, admit waiting ones, then one decode for everything running."""
        self._finish_cancelled()
        while self.waiting and self._admit(self.waiting[0]):
            self.waiting.popleft()
        self._take_shares()
        for req in list(self.running.values()):
            if req.stored_logits is not None:  # a whole prompt restored: its first token needs no decode
                logits, req.stored_logits = req.stored_logits, None
                self._start_generating(req)
                self._sample(req, logits)
        rows, reqs = self._build_batch()
        if not rows:
            return
        self.emit.flush()  # tokens sampled from restored logits must not wait for this decode
        for req in self.running.values():  # the last decode's logits are about to be overwritten
            req.logits_index = -1
        try:
            indices = self.backend.decode(rows)
        except BackendError as exc:
            log.error("decode failed: %s", exc)
            for req in reqs:
                self._fail(req, ErllamaError(ErrorCode.INTERNAL, f"llama_decode failed: {exc.message}"))
            return
        self.progress += 1
        for row, req, idx in zip(rows, reqs, indices, strict=True):
            if req.state is ReqState.PREFILLING:
                self.tokens_prefilled += len(row.tokens)
            req.n_past += len(row.tokens)
            req.logits_index = idx
            if req.n_past == req.cold_save_at:
                self._save_request(req, SaveReason.COLD)
                req.cold_save_at = 0
            if req.state is ReqState.PREFILLING and req.n_past == len(req.prompt):
                self._start_generating(req)
            if req.is_verify:
                req.verify_argmax += [self.backend.argmax(i) for i in range(idx - row.n_logits + 1, idx + 1)]
                if req.state is ReqState.GENERATING:
                    self._finish(req, FinishReason.STOP)
            elif req.state is ReqState.GENERATING:
                self._sample(req, idx)

    def _start_generating(self, req: Request) -> None:
        req.state = ReqState.GENERATING
        req.prefill_done_s = time.monotonic()

    def _finish_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(
                req, FinishReason.CANCELLED
            )  # it never had a sequence: _release abandons its session
        for req in [r for r in self.running.values() if r.cancelled]:
            self._finish(req, FinishReason.CANCELLED)

    def _admit(self, req: Request) -> bool:
        """Give a request a sequence and decide how much of its prompt is already there. False if
        no sequence is free (it waits for the next tick)."""
        req.adapter_epoch = self.adapter_epoch
        session = self.pool.unpin(req.params.session_id) if req.params.session_id else None
        if session is not None:
            # Its sequence holds the session's tokens: kept when the prompt continues them; a prompt that
            # diverges inside them is looked up like any other, in the same sequence.
            req.seq_id = session.seq_id
            held = len(session.tokens)
            extends = common_prefix_len(req.prompt, session.tokens, held) == held
            placed = extends and self.placement.place(req, held, held, CacheHitKind.STICKY, session.logits)
            if not extends:
                self.backend.seq_clear(req.seq_id)
        else:
            seq = self.pool.take()
            if seq is None:
                return False
            req.seq_id, placed = seq, False
        if not placed:
            self.placement.restore_from_cache(req)
            donor = (
                find_donor(req, self.running.values(), self.adapter_epoch, self.placement.cuttable)
                if self.share_prefix
                else None
            )
            if donor is not None:
                req.donor_rid, req.share_len = donor[0].rid, donor[1]
        req.state = ReqState.PREFILLING
        self.running[req.rid] = req
        if req.donor_rid is None:
            self._start_prefill(req)
        return True

    def _start_prefill(self, req: Request) -> None:
        """Its prompt's known prefix is in place: plan the cold save and say what was found."""
        if self.cache is not None and not req.is_verify:
            req.cold_save_at = self.cache.policy.cold_save_at(len(req.prompt), req.n_past)
        self.emit.admitted(req.rid, req.cache_hit_kind, req.prefix_len)

    def _take_shares(self) -> None:
        """Before each batch, requests waiting for a donor copy its KV once it has prefilled the shared
        part (a donor that ends first hands over in ``_release``); they stop waiting if the adapter set
        changed."""
        for req in list(self.running.values()):
            if req.donor_rid is None:
                continue
            donor = self.running.get(req.donor_rid)
            if donor is None or donor.adapter_epoch != req.adapter_epoch:
                self._stop_waiting(req)
            elif donor.n_past >= req.share_len:
                self._take_share(req, donor)

    def _stop_waiting(self, req: Request) -> None:
        """No donor to copy from after all: prefill the prompt from what the request holds."""
        req.donor_rid = None
        self._start_prefill(req)

    @for_request
    def _take_share(self, req: Request, donor: Request) -> None:
        """Copy the donor's KV into ``req``'s sequence and keep the shared prompt prefix of it."""
        req.donor_rid = None
        self.backend.seq_clear(req.seq_id)
        try:
            self.backend.seq_restore(req.seq_id, self.backend.seq_state(donor.seq_id))
        except BackendError as exc:
            log.warning(
                "copying sequence %d to %d failed, prefilling on its own: %s", donor.seq_id, req.seq_id, exc
            )
            self.placement.place(req, 0, 0, CacheHitKind.COLD)
        else:
            self.placement.place(
                req, donor.n_past, req.share_len, CacheHitKind.SHARED, self._logits_of(donor)
            )
        req.cache_tier = None  # whatever a restore brought is replaced by the copy (or cleared)
        self._start_prefill(req)

    def _build_batch(self) -> tuple[list[BatchRow], list[Request]]:
        rows: list[BatchRow] = []
        reqs: list[Request] = []
        for req in self.running.values():
            if req.state is ReqState.GENERATING and req.pending_token is not None:
                rows.append(BatchRow(req.seq_id, [req.pending_token], req.n_past, n_logits=1))
                reqs.append(req)
                req.pending_token = None
        prefilling = [
            r for r in self.running.values() if r.state is ReqState.PREFILLING and r.donor_rid is None
        ]
        plan = self.prefill.plan(
            prefilling, self._prefill_room, self.backend.n_batch - len(rows), time.monotonic()
        )
        for req, take in plan:
            end = req.n_past + take
            rows.append(
                BatchRow(req.seq_id, req.prompt[req.n_past : end], req.n_past, req.logits_wanted(end))
            )
            reqs.append(req)
        return rows, reqs

    def _prefill_room(self, req: Request) -> int:
        """How many prompt tokens ``req`` may prefill before it must stop: a chunk ends where a save or a
        waiting request's copy needs this sequence to stand, so that what is saved or copied ends exactly
        there (a recurrent state cannot be cut later)."""
        stops = [r.share_len for r in self.running.values() if r.donor_rid == req.rid]
        return min([len(req.prompt)] + [p for p in (req.cold_save_at, *stops) if p > req.n_past]) - req.n_past

    def _sample(self, req: Request, logits: Logits) -> None:
        """Sample the request's next token from this tick's logits (or its row's stored ones) and stream it."""
        if req.params.max_tokens == 0:
            self._finish(req, FinishReason.LENGTH)
            return
        assert req.sampler is not None
        tok = self.backend.sample(req.sampler, logits, greedy=req.out.greedy_next)
        if not req.first_token_s:
            req.first_token_s = time.monotonic()
        if self.backend.is_eog(tok):
            self._finish(req, FinishReason.STOP)
            return
        req.generated.append(tok)
        self.tokens_generated += 1
        self._stream(req, req.out.feed(tok, self.backend.token_bytes(tok)))
        if req.out.matched_stop is not None:
            self._finish(req, FinishReason.STOP)
        elif len(req.generated) >= req.params.max_tokens or req.n_past + 1 > self.backend.n_ctx_seq:
            self._finish(req, FinishReason.LENGTH)
        else:
            req.pending_token = tok
            if (
                self.cache is not None
                and req.n_past - req.last_save_at >= self.cache.policy.continued_interval_tokens
            ):
                self._save_request(req, SaveReason.CONTINUED)

    def _stream(self, req: Request, events: list[Any]) -> None:
        for ev in events:
            if ev.kind in (THINKING_END, TOOL_CALL_END):
                self.emit.span_end(req.rid, ev.kind, ev.text, ev.signature)
            elif ev.text or ev.token_ids:
                self.emit.token(req.rid, ev.text, ev.token_ids, ev.kind)

    # --- the cache -----------------------------------------------------------------------------------------

    def _logits_of(self, req: Request) -> bytes | None:
        """The logits of ``req``'s last committed token, if the last decode computed them."""
        return self.backend.logits_blob(req.logits_index) if req.logits_index >= 0 else None

    def _save(self, seq_id: int, tokens: list[int], reason: SaveReason, logits: bytes | None) -> str | None:
        """Copy a sequence's KV out and queue it, with ``logits``, for the store; the key (hex), or None
        if dropped. The size is checked before anything is copied."""
        if self.cache is None or len(tokens) < self.cache.policy.min_tokens:
            return None
        logits = logits or b""
        self.emit.flush()  # tokens sampled so far must not wait for the state copy
        if not self.cache.accepting(HEAD_BYTES + self.backend.seq_state_size(seq_id) + len(logits)):
            self.cache.counters.saves_dropped += 1
            return None
        state = self.backend.seq_state(seq_id)
        return self.cache.save(tokens, (pack_head(len(state), len(logits)), state, logits), reason)

    @for_request
    def _save_request(self, req: Request, reason: SaveReason) -> str | None:
        # A verify's candidates are guesses, and KV made partly under another adapter set has no
        # fingerprint that describes it: neither is ever saved.
        if req.is_verify or req.adapter_epoch != self.adapter_epoch:
            return None
        key = self._save(req.seq_id, req.committed, reason, self._logits_of(req))
        if key is not None:
            req.last_save_at = req.n_past
            req.cache_created = max(req.cache_created, req.n_past - req.prefix_len)
        return key

    def save_all(self, reason: SaveReason) -> int:
        """``evict`` and ``shutdown``: save every running request's context and every idle session."""
        saved = 0
        for req in self.running.values():
            saved += self._save_request(req, reason) is not None
        for session in self.pool.pinned.values():
            saved += self._save(session.seq_id, session.tokens, reason, session.logits) is not None
        return saved

    def _save_idle_session(self, session: Session) -> None:
        """An idle session loses its sequence to a new request; its KV goes to the cache first."""
        self._save(session.seq_id, session.tokens, SaveReason.EVICT, session.logits)

    def adapters_changed(self) -> None:
        """The LoRA set changed: idle sessions' KV no longer matches it, and running requests stop saving."""
        self.adapter_epoch += 1
        for session_id in list(self.pool.pinned):
            self.pool.end(session_id)

    # --- requests out --------------------------------------------------------------------------------------

    def _release(self, req: Request, kv_valid: bool = True) -> None:
        """Free what a request held. A session keeps its sequence, holding the committed tokens.
        Requests waiting for it as a donor take what it prefilled first, or stop waiting."""
        self.running.pop(req.rid, None)
        for waiter in [r for r in self.running.values() if r.donor_rid == req.rid]:
            if kv_valid and req.seq_id >= 0 and req.n_past - waiter.n_past >= SHARE_MIN_TOKENS:
                waiter.share_len = min(waiter.share_len, req.n_past)  # all it has if it stopped early
                self._take_share(waiter, req)
            else:
                self._stop_waiting(waiter)
        if req.sampler is not None:
            self.backend.free_sampler(req.sampler)
            req.sampler = None
        sid = req.params.session_id
        if req.seq_id < 0:
            if sid is not None:
                self.pool.abandon(sid)
            return
        kv_valid = kv_valid and not req.is_verify and req.adapter_epoch == self.adapter_epoch
        if (
            sid is None
            or not kv_valid
            or not self.pool.finish(sid, req.seq_id, req.committed, self._logits_of(req))
        ):
            if sid is not None and not kv_valid:
                self.pool.abandon(sid)
            self.pool.give_back(req.seq_id)
        req.seq_id = -1

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self._stream(req, req.out.finish())
        if req.seq_id >= 0:
            req.finish_key = self._save_request(req, SaveReason.FINISH)
        verify = (
            req.verify_outcome(self.backend.is_eog)
            if req.is_verify and reason is not FinishReason.CANCELLED
            else None
        )
        result = req.result(reason, verify)
        self._release(req)
        self.emit.done(req.rid, result)

    def _fail(self, req: Request, err: ErllamaError) -> None:
        self._release(req, kv_valid=False)
        self.emit.error(req.rid, err)
