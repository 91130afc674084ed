"""A host's link to the broker: one DEALER over tcp with CURVE, and a monitor of its handshakes, so that a
broker that refuses us (our key is not in its allowlist, or we speak no CURVE and it does) is reported as
``host_refused`` at once instead of as endless silence.
"""

from __future__ import annotations

import logging
import os
from typing import Final

import zmq
from zmq.utils.monitor import parse_monitor_message

from erllama import protocol
from erllama.curve import curve_client
from erllama.protocol import ErllamaError, ErrorCode, HostCommand, Message, WireError, encode
from erllama.transport import make_socket

log = logging.getLogger(__name__)

HANDSHAKE_FAILURES: Final = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the broker refused our CURVE key (not in its host allowlist)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed (CURVE on one side only, or a wrong server key)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed",
}


class BrokerLink:
    def __init__(self, ctx: zmq.Context, name: str, endpoint: str, curve: tuple[str, str] | None):
        if not endpoint.startswith("tcp://"):
            raise ErllamaError(
                ErrorCode.INVALID_PARAMS, f"--broker must be tcp://ADDRESS:PORT, not {endpoint}"
            )
        self.endpoint = endpoint
        identity = f"host:{name}:{os.getpid()}".encode()
        self.sock = make_socket(ctx, zmq.DEALER, protocol.MAX_CACHE_CONTROL_BYTES, identity=identity)
        if curve is not None:
            curve_client(self.sock, *curve)
        else:
            log.warning("joining %s without CURVE: a broker that takes hosts will refuse us", endpoint)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self.sock.connect(endpoint)
        self._decoder = protocol.host_command_decoder()

    def send(self, msg: Message) -> None:
        try:
            self.sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("the broker is not reachable; %s dropped", type(msg).__name__)

    def receive(self) -> list[HostCommand]:
        out: list[HostCommand] = []
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                out.append(self._decoder.decode(frame))
            except WireError as err:
                log.warning("bad message from the broker: %s", err.message)

    def refusal(self) -> ErllamaError | None:
        """A failed handshake since the last call, as ``host_refused``."""
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return None
            reason = HANDSHAKE_FAILURES.get(zmq.Event(event["event"]))
            if reason is not None:
                return ErllamaError(ErrorCode.HOST_REFUSED, reason, {"broker": self.endpoint})

    def close(self, linger_ms: int = 0) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)
