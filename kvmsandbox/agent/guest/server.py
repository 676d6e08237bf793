"""The agent's transports: a virtio-serial port and/or an AF_VSOCK listener, same frames on both.

Each request runs in its own thread, so a long WaitProcess or ReadStdio never holds up a Health
check; answers are written whole under a lock, in whatever order they finish.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kvmsandbox.agent import wire
from kvmsandbox.agent.guest import log, misbehave
from kvmsandbox.agent.v1 import agent_pb2 as pb

Handler = Callable[[pb.Request], pb.Response]
VIRTIO_PORTS = Path("/sys/class/virtio-ports")
# A reply that cannot be written in this time is dropped: the host is gone and will retry.
WRITE_TIMEOUT = 10.0


def find_serial_port(name: str = wire.AGENT_SERIAL_PORT_NAME) -> Path | None:
    """The /dev node of the virtio-serial port with that name, if the VM has one."""
    if not VIRTIO_PORTS.is_dir():
        return None
    for port in VIRTIO_PORTS.iterdir():
        try:
            if (port / "name").read_text().strip() == name:
                return Path("/dev") / port.name
        except OSError:
            continue
    return None


def vsock_available() -> bool:
    """True when the guest has a virtio vsock device bound to its driver."""
    driver = Path("/sys/bus/virtio/drivers/vmw_vsock_virtio_transport")
    return driver.is_dir() and any(p.name.startswith("virtio") for p in driver.iterdir())


def _dispatch(handler: Handler, request: pb.Request, send: Callable[[bytes], None]) -> None:
    if misbehave.armed is not None and misbehave.armed.take(handler, request, send):
        return  # a test mode, armed from the kernel command line only
    response = handler(request)
    send(wire.encode(pb.Frame(response=response)))


class SerialServer:
    """Serves the protocol on a virtio-serial port.

    The port can be opened once; reads give EOF (poll gives POLLHUP) while no host is connected, and
    every host connection starts a fresh stream: on a hang-up the partial frame is dropped.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self._path = path
        self._handler = handler
        self._write_lock = threading.Lock()
        self._fd = -1

    def _send(self, data: bytes) -> None:
        with self._write_lock:
            deadline = time.monotonic() + WRITE_TIMEOUT
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self._fd, view)
                    view = view[n:]
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.event("reply-dropped", reason="host not reading", bytes=len(view))
                        return
                    select.poll().poll(50)
                except OSError as e:
                    log.event("reply-dropped", reason=str(e), bytes=len(view))
                    return

    def serve_forever(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        log.event("listening", transport="virtio-serial", port=str(self._path))
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        decoder = wire.FrameDecoder()
        connected = False
        while True:
            events = poller.poll(1000)
            if not events:
                continue
            _, mask = events[0]
            data = b""
            if mask & select.POLLIN:
                try:
                    data = os.read(self._fd, 65536)
                except BlockingIOError:
                    continue
            if not data:
                # No host on the other end: back off instead of spinning on POLLHUP.
                if connected:
                    log.event("host-disconnected", transport="virtio-serial")
                    connected = False
                decoder.reset()
                time.sleep(0.05)
                continue
            if not connected:
                connected = True
                log.event("host-connected", transport="virtio-serial")
            for frame in decoder.feed(data):
                if frame.WhichOneof("kind") == "request":
                    threading.Thread(
                        target=_dispatch, args=(self._handler, frame.request, self._send), daemon=True
                    ).start()


class VsockServer:
    """Serves the protocol on AF_VSOCK, one thread per host connection."""

    def __init__(self, port: int, handler: Handler) -> None:
        self._port = port
        self._handler = handler

    def serve_forever(self) -> None:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        listener.bind((socket.VMADDR_CID_ANY, self._port))
        listener.listen(16)
        log.event("listening", transport="vsock", port=self._port)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        lock = threading.Lock()

        def send(data: bytes) -> None:
            with lock:
                try:
                    conn.sendall(data)
                except OSError as e:
                    log.event("reply-dropped", reason=str(e), bytes=len(data))

        decoder = wire.FrameDecoder()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for frame in decoder.feed(data):
                    if frame.WhichOneof("kind") == "request":
                        threading.Thread(
                            target=_dispatch, args=(self._handler, frame.request, send), daemon=True
                        ).start()
