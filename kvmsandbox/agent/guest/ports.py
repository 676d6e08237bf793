"""Port-forward in the guest: TCP connections from the agent to 127.0.0.1:<port>, which is the
pod's network namespace (containers share the guest's), so servers bound to loopback are reached
as they are with runc. The host reads and writes each one in bounded calls."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time

from kvmsandbox.agent.guest.errors import AgentFault, FailedPrecondition, InvalidArgument, NotFound
from kvmsandbox.agent.v1 import agent_pb2 as pb

# Open connections one guest keeps; beyond, OpenPort is refused (each holds a socket).
MAX_CONNECTIONS = 256
CONNECT_TIMEOUT = 10.0


class _Connection:
    __slots__ = ("port", "read_lock", "sock", "write_lock")

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port
        self.read_lock = threading.Lock()
        self.write_lock = threading.Lock()


class PortConnections:
    """The port-forward connections the host opened, by an id it cannot guess from an older run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[int, _Connection] = {}

    def open(self, port: int) -> int:
        """Raises InvalidArgument (not a port), AgentFault UNAVAILABLE (nothing listens there),
        FailedPrecondition (too many connections)."""
        if not 0 < port < 65536:
            raise InvalidArgument(f"invalid port {port}: must be 1-65535")
        with self._lock:
            if len(self._conns) >= MAX_CONNECTIONS:
                raise FailedPrecondition(f"{MAX_CONNECTIONS} port-forward connections are open already")
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            why = e.strerror or str(e)
            raise AgentFault(f"cannot connect to 127.0.0.1:{port} in the pod: {why}", pb.UNAVAILABLE) from None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn_id = int.from_bytes(os.urandom(8), "big") >> 1 or 1
        with self._lock:
            self._conns[conn_id] = _Connection(sock, port)
        return conn_id

    def _get(self, conn_id: int) -> _Connection:
        with self._lock:
            conn = self._conns.get(conn_id)
        if conn is None:
            raise NotFound(f"port-forward connection {conn_id} not found")
        return conn

    def read(self, conn_id: int, max_bytes: int, wait: float) -> tuple[bytes, bool]:
        """Up to ``max_bytes`` the server sent (waiting up to ``wait`` for some) and whether it
        closed its side. Raises NotFound."""
        conn = self._get(conn_id)
        with conn.read_lock:
            if not _ready(conn.sock, select.POLLIN, wait):
                return b"", False
            # What the kernel holds for the connection, up to max_bytes: one call carries as much
            # as has come since the last one.
            data = bytearray()
            while len(data) < max_bytes:
                try:
                    chunk = conn.sock.recv(max_bytes - len(data))
                except BlockingIOError:
                    break
                except OSError:
                    return bytes(data), not data
                if not chunk:
                    return bytes(data), not data
                data += chunk
            return bytes(data), False

    def write(self, conn_id: int, data: bytes, close_write: bool, wait: float) -> int:
        """Sends what the connection takes within ``wait``; then, with all sent and
        ``close_write``, shuts its write side. Raises NotFound, FailedPrecondition (reset)."""
        conn = self._get(conn_id)
        written = 0
        deadline = time.monotonic() + wait
        with conn.write_lock:
            while written < len(data):
                try:
                    written += conn.sock.send(data[written:])
                    continue
                except BlockingIOError:
                    pass
                except OSError as e:
                    raise FailedPrecondition(f"connection to port {conn.port} failed: {e.strerror or e}") from None
                if not _ready(conn.sock, select.POLLOUT, deadline - time.monotonic()):
                    break
            if close_write and written == len(data):
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
        return written

    def close(self, conn_id: int) -> None:
        """Closes the connection; an unknown id is already closed (idempotent)."""
        with self._lock:
            conn = self._conns.pop(conn_id, None)
        if conn is not None:
            _shut(conn.sock)

    def close_all(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for conn in conns:
            _shut(conn.sock)


def _shut(sock: socket.socket) -> None:
    """Wakes a read or write waiting on the socket, then closes it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _ready(sock: socket.socket, event: int, wait: float) -> bool:
    poller = select.poll()
    poller.register(sock, event)
    return bool(poller.poll(max(0.0, wait) * 1000))


RELAY_TOKEN_BYTES = 32
RELAY_ACCEPT_SECONDS = 10.0
SPLICE_BYTES = 1 << 20


class PortRelays:
    """Port-forward over the pod's network: a one-connection listener that joins the host to a
    connection to 127.0.0.1:<port>, the bytes spliced in the kernel both ways."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0

    def open(self, port: int, token: bytes) -> int:
        """Returns the port the relay listens on. Raises InvalidArgument, AgentFault UNAVAILABLE
        (nothing listens on the port), FailedPrecondition (too many relays)."""
        if not 0 < port < 65536:
            raise InvalidArgument(f"invalid port {port}: must be 1-65535")
        if len(token) != RELAY_TOKEN_BYTES:
            raise InvalidArgument(f"a relay token has {RELAY_TOKEN_BYTES} bytes, not {len(token)}")
        with self._lock:
            if self._open >= MAX_CONNECTIONS:
                raise FailedPrecondition(f"{MAX_CONNECTIONS} port-forward relays are open already")
            self._open += 1
        try:
            target = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            self._closed()
            why = e.strerror or str(e)
            raise AgentFault(f"cannot connect to 127.0.0.1:{port} in the pod: {why}", pb.UNAVAILABLE) from None
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(("::", 0))
            listener.listen(1)
        except OSError as e:
            listener.close()
            target.close()
            self._closed()
            raise AgentFault(f"cannot listen for the relay: {e}") from None
        threading.Thread(target=self._serve, args=(listener, target, token), name=f"relay-{port}", daemon=True).start()
        return int(listener.getsockname()[1])

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1

    def _serve(self, listener: socket.socket, target: socket.socket, token: bytes) -> None:
        try:
            with listener, target:
                host = _accept_with_token(listener, token)
                listener.close()  # one connection per relay
                if host is None:
                    return
                target.settimeout(None)  # blocking again: splice needs it
                with host:
                    back = threading.Thread(target=_splice, args=(target, host), daemon=True)
                    back.start()
                    _splice(host, target)
                    back.join()
        except OSError:
            pass
        finally:
            self._closed()


def _accept_with_token(listener: socket.socket, token: bytes) -> socket.socket | None:
    """The first connection within RELAY_ACCEPT_SECONDS that starts with ``token``; others (a
    neighbour on the pod network racing the host) are closed and the wait goes on."""
    import hmac

    deadline = time.monotonic() + RELAY_ACCEPT_SECONDS
    while (remaining := deadline - time.monotonic()) > 0:
        listener.settimeout(remaining)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return None
        got = b""
        try:
            while len(got) < len(token) and (left := deadline - time.monotonic()) > 0:
                conn.settimeout(min(1.0, left))  # the host sends its token at once
                chunk = conn.recv(len(token) - len(got))
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        if hmac.compare_digest(got, token):
            conn.settimeout(None)
            # A host that vanishes without a reset is found by probes.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 15)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            return conn
        conn.close()
    return None


def _splice(src: socket.socket, dst: socket.socket) -> None:
    """Moves bytes from ``src`` to ``dst`` through a pipe in the kernel until ``src`` ends (then
    shuts ``dst`` for writing). A reset on either side, or ``dst`` hanging up, shuts both sockets
    both ways, which ends the other direction too."""
    r, w = os.pipe()
    import fcntl

    with contextlib.suppress(OSError):  # a larger pipe: fewer splices (each costs dearly under TCG)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SPLICE_BYTES)
    poller = select.poll()
    poller.register(src, select.POLLIN)
    poller.register(dst, 0)  # POLLHUP and POLLERR are always reported: the other side reset
    clean = False
    try:
        while True:
            if any(fd == dst.fileno() for fd, _ in poller.poll()):
                break
            n = os.splice(src.fileno(), w, SPLICE_BYTES)
            if n == 0:
                clean = True
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
        for sock, how in ((dst, socket.SHUT_WR),) if clean else ((dst, socket.SHUT_RDWR), (src, socket.SHUT_RDWR)):
            with contextlib.suppress(OSError):
                sock.shutdown(how)
