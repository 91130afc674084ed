"""The worker's heartbeat thread: liveness and progress for the broker, broker liveness for us.

The scheduler thread spends whole seconds inside ``llama_decode`` (ctypes releases the GIL
there), so heartbeats come from this thread, on a socket of its own. Each carries the decode
counter: a worker whose heartbeats keep coming while its counter stands still is stuck in
native code, which the broker can tell apart from one that died.

The broker answers with its instance id. A new id means the broker was restarted; a worker
started by an operator then registers again (a spawned worker dies with its broker instead).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import zmq

from erllama import protocol
from erllama.curve import curve_client
from erllama.protocol import BROKER_SILENCE_TIMEOUT_S, HEARTBEAT_INTERVAL_S, Phase, WireError, encode
from erllama.protocol import Heartbeat as HeartbeatMsg
from erllama.transport import make_socket

log = logging.getLogger(__name__)


def heartbeat_message(model_id: str, s: WorkerStatus) -> bytes:
    """One status snapshot as a heartbeat: the thread's periodic one and the worker loop's on a
    phase change carry the same fields, so the broker's counters always come from one snapshot."""
    msg = HeartbeatMsg(
        model=model_id,
        pid=os.getpid(),
        progress=s.progress,
        phase=s.phase,
        busy=bool(s.running or s.waiting),
        running=s.running,
        waiting=s.waiting,
        tokens_generated=s.tokens_generated,
        tokens_prefilled=s.tokens_prefilled,
        cache=s.cache,
    )
    return encode(msg)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A snapshot the scheduler thread publishes after each tick; read whole by this thread."""

    progress: int = 0
    phase: Phase = Phase.IDLE
    running: int = 0
    waiting: int = 0
    tokens_generated: int = 0
    tokens_prefilled: int = 0
    cache: dict[str, int] | None = None  # the worker's cache counters (lookups, hits, saves, ...)


class Heartbeat(threading.Thread):
    def __init__(self, ctx: zmq.Context, endpoint: str, model_id: str, curve: tuple[str, str] | None = None):
        super().__init__(name="erllama-heartbeat", daemon=True)
        self.model_id = model_id
        self.status = WorkerStatus()
        self.broker_instance: str | None = None
        self.broker_restarted = threading.Event()  # the scheduler thread re-registers when set
        self.last_broker_s = time.monotonic()
        self._halt = threading.Event()
        self._decoder = protocol.broker_heartbeat_decoder()
        identity = f"h:{model_id}:{os.getpid()}".encode()
        self._sock = make_socket(ctx, zmq.DEALER, protocol.MAX_CACHE_CONTROL_BYTES, identity=identity)
        if curve is not None:
            curve_client(self._sock, *curve)
        self._sock.connect(endpoint)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    @property
    def broker_silent_s(self) -> float:
        return time.monotonic() - self.last_broker_s

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self._send()
                deadline = time.monotonic() + HEARTBEAT_INTERVAL_S
                while (left := deadline - time.monotonic()) > 0 and not self._halt.is_set():
                    if self._sock.poll(int(left * 1000) + 1):
                        self._receive()
        finally:
            self._sock.close(linger=0)

    def _send(self) -> None:
        msg = heartbeat_message(self.model_id, self.status)
        try:
            self._sock.send(msg, zmq.NOBLOCK)
        except zmq.Again:
            pass  # no broker connected right now; the next beat tries again
        if self.broker_silent_s > BROKER_SILENCE_TIMEOUT_S and self.broker_instance is not None:
            log.warning("no word from the broker for %.0f s", self.broker_silent_s)

    def _receive(self) -> None:
        try:
            msg = self._decoder.decode(self._sock.recv(zmq.NOBLOCK))
        except (zmq.Again, WireError):
            return
        self.last_broker_s = time.monotonic()
        if self.broker_instance is not None and msg.instance != self.broker_instance:
            log.warning("the broker restarted (instance %s); registering again", msg.instance)
            self.broker_restarted.set()
        self.broker_instance = msg.instance
