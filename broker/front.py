"""The broker's front end: the client sockets (ipc and plain tcp on one ROUTER, CURVE tcp on another),
decoding client requests into typed messages, and every send back to a client.

A client's key is its socket's index byte followed by its routing id on that socket. Sends never block:
a client that stopped reading loses the message (and the caller learns it, to cancel what it asked).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

import zmq

from erllama import protocol
from erllama.broker.config import BrokerConfig
from erllama.broker.queues import QueueTotals
from erllama.broker.registry import Waiter
from erllama.curve import CurveServer
from erllama.protocol import (
    ClientRequest,
    ErllamaError,
    ErrorCode,
    Message,
    Reply,
    WireError,
    encode,
    error_reply_of,
    frame_or_error,
)
from erllama.transport import make_socket

log = logging.getLogger(__name__)

ClientHandler = Callable[[bytes, Any], None]  # (client key, the typed request)


class FrontEnd:
    """Owns the client sockets. ``handlers`` maps each client request type to its handler."""

    def __init__(self, ctx: zmq.Context, cfg: BrokerConfig, totals: QueueTotals, curve: CurveServer | None):
        self.ctx = ctx
        self.cfg = cfg
        self.totals = totals
        self.curve = curve
        self.sockets: list[zmq.Socket] = []
        self.handlers: dict[type[ClientRequest], ClientHandler] = {}
        self._decoder = protocol.client_request_decoder()

    def bind(self) -> None:
        plain = make_socket(self.ctx, zmq.ROUTER, protocol.MAX_CLIENT_FRAME_BYTES)
        plain.bind(self.cfg.endpoint)
        log.info("clients: %s", self.cfg.endpoint)
        self.sockets.append(plain)
        if self.cfg.tcp:
            if self.curve is not None:
                # A ROUTER that speaks CURVE, with a ZAP allowlist: only clients whose public key is in
                # the configured directory get in (the server key alone would let anyone who has it in).
                sock = self.curve.secure(make_socket(self.ctx, zmq.ROUTER, protocol.MAX_CLIENT_FRAME_BYTES))
                sock.bind(self.cfg.tcp)
                self.sockets.append(sock)
            else:
                plain.bind(self.cfg.tcp)
            log.info("clients: %s%s", self.cfg.tcp, " (CURVE)" if self.curve else "")

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=500)

    # --- receiving -----------------------------------------------------------------------------------------

    def on_frames(self, index: int, frames: list[bytes]) -> None:
        """One message from the client socket ``index``: decoded, then handed to its handler. Every
        failure is answered with a typed error addressed to the request's id when it had a usable one."""
        client = bytes([index]) + frames[0]
        client_id: str | None = None
        try:
            if len(frames) != 2:
                raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"expected one frame, got {len(frames) - 1}")
            try:
                msg = self._decoder.decode(frames[1])
            except WireError as err:
                client_id = err.field("id", str)
                raise
            client_id = msg.id
            self.handlers[type(msg)](client, msg)
        except ErllamaError as err:
            if err.code == ErrorCode.PROTOCOL_ERROR:
                self.totals.bad_messages += 1
                log.info("bad client message: %s", err.message)
            self.reply_error(client, client_id, err)
        except Exception:  # a bug of ours must cost one request, never the broker
            log.exception("handling a client message failed")
            self.reply_error(
                client, client_id, ErllamaError(ErrorCode.INTERNAL, "internal error in the broker")
            )

    # --- sending -------------------------------------------------------------------------------------------

    def send(self, client: bytes, msg: Message, client_id: str | None) -> bool:
        """Send without blocking; False when the client is gone or not reading."""
        payload = frame_or_error(
            encode(msg), protocol.MAX_CLIENT_FRAME_BYTES, lambda e: error_reply_of(e, client_id)
        )
        try:
            self.sockets[client[0]].send_multipart([client[1:], payload], zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("client %s is not reading; dropping its message", client.hex())
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
        return False

    def reply(self, client: bytes, client_id: str, result: Any) -> None:
        self.send(client, Reply(id=client_id, result=result), client_id)

    def reply_error(self, client: bytes, client_id: str | None, err: ErllamaError) -> None:
        self.send(client, error_reply_of(err, client_id), client_id)

    def answer(self, waiter: Waiter, result: Any) -> None:
        """The late answer to a client that waits (a load, an unload, a call to a worker)."""
        self.reply(waiter.client, waiter.client_id, result)

    def refuse(self, waiter: Waiter, err: ErllamaError) -> None:
        self.reply_error(waiter.client, waiter.client_id, err)
