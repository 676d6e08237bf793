"""Optional TLS for the streaming server. An OpenSSL connection must not be read and written from
two threads at once, and a session reads on one thread while others write; so each TLS
connection gets one thread that alone drives the TLS object (non-blocking, both directions), and
the session gets the plain end of a socket pair.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0
CHUNK = 64 * 1024
# Bytes held in the bridge in each direction before it stops reading that side.
HELD = 1 << 20
IDLE_POLL_MS = 60_000


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Raises OSError or ssl.SSLError: the files cannot be read or do not match."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def bridge(context: ssl.SSLContext, raw: socket.socket) -> socket.socket:
    """Does the handshake on ``raw`` and returns a plain socket whose bytes are the connection's
    cleartext; a thread carries them both ways until either side ends.

    Raises:
        OSError, ssl.SSLError: the handshake failed or took longer than HANDSHAKE_SECONDS.
    """
    raw.settimeout(HANDSHAKE_SECONDS)
    tls = context.wrap_socket(raw, server_side=True)
    tls.setblocking(False)
    plain, inner = socket.socketpair()
    inner.setblocking(False)
    threading.Thread(target=_pump, args=(tls, inner), name="streaming-tls", daemon=True).start()
    return plain


def _pump(tls: ssl.SSLSocket, inner: socket.socket) -> None:
    to_inner = bytearray()  # cleartext from the client, for the session
    to_tls = bytearray()  # cleartext from the session, for the client
    tls_open = inner_open = True
    poller = select.poll()
    with tls, inner:
        try:
            while (tls_open or to_inner) and (inner_open or to_tls):
                if tls_open and len(to_inner) < HELD:
                    tls_open = _move(tls.recv, to_inner)
                if inner_open and len(to_tls) < HELD:
                    inner_open = _move(inner.recv, to_tls)
                _flush(inner.send, to_inner)
                _flush(tls.send, to_tls)
                if tls.pending() and len(to_inner) < HELD:
                    continue  # decrypted bytes wait inside OpenSSL: no poll would report them
                # Read only where there is room, write only what waits: a full side is not polled.
                poller.register(
                    tls, (select.POLLIN if tls_open and len(to_inner) < HELD else 0) | (select.POLLOUT if to_tls else 0)
                )
                poller.register(
                    inner,
                    (select.POLLIN if inner_open and len(to_tls) < HELD else 0) | (select.POLLOUT if to_inner else 0),
                )
                if not poller.poll(IDLE_POLL_MS):
                    continue
        except (OSError, ssl.SSLError) as e:
            log.info("streaming tls connection ended: %s", e)
        with contextlib.suppress(OSError, ssl.SSLError):
            inner.shutdown(socket.SHUT_RDWR)


def _move(recv: Callable[[int], bytes], into: bytearray) -> bool:
    """Reads what is there; False once that side has ended."""
    try:
        data = recv(CHUNK)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True
    if not data:
        return False
    into += data
    return True


def _flush(send: Callable[[bytes], int], buffer: bytearray) -> None:
    while buffer:
        try:
            sent = send(bytes(buffer[:CHUNK]))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        del buffer[:sent]
