"""The streaming server: a plain-HTTP listener (as containerd's default) for the URLs Exec, Attach
and PortForward return. One thread per connection, at most ``max_sessions`` at once (more get a
503), none of them the gRPC server's.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from kvmsandbox.cri.streaming import tls, upgrade
from kvmsandbox.cri.streaming.upgrade import BadRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_SESSIONS = 256
MAX_HEADS = 64
"""Connections still sending their request head (no token shown yet): bounded apart, so slow or
idle connections cannot take the sessions' slots."""
IDLE_TIMEOUT = 4 * 3600.0
"""A session that receives nothing for this long ends (containerd's stream idle timeout)."""
SEND_TIMEOUT = 300.0
"""A client that takes nothing of what is sent to it for this long is dropped."""


class StreamingServer(Generic[T]):
    """``resolve(kind, token)`` gives what the token stands for (once) or None; ``serve(kind,
    what, upgraded)`` serves an upgraded connection and returns when it is over;
    ``protocols[transport][kind]`` are the subprotocols served for each kind on each transport
    ("spdy", "websocket"), preferred first."""

    def __init__(
        self,
        address: str,
        port: int,
        resolve: Callable[[str, str], T | None],
        serve: Callable[[str, T, upgrade.Upgraded], None],
        protocols: dict[str, dict[str, tuple[str, ...]]],
        max_sessions: int = MAX_SESSIONS,
        max_heads: int = MAX_HEADS,
        tls: ssl.SSLContext | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._resolve, self._serve, self._protocols = resolve, serve, protocols
        self._tls, self._idle_timeout = tls, idle_timeout
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._heads = threading.BoundedSemaphore(max_heads)
        self._listener = socket.create_server((address, port), family=_family(address), backlog=64)
        host, bound = self._listener.getsockname()[:2]
        self.address, self.port = host, bound
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="streaming-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("streaming server listening address=%s port=%d", self.address, self.port)

    def url(self, kind: str, token: str) -> str:
        """The fully qualified URL a client (kubelet, crictl) redeems ``token`` at."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}/{kind}/{token}"

    def stop(self) -> None:
        """Stops accepting; sessions under way end with their connections. Raises nothing."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                # Out of fds or a connection that failed while queued: the server carries on.
                log.warning("streaming server cannot accept a connection: %s", e)
                time.sleep(0.1)
                continue
            if not self._heads.acquire(blocking=False):
                upgrade.answer_error(sock, BadRequest(503, "too many streaming connections; try again"))
                sock.close()
                continue
            try:
                threading.Thread(target=self._connection, args=(sock,), name="streaming-session", daemon=True).start()
            except RuntimeError as e:
                log.warning("streaming server cannot start a thread: %s", e)
                self._heads.release()
                sock.close()

    def _connection(self, sock: socket.socket) -> None:
        slot = False
        try:
            try:
                if self._tls is not None:
                    raw = sock
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    try:
                        sock = tls.bridge(self._tls, raw)
                    except (OSError, ssl.SSLError) as e:
                        log.info("streaming tls handshake failed: %s", e)
                        return  # nothing to answer in: the connection is closed
                request = upgrade.read_request(sock)
            finally:
                self._heads.release()
            slot = self._slots.acquire(blocking=False)
            if not slot:
                raise BadRequest(503, "too many streaming sessions; try again")
            what = self._resolve(request.kind, request.token)
            if what is None:
                raise BadRequest(404, f"no {request.kind} request for this token (unknown, used or expired)")
            if upgrade.is_spdy_upgrade(request):
                transport = "spdy"
                protocol = upgrade.negotiate(request, self._protocols["spdy"].get(request.kind, ()))
                _bound_waits(sock, self._idle_timeout)
                upgrade.answer_spdy_upgrade(sock, protocol)
            elif upgrade.is_websocket_upgrade(request):
                transport = "websocket"
                supported = self._protocols["websocket"].get(request.kind, ())
                protocol = upgrade.negotiate(request, supported, "sec-websocket-protocol")
                _bound_waits(sock, self._idle_timeout)
                upgrade.answer_websocket_upgrade(sock, request, protocol)
            else:
                raise BadRequest(
                    400, "this endpoint serves SPDY/3.1 and WebSocket upgrades (Connection: Upgrade, Upgrade: ...)"
                )
            self._serve(request.kind, what, upgrade.Upgraded(transport, protocol, sock, request.rest, request.query))
        except BadRequest as e:
            log.info("streaming request refused status=%d reason=%s", e.status, e)
            upgrade.answer_error(sock, e)
        except OSError as e:
            log.info("streaming connection ended: %s", e)
        except Exception:
            log.exception("streaming session failed")
        finally:
            sock.close()
            if slot:
                self._slots.release()


def _bound_waits(sock: socket.socket, idle_timeout: float) -> None:
    """Kernel timeouts on the blocking socket: a receive idle for ``idle_timeout`` or a send stuck
    for SEND_TIMEOUT fails (and ends the session); keepalives find a peer that vanished."""
    for option, seconds in ((socket.SO_RCVTIMEO, idle_timeout), (socket.SO_SNDTIMEO, SEND_TIMEOUT)):
        sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", int(seconds), 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET
