"""A request's life in the broker: admission, dispatch to one of its model's replicas (chosen by
``Router``), the terminal event, and what happens to it when its worker dies (re-queued once if it had
produced nothing, else failed).

``Requests`` owns the request table. It reaches clients through the front end and workers through the
``send_worker`` callback the broker gives it, so it knows nothing of sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from erllama.broker.front import FrontEnd
from erllama.broker.queues import QueueTotals, Request
from erllama.broker.registry import ModelEntry, Replica
from erllama.broker.routing import ROUTING_RECHECK_S, Router
from erllama.options import parse_sampling, validate_prompt
from erllama.protocol import (
    CancelRun,
    CompletionResult,
    ErllamaError,
    ErrorCode,
    Infer,
    Message,
    ModelState,
    Run,
    StreamDone,
    error_reply_of,
)

log = logging.getLogger(__name__)

SendWorker = Callable[[Replica, Message], bool]


def host_down(entry: ModelEntry) -> ErllamaError:
    """The error for a model whose hosts are draining, dead or gone."""
    what = "draining" if entry.state is ModelState.DRAINING else "unavailable"
    hosts = [h for h in entry.hosts if h is not None]
    detail = {"model": entry.model_id, "host": hosts[0] if len(hosts) == 1 else hosts} | (
        {"last_error": entry.last_error} if entry.last_error else {}
    )
    where = f"its host {hosts[0]!r} is" if len(hosts) == 1 else f"its hosts {hosts} are"
    return ErllamaError(
        ErrorCode.HOST_DOWN, f"model {entry.model_id!r} is {what}: {where} down or draining", detail
    )


class Requests:
    """Every request from its admission to its terminal event; ``rid`` is the broker's id for it."""

    def __init__(
        self,
        models: dict[str, ModelEntry],
        front: FrontEnd,
        totals: QueueTotals,
        send_worker: SendWorker,
        rids: Iterator[int],
    ):
        self.models = models
        self.front = front
        self.totals = totals
        self.send_worker = send_worker
        self.rids = rids
        self.table: dict[int, Request] = {}
        self.router = Router(self.table)
        self.by_client: dict[tuple[bytes, str], int] = {}
        self.stopping = False
        self.rechecked_s = 0.0

    def get(self, rid: int) -> Request | None:
        return self.table.get(rid)

    def of(self, entry: ModelEntry, replica: Replica, rid: int) -> Request | None:
        """The request ``rid`` if it runs on this replica of this model: a worker can never speak for
        another worker's requests."""
        req = self.table.get(rid)
        if req is None or req.model_id != entry.model_id or req.replica != replica.index:
            return None
        return req

    # --- admission -----------------------------------------------------------------------------------------

    def admit(self, client: bytes, msg: Infer) -> None:
        """Validate an ``infer`` (parameters and prompt are checked here, once, and travel typed), queue
        it and dispatch what the worker has room for."""
        if self.stopping:
            raise ErllamaError(ErrorCode.SHUTTING_DOWN, "the broker is shutting down")
        entry = self.models.get(msg.model)
        if entry is None:
            raise ErllamaError(
                ErrorCode.MODEL_NOT_FOUND, f"no model {msg.model!r} is loaded", {"model": msg.model}
            )
        if entry.state is ModelState.FAILED:
            raise ErllamaError(
                ErrorCode.MODEL_FAILED, f"model {entry.model_id!r} has failed", entry.last_error
            )
        if entry.state is ModelState.UNLOADING:
            raise ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} is being unloaded")
        if entry.state in (ModelState.DRAINING, ModelState.UNAVAILABLE):
            raise host_down(entry)
        params = parse_sampling(msg.params)  # bad values are refused here, before they take a queue slot
        prompt = validate_prompt(msg.prompt)
        key = (client, msg.id)
        if key in self.by_client:
            raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"request id {msg.id!r} is already in flight")
        rid = next(self.rids)
        try:
            entry.queue.enqueue(rid)
        except ErllamaError:
            self.totals.rejected_overloaded += 1
            log.info("rid=%d refused: model %s is overloaded", rid, entry.model_id)
            raise
        self.table[rid] = Request(rid, client, msg.id, entry.model_id, prompt, params)
        self.by_client[key] = rid
        self.totals.accepted += 1
        self.totals.depth += 1
        log.info("rid=%d admitted: client request %s for %s", rid, msg.id, entry.model_id)
        self.dispatch(entry)

    def dispatch(self, entry: ModelEntry) -> None:
        """Send waiting requests to replicas with free sequences (their credit), each to the replica
        the router picks."""
        while (route := self.router.choose(entry)) is not None:
            rid, replica = route.rid, route.replica
            req = self.table[rid]
            queue_ms = (time.monotonic() - req.received_s) * 1000.0
            entry.queue.remove(rid)
            replica.running.add(rid)
            req.replica = replica.index
            if not self.send_worker(
                replica, Run(rid=rid, prompt=req.prompt, params=req.params, queue_ms=queue_ms)
            ):
                replica.running.discard(rid)
                req.replica = None
                entry.queue.enqueue(rid, front=True)
                return
            req.dispatched = True
            self.router.dispatched(entry, route)
            log.debug(
                "rid=%d dispatched to replica %d of %s after %.1f ms",
                rid,
                replica.index,
                entry.model_id,
                queue_ms,
            )

    def recheck(self, now: float) -> None:
        """Routing by cache may hold requests for a full replica while another has room; its estimates
        change with time (a request running past its expected end), so the held ones are routed again
        every ``ROUTING_RECHECK_S`` even when no event comes."""
        if now - self.rechecked_s < ROUTING_RECHECK_S:
            return
        self.rechecked_s = now
        for entry in self.models.values():
            if entry.queue.waiting:
                self.dispatch(entry)

    # --- cancelling and ending -----------------------------------------------------------------------------

    def cancel_for(self, client: bytes, client_id: str) -> bool:
        """Cancel a client's request by its own id; False if it is not in flight."""
        rid = self.by_client.get((client, client_id))
        if rid is not None:
            self.cancel(rid)
        return rid is not None

    def cancel(self, rid: int) -> None:
        req = self.table[rid]
        entry = self.models.get(req.model_id)
        log.info("rid=%d cancelled by its client", rid)
        if not req.dispatched:
            if entry is not None:
                entry.queue.remove(rid)
            # Never reached a worker: the broker ends it with an empty result of its own.
            self.finish(rid, StreamDone(id=req.client_id, result=CompletionResult()))
        elif entry is not None and req.replica is not None:
            self.send_worker(entry.replicas[req.replica], CancelRun(rid=rid))

    def finish(self, rid: int, event: Message, failed: bool = False) -> None:
        """Deliver a request's terminal event and forget it."""
        req = self.table.pop(rid)
        self.by_client.pop((req.client, req.client_id), None)
        self.totals.depth -= 1
        if failed:
            self.totals.failed += 1
        else:
            self.totals.completed += 1
            log.info("rid=%d finished", rid)
        self.front.send(req.client, event, req.client_id)
        entry = self.models.get(req.model_id)
        self.router.forget(rid)
        if entry is not None:
            entry.queue.remove(rid)
            if req.replica is not None:
                replica = entry.replicas[req.replica]
                replica.running.discard(rid)
                self.router.finished(
                    entry, replica, rid, event.result if isinstance(event, StreamDone) else None
                )
            self.dispatch(entry)

    def fail(self, rid: int, err: ErllamaError) -> None:
        req = self.table.get(rid)
        if req is not None:
            log.info("rid=%d failed: %s", rid, err)
            self.finish(rid, error_reply_of(err, req.client_id), failed=True)

    def fail_waiting(self, entry: ModelEntry, err: ErllamaError) -> None:
        for rid in list(entry.queue.waiting):
            self.fail(rid, err)

    def fail_all(self, entry: ModelEntry, err: ErllamaError) -> None:
        for replica in entry.replicas:
            self.fail_running(replica, err)
        self.fail_waiting(entry, err)

    def fail_running(self, replica: Replica, err: ErllamaError) -> None:
        for rid in list(replica.running):
            self.fail(rid, err)

    def worker_died(
        self, entry: ModelEntry, replica: Replica, err: ErllamaError, detail: dict[str, Any]
    ) -> None:
        """Settle the requests a dead worker was running: one that had produced no token may have been
        the victim rather than the cause, and is re-queued once; the others fail (``poison`` says a
        request was present at more than one death)."""
        self.router.replaced(entry, replica)
        for rid in sorted(replica.running, reverse=True):
            req = self.table[rid]
            req.crashes += 1
            replica.running.discard(rid)
            if req.tokens_sent == 0 and req.crashes == 1:
                req.dispatched = False
                req.replica = None
                entry.queue.enqueue(rid, front=True)
                log.info("rid=%d re-queued after its worker died", rid)
            else:
                self.fail(rid, ErllamaError(err.code, err.message, detail | {"poison": req.crashes > 1}))
