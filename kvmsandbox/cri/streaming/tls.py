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
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0
CHUNK = 64 * 1024
# Bytes held in the bridge in each direction before it stops reading that side.
HELD = 1 << 20
POLL_MS = 5_000
# A bridge with bytes to move that moves none for this long ends (a client that never reads).
STALL_SECONDS = 300.0


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
    """Long because it is one loop with both directions and both ends' states in view."""
    to_inner = bytearray()  # cleartext from the client, for the session
    to_tls = bytearray()  # cleartext from the session, for the client
    tls_open = inner_open = True  # still reading from that side
    moved_at = time.monotonic()
    poller = select.poll()
    with tls, inner:
        try:
            while (tls_open or to_inner) and (inner_open or to_tls):
                moved = 0
                if tls_open and len(to_inner) < HELD:
                    tls_open, n = _move(tls.recv, to_inner)
                    moved += n
                if inner_open and len(to_tls) < HELD:
                    inner_open, n = _move(inner.recv, to_tls)
                    moved += n
                moved += _flush(inner.send, to_inner) + _flush(tls.send, to_tls)
                now = time.monotonic()
                if moved or not (to_inner or to_tls):
                    moved_at = now  # an idle session is not a stalled one (its idle timeout is the session's)
                elif now - moved_at > STALL_SECONDS:
                    log.info("streaming tls connection ended: nothing moved for %.0f s", STALL_SECONDS)
                    break
                if tls_open and tls.pending() and len(to_inner) < HELD:
                    continue  # decrypted bytes wait inside OpenSSL: no poll would report them
                reading_tls = tls_open and len(to_inner) < HELD
                tls_mask = (select.POLLIN if reading_tls else 0) | (select.POLLRDHUP if tls_open else 0)
                poller.register(tls, tls_mask | (select.POLLOUT if to_tls else 0))
                if inner_open or to_inner:
                    reading_inner = inner_open and len(to_tls) < HELD
                    inner_mask = (select.POLLIN if reading_inner else 0) | (select.POLLOUT if to_inner else 0)
                    poller.register(inner, inner_mask)
                for fd, events in poller.poll(POLL_MS):
                    if fd == tls.fileno():
                        if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                            raise ConnectionResetError("the client is gone")
                        if events & select.POLLRDHUP and not reading_tls:
                            # The client finished while the session was not taking its bytes: the
                            # session is told at once, as it would be on plain TCP.
                            tls_open = False
                            to_inner.clear()
                            inner.shutdown(socket.SHUT_WR)
                    elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                        # The session is done: take what it left, then only the client is served.
                        _drain(inner, to_tls)
                        inner_open = False
                        to_inner.clear()
                        poller.unregister(inner)
        except (OSError, ssl.SSLError) as e:
            log.info("streaming tls connection ended: %s", e)
        with contextlib.suppress(OSError, ssl.SSLError):
            inner.shutdown(socket.SHUT_RDWR)


def _move(recv: Callable[[int], bytes], into: bytearray) -> tuple[bool, int]:
    """Reads what is there: (whether that side is still open, bytes read)."""
    try:
        data = recv(CHUNK)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True, 0
    if not data:
        return False, 0
    into += data
    return True, len(data)


def _drain(inner: socket.socket, into: bytearray) -> None:
    """What a closed session wrote last (a socket pair holds a few hundred KiB at most)."""
    with contextlib.suppress(OSError):
        while data := inner.recv(CHUNK):
            into += data


def _flush(send: Callable[[bytes], int], buffer: bytearray) -> int:
    total = 0
    while buffer:
        try:
            sent = send(bytes(buffer[:CHUNK]))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            break
        del buffer[:sent]
        total += sent
    return total
