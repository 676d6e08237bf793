"""The pieces of interactive streams that need no guest: terminal sizes parsed from a client's
resize stream (split, joined, hostile), the agent's stdin writer and port connections against
local pipes and sockets, and the host's stream objects against an agent that lies."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from kvmsandbox.agent.guest.errors import FailedPrecondition, InvalidArgument, NotFound
from kvmsandbox.agent.guest.ports import PortConnections
from kvmsandbox.agent.guest.stdio import Input
from kvmsandbox.cri.streaming.remotecommand import StreamSink, TerminalSizes


class Chunks:
    """A stream that hands out the chunks it was given, then its end."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def read(self, timeout: float | None = None) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def sizes_of(*chunks: bytes) -> list[tuple[int, int]]:
    parser = TerminalSizes(Chunks(*chunks))  # type: ignore[arg-type]
    out = []
    while (size := parser.next_size(1.0)) is not None:
        out.append(size)
    return out


def test_terminal_sizes_however_the_stream_cuts_them() -> None:
    assert sizes_of(b'{"Width":80,"Height":24}') == [(80, 24)]
    assert sizes_of(b'{"Width":80,"He', b'ight":24}\n{"Width":1', b'00,"Height":40}\n') == [(80, 24), (100, 40)]
    assert sizes_of(b'{"Width":80,"Height":24}{"Width":81,"Height":25}') == [(80, 24), (81, 25)]


def test_hostile_resize_streams_end_the_sizes_or_are_skipped() -> None:
    # Out of range, wrong types, not an object: skipped; what follows still counts.
    assert sizes_of(b'{"Width":-1,"Height":24}{"Width":1e9,"Height":2}[1,2]"x"{"Width":70,"Height":20}') == [(70, 20)]
    assert sizes_of(b'{"Width":99999999,"Height":24}', b'{"Width":"80","Height":24}') == []
    # Garbage that never parses ends the sizes once it exceeds the bound, without growing.
    assert sizes_of(*[b"{" * 1000] * 10) == []


def test_a_terminal_sink_sends_the_runtime_s_messages_on_its_only_stream() -> None:
    class Stream:
        def __init__(self) -> None:
            self.data, self.closed = b"", False

        def write(self, data: bytes) -> None:
            self.data += data

        def close(self) -> None:
            self.closed = True

    out = Stream()
    sink = StreamSink({"stdout": out}, tty=True)  # type: ignore[dict-item]
    sink.write("stdout", b"prompt$ ")
    sink.write("stderr", b"exec failed: no such file")
    sink.end("stderr")
    assert out.data == b"prompt$ exec failed: no such file" and not out.closed
    sink.end("stdout")
    assert out.closed


def test_stdin_takes_what_fits_then_reports_a_closed_reader() -> None:
    r, w = os.pipe()
    stdin = Input(w, terminal=False)
    written = stdin.write(b"x" * (4 << 20), wait=0.2)  # nobody reads: a pipe's worth, after the wait
    assert 0 < written < 4 << 20
    assert len(os.read(r, 1 << 20)) > 0
    os.close(r)
    with pytest.raises(FailedPrecondition, match="stdin is closed"):
        stdin.write(b"more", wait=0.2)
    with pytest.raises(FailedPrecondition, match="no terminal"):
        stdin.resize(80, 24)
    stdin.close()
    stdin.close()  # idempotent
    with pytest.raises(FailedPrecondition):
        stdin.write(b"x", wait=0)


def test_a_terminal_s_size_is_set_on_its_master_within_bounds() -> None:
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    stdin = Input(master, terminal=True)
    stdin.resize(1_000_000, 40)  # a size no screen has is cut down, not refused
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
    assert (rows, cols) == (40, 10_000)
    stdin.close()
    os.close(slave)


@pytest.fixture
def echo_server() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield port
    listener.close()


def test_port_connections_carry_data_both_ways_and_close(echo_server: int) -> None:
    ports = PortConnections()
    a, b = ports.open(echo_server), ports.open(echo_server)
    assert a != b
    assert ports.write(a, b"hello", close_write=False, wait=1) == 5
    assert ports.write(b, b"other", close_write=True, wait=1) == 5
    got = b""
    while len(got) < 5:
        data, eof = ports.read(a, 1024, wait=5)
        got += data
    assert got == b"hello"
    got, eof = b"", False
    while not eof:  # b closed its write side: the echo server closes, b reads its end
        data, eof = ports.read(b, 1024, wait=5)
        got += data
    assert got == b"other"
    assert ports.read(a, 1024, wait=0.05) == (b"", False)  # nothing more yet, not an end
    ports.close(a)
    ports.close(a)  # idempotent
    with pytest.raises(NotFound):
        ports.read(a, 1, wait=0)
    ports.close_all()
    with pytest.raises(NotFound):
        ports.write(b, b"x", close_write=False, wait=0)


def test_port_connections_refuse_bad_ports_and_closed_ones() -> None:
    ports = PortConnections()
    for bad in (0, 65536, 1 << 31):
        with pytest.raises(InvalidArgument):
            ports.open(bad)
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(Exception, match=f"cannot connect to 127.0.0.1:{port}"):
        ports.open(port)


def test_port_connections_are_bounded(echo_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmsandbox.agent.guest import ports as ports_module

    monkeypatch.setattr(ports_module, "MAX_CONNECTIONS", 3)
    ports = PortConnections()
    for _ in range(3):
        ports.open(echo_server)
    with pytest.raises(FailedPrecondition, match="3 port-forward connections"):
        ports.open(echo_server)
    ports.close_all()
    ports.open(echo_server)
    ports.close_all()


def test_a_tap_passes_output_on_until_its_streams_end() -> None:
    from kvmsandbox.sandbox.stdio import Tap

    tap = Tap(("stdout", "stderr"), ended=set())
    tap.put("stdout", b"a")
    tap.put("other", b"ignored")
    tap.end("stdout")
    assert tap.get(0.1) == ("stdout", b"a")
    with pytest.raises(TimeoutError):
        tap.get(0.05)  # stderr has not ended
    tap.put("stderr", b"b")
    tap.end("stderr")
    assert tap.get(0.1) == ("stderr", b"b")
    assert tap.get(0.1) is None
    # A stream that ended before the tap was made does not hold it open.
    assert Tap(("stdout",), ended={"stdout", "stderr"}).get(0.1) is None


def test_a_client_too_far_behind_is_cut_off_not_buffered_without_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmsandbox.sandbox import stdio

    monkeypatch.setattr(stdio, "TAP_LIMIT", 1000)
    tap = stdio.Tap(("stdout",), ended=set())
    for _ in range(100):
        tap.put("stdout", b"x" * 100)
    assert tap.overflowed
    assert tap.get(0.1) is None  # what was held is dropped with the client


def test_a_relay_serves_only_the_connection_with_its_token(echo_server: int) -> None:
    from kvmsandbox.agent.guest.ports import PortRelays

    relays = PortRelays()
    token = os.urandom(32)
    with pytest.raises(InvalidArgument, match="32 bytes"):
        relays.open(echo_server, b"short")
    port = relays.open(echo_server, token)
    # A neighbour that comes first with a wrong token is dropped; the host still gets in after it.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as intruder:
        intruder.sendall(b"x" * 32)
        assert intruder.recv(10) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as host:
        host.sendall(token + b"through the kernel")
        got = b""
        while len(got) < 18:
            got += host.recv(100)
        assert got == b"through the kernel"
        host.shutdown(socket.SHUT_WR)
        assert host.recv(10) == b""  # the echo server saw the end and closed: so does the relay
    # One connection per relay: the listener is gone.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_deeply_nested_resize_input_ends_the_sizes_without_a_traceback() -> None:
    assert sizes_of(b"[" * 3000) == []
    assert sizes_of(b'{"a":' * 1000 + b"1" + b"}" * 1000) == []


def test_websocket_port_forward_ports_come_only_from_ascii_digits_in_range() -> None:
    from kvmsandbox.cri.streaming.service import _query_ports

    query = {"port": ["80", "²", "٣", "0", "65536", "99999999", "8080", "-1", " 22"]}
    assert _query_ports(query) == [80, 8080]
    assert _query_ports({}) == []


def test_killing_a_shell_s_session_reaches_its_background_jobs() -> None:
    import subprocess
    import time

    from kvmsandbox.agent.guest.debug import kill_session

    # A session leader with a job in a process group of its own (as job control makes).
    leader = subprocess.Popen(["sh", "-c", "set -m; sleep 300 & sleep 300"], start_new_session=True)
    time.sleep(0.5)

    def in_session(pid: int) -> bool:
        try:
            return os.getsid(pid) == leader.pid
        except OSError:
            return False

    members = [int(e) for e in os.listdir("/proc") if e.isdigit() and in_session(int(e))]
    assert len(members) >= 3  # the shell and both sleeps
    kill_session(leader.pid, 9)
    leader.wait(10)
    time.sleep(0.5)
    alive = []
    for pid in members:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    assert alive == []


def test_a_relay_ends_when_the_host_resets_it_though_the_server_never_reads() -> None:
    import struct
    import time

    from kvmsandbox.agent.guest.ports import PortRelays

    deaf = socket.create_server(("127.0.0.1", 0))  # accepts, never reads
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(deaf.accept()[0]), daemon=True).start()
    relays = PortRelays()
    token = os.urandom(32)
    port = relays.open(deaf.getsockname()[1], token)
    host = socket.create_connection(("127.0.0.1", port), timeout=5)
    host.sendall(token)
    host.settimeout(0.5)
    with contextlib.suppress(TimeoutError):  # until every buffer on the way is full
        while True:
            host.send(b"z" * 65536)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    host.close()  # a reset, as the runtime's close does
    deadline = time.monotonic() + 10
    while relays._open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relays._open == 0
    deaf.close()
    for s in held:
        s.close()
