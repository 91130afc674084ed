"""The client's connection to the broker: one DEALER socket owned by one background thread.

ZeroMQ sockets must not be shared between threads, and a client may run several streams at
once from several threads. So one I/O thread owns the socket: callers hand it outgoing
frames through a queue (waking it with an eventfd), and it routes every incoming message by
request id to the queue of whoever is waiting for it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

import zmq
import zmq.auth

from erllama import protocol
from erllama.client.wire import ReplyDecoder, connection_lost, reply_result
from erllama.protocol import ClientRequest, ErllamaError, ErrorCode, ErrorReply, RequestEvent, encode
from erllama.transport import make_socket

# What a waiting caller receives: a typed event from the broker and when it arrived (CLOCK_MONOTONIC ns).
Arrival = tuple[RequestEvent, int]

log = logging.getLogger(__name__)


class Connection:
    """A thread-safe request/stream multiplexer over one broker connection."""

    def __init__(self, endpoint: str, curve: tuple[str, str] | None = None):
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self._sock = make_socket(self._ctx, zmq.DEALER, protocol.MAX_CLIENT_FRAME_BYTES)
        if curve is not None:  # (our key file with its secret, the broker's public key file)
            public, secret = zmq.auth.load_certificate(curve[0])
            server_public, _ = zmq.auth.load_certificate(curve[1])
            if secret is None:
                raise ErllamaError(ErrorCode.INVALID_PARAMS, f"{curve[0]} holds no secret key")
            self._sock.curve_publickey, self._sock.curve_secretkey = public, secret
            self._sock.curve_serverkey = server_public
        self._sock.connect(endpoint)
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # None stops the thread
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._routes: dict[str, queue.SimpleQueue[Arrival]] = {}
        self._decoder = ReplyDecoder()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._io_loop, name="erllama-client-io", daemon=True)
        self._thread.start()

    def open(self, request_id: str) -> queue.SimpleQueue[Arrival]:
        """Register ``request_id`` and return the queue its replies will arrive on."""
        q: queue.SimpleQueue[Arrival] = queue.SimpleQueue()
        with self._lock:
            self._routes[request_id] = q
        return q

    def close_route(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)

    def send(self, payload: bytes) -> None:
        if self._closed:
            raise ErllamaError(ErrorCode.PROTOCOL_ERROR, "the client is closed")
        self._outbox.put(payload)
        os.eventfd_write(self._wake, 1)

    def call(self, request: ClientRequest, timeout_s: float | None) -> Any:
        """Send one request and wait for its ``ok`` (returning ``result``) or ``err`` (raising)."""
        q = self.open(request.id)
        try:
            self.send(encode(request))
            event, _ = self.wait(q, timeout_s, f"{type(request).__name__} got no reply")
        finally:
            self.close_route(request.id)
        return reply_result(event)

    @staticmethod
    def wait(q: queue.SimpleQueue[Arrival], timeout_s: float | None, what: str) -> Arrival:
        """Next event from ``q``, or ``timeout``."""
        try:
            return q.get(timeout=timeout_s)
        except queue.Empty:
            raise ErllamaError(ErrorCode.TIMEOUT, f"{what} within {timeout_s} s") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._outbox.put(None)
        os.eventfd_write(self._wake, 1)
        self._thread.join(timeout=5)
        os.close(self._wake)
        # No reply can arrive any more: whoever waits on a stream or a call learns it now, not at its timeout.
        self._fail_all(ErrorCode.CLIENT_CLOSED, "the client was closed while the request was in flight")

    # --- the I/O thread ------------------------------------------------------------------------------------

    def _io_loop(self) -> None:
        # The monitor reports a dropped connection (the broker died or restarted): requests in
        # flight then can never complete, so they fail with broker_lost rather than time out.
        # ZeroMQ reconnects by itself; later requests go to the new broker.
        monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._wake in events:
                    os.eventfd_read(self._wake)
                    if not self._flush_outbox():
                        return
                if self._sock in events:
                    self._drain_socket()
                if monitor in events:
                    monitor.recv_multipart()
                    self._fail_all(ErrorCode.BROKER_LOST, f"the connection to {self.endpoint} dropped")
        finally:
            self._sock.disable_monitor()
            monitor.close(linger=0)
            self._sock.close(linger=0)
            self._ctx.term()

    def _fail_all(self, code: ErrorCode, message: str) -> None:
        with self._lock:
            queues = list(self._routes.values())
        lost = connection_lost(code, message)
        for q in queues:
            q.put((lost, time.monotonic_ns()))

    def _flush_outbox(self) -> bool:
        while True:
            try:
                payload = self._outbox.get_nowait()
            except queue.Empty:
                return True
            if payload is None:
                return False
            self._sock.send(payload)

    def _drain_socket(self) -> None:
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            received_ns = time.monotonic_ns()
            for event in self._decoder.decode(frame):
                with self._lock:
                    q = self._routes.get(event.id) if event.id is not None else None
                if q is not None:
                    q.put((event, received_ns))
                elif isinstance(event, ErrorReply):
                    log.warning("broker error not tied to a request: %s %s", event.code, event.message)
