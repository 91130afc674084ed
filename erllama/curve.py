"""CURVE for tcp links: the broker's server sockets with ZAP allowlists, and the client side of a link.

The broker keeps one ZAP authenticator for its context. Client sockets use ZAP's default domain with the
client allowlist (``--curve-clients``); the sockets hosts and their workers join through use the domain
``hosts`` with the host allowlist (``--curve-hosts``, by default the same directory), so a key allowed to
send requests is not thereby allowed to register workers unless the operator says so. A refused host key
is logged with the key, which is how an operator finds out that a machine was left out of the allowlist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from erllama.protocol import ErllamaError, ErrorCode

log = logging.getLogger(__name__)

HOSTS_ZAP_DOMAIN: Final = "hosts"


def load_secret(key_file: Path | str) -> tuple[bytes, bytes]:
    """A key pair from a file written by ``erllama keys``; the file must hold the secret key."""
    public, secret = zmq.auth.load_certificate(str(key_file))
    if secret is None:
        raise ErllamaError(ErrorCode.INVALID_PARAMS, f"{key_file} holds no secret key")
    return public, secret


def curve_client(sock: zmq.Socket, key_file: Path | str, server_key_file: Path | str) -> None:
    """Make ``sock`` (before it connects) authenticate with ``key_file`` to the server ``server_key_file``."""
    public, secret = load_secret(key_file)
    server_public, _ = zmq.auth.load_certificate(str(server_key_file))
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = server_public


class AllowList:
    """A ZAP callback: the allowlist directory of public key files, read at each handshake (a key added
    while the broker runs is allowed at the next attempt), and a log line for each refusal."""

    def __init__(self, directory: Path, who: str):
        self.directory = directory
        self.who = who
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = {zmq.auth.load_certificate(str(p))[0] for p in self.directory.glob("*.key")}
        if key in allowed:
            return True
        self.refused += 1
        shown = key.decode(errors="replace")
        log.warning("refused a %s: its CURVE key %s is not in %s", self.who, shown, self.directory)
        return False


class CurveServer:
    """The broker's authenticator and its CURVE server sockets."""

    def __init__(self, ctx: zmq.Context, server_key_file: Path, clients_dir: Path, hosts_dir: Path):
        self.ctx = ctx
        self.public, self.secret = load_secret(server_key_file)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        # One mechanism per authenticator: with any callback configured, pyzmq consults callbacks only.
        self.clients = AllowList(clients_dir, "client")
        self.hosts = AllowList(hosts_dir, "host")
        self.auth.configure_curve_callback(domain="*", credentials_provider=self.clients)
        self.auth.configure_curve_callback(domain=HOSTS_ZAP_DOMAIN, credentials_provider=self.hosts)

    def secure(self, sock: zmq.Socket, domain: str | None = None) -> zmq.Socket:
        """Make ``sock`` (before it binds) a CURVE server; ``domain`` picks the allowlist."""
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.public, self.secret
        if domain is not None:
            sock.zap_domain = domain.encode()
        return sock

    def stop(self) -> None:
        self.auth.stop()
