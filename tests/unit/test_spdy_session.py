"""A server-side SPDY session over a socket pair, driven by a client made of the same codec: streams
opened and answered, data both ways on several streams at once, PING, RST_STREAM, GOAWAY, a
protocol violation, a stream limit, and a consumer that stops reading."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kvmsandbox.cri.streaming import spdy, spdy_session
from kvmsandbox.cri.streaming.spdy_session import SpdySession, SpdyStream


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.encoder, self.decoder = sock, spdy.Encoder(), spdy.Decoder()
        self.sock.settimeout(10)
        self.pending: list[spdy.Frame] = []

    def send(self, *frames: spdy.Frame) -> None:
        self.sock.sendall(b"".join(self.encoder.encode(f) for f in frames))

    def frame(self) -> spdy.Frame:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def data_until_fin(self, stream_id: int) -> bytes:
        out = b""
        while True:
            f = self.frame()
            if isinstance(f, spdy.DataFrame) and f.stream_id == stream_id:
                out += f.data
                if f.fin:
                    return out


def upper_echo(stream: SpdyStream) -> None:
    """What a protocol handler does: reads its stream on a thread of its own and answers."""

    def run() -> None:
        while chunk := stream.read():
            stream.write(chunk.upper())
        stream.close()

    threading.Thread(target=run, daemon=True).start()


@pytest.fixture
def pair() -> Iterator[tuple[Client, SpdySession, threading.Thread]]:
    server_sock, client_sock = socket.socketpair()
    session = SpdySession(server_sock, upper_echo)
    thread = threading.Thread(target=session.serve, daemon=True)
    thread.start()
    yield Client(client_sock), session, thread
    session.close()
    client_sock.close()
    server_sock.close()


def test_streams_are_answered_and_carry_data_both_ways_at_once(
    pair: tuple[Client, SpdySession, threading.Thread],
) -> None:
    client, _, _ = pair
    client.send(spdy.SynStream(1, {"streamtype": ["stdin"]}), spdy.SynStream(3, {"streamtype": ["stdout"]}))
    assert [client.frame(), client.frame()] == [spdy.SynReply(1, {}), spdy.SynReply(3, {})]
    big = b"x" * 200_000
    client.send(spdy.DataFrame(3, b"three"), spdy.DataFrame(1, big), spdy.DataFrame(1, b"", fin=True))
    client.send(spdy.DataFrame(3, b"", fin=True))
    got: dict[int, bytes] = {1: b"", 3: b""}
    done: set[int] = set()
    while done != {1, 3}:
        f = client.frame()
        assert isinstance(f, spdy.DataFrame) and len(f.data) <= spdy_session.CHUNK
        got[f.stream_id] += f.data
        if f.fin:
            done.add(f.stream_id)
    assert got == {1: big.upper(), 3: b"THREE"}


def test_ping_is_answered_and_goaway_ends_the_session(pair: tuple[Client, SpdySession, threading.Thread]) -> None:
    client, session, thread = pair
    client.send(spdy.Ping(7), spdy.Settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20}), spdy.WindowUpdate(0, 5))
    assert client.frame() == spdy.Ping(7)
    client.send(spdy.GoAway(0))
    thread.join(5)
    assert not thread.is_alive() and session.closed.is_set()


def test_a_protocol_violation_ends_the_session_with_goaway(pair: tuple[Client, SpdySession, threading.Thread]) -> None:
    client, session, thread = pair
    client.sock.sendall(b"\x80\x02\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01")  # a SPDY/2 PING
    assert client.frame() == spdy.GoAway(0, 1)
    thread.join(5)
    assert session.closed.is_set()


def test_data_for_an_unknown_stream_is_refused_and_the_stream_limit_holds(
    pair: tuple[Client, SpdySession, threading.Thread],
) -> None:
    client, _, _ = pair
    client.send(spdy.DataFrame(99, b"who"))
    assert client.frame() == spdy.RstStream(99, spdy.INVALID_STREAM)
    for i in range(spdy_session.MAX_STREAMS + 1):
        client.send(spdy.SynStream(2 * i + 1, {}))
    frames = [client.frame() for _ in range(spdy_session.MAX_STREAMS + 1)]
    assert frames[-1] == spdy.RstStream(2 * spdy_session.MAX_STREAMS + 1, spdy.REFUSED_STREAM)


def test_streams_must_be_opened_in_order(pair: tuple[Client, SpdySession, threading.Thread]) -> None:
    client, session, thread = pair
    client.send(spdy.SynStream(5, {}))
    assert client.frame() == spdy.SynReply(5, {})
    client.send(spdy.SynStream(3, {}))
    assert client.frame() == spdy.GoAway(0, 1)
    thread.join(5)
    assert session.closed.is_set()


def test_reset_streams_free_their_place_and_close_never_waits_on_a_blocked_sender() -> None:
    server_sock, client_sock = socket.socketpair()
    session = SpdySession(server_sock, lambda stream: stream.reset())  # refuses every stream
    thread = threading.Thread(target=session.serve, daemon=True)
    thread.start()
    client = Client(client_sock)
    for i in range(spdy_session.MAX_STREAMS + 10):
        client.send(spdy.SynStream(2 * i + 1, {}))
    kinds = {type(client.frame()) for _ in range(2 * (spdy_session.MAX_STREAMS + 10))}
    assert kinds == {spdy.SynReply, spdy.RstStream}  # replied, then reset: never REFUSED for lack of room

    # The client stops reading; the server blocks sending; close() still returns at once.
    def flood() -> None:
        with contextlib.suppress(OSError):  # the connection goes away under it
            for i in range(1, 200_000):
                session.send(spdy.Ping(i * 2))

    blocked = threading.Thread(target=flood, daemon=True)

    blocked.start()
    time.sleep(0.5)
    started = time.monotonic()
    session.close()
    assert time.monotonic() - started < 1
    blocked.join(5)
    assert not blocked.is_alive()
    client_sock.close()
    server_sock.close()


def test_a_consumer_that_stops_reading_does_not_hold_the_session() -> None:
    server_sock, client_sock = socket.socketpair()
    opened: list[SpdyStream] = []
    session = SpdySession(server_sock, opened.append)  # nobody reads the streams
    thread = threading.Thread(target=session.serve, daemon=True)
    thread.start()
    client = Client(client_sock)
    try:
        client.send(spdy.SynStream(1, {}))
        client.frame()
        flood = spdy.DataFrame(1, b"y" * spdy_session.CHUNK)
        sender = threading.Thread(
            target=lambda: [client.send(flood) for _ in range(2 * spdy_session.STREAM_BUFFER // spdy_session.CHUNK)],
            daemon=True,
        )
        sender.start()
        time.sleep(0.5)
        assert sender.is_alive()  # the buffer is full: the session stopped reading
        opened[0].stop_reading()
        sender.join(10)
        assert not sender.is_alive()
        client.send(spdy.Ping(3))
        while (f := client.frame()) != spdy.Ping(3):
            assert isinstance(f, spdy.SynReply | spdy.DataFrame)
    finally:
        session.close()
        client_sock.close()
        server_sock.close()


def test_streams_closed_both_ways_free_their_place(pair: tuple[Client, SpdySession, threading.Thread]) -> None:
    """A long port-forward session opens two streams per connection: far more than MAX_STREAMS
    over its life, each closed both ways (the client's FIN, the server's) and none reset."""
    client, _, _ = pair
    for i in range(spdy_session.MAX_STREAMS + 10):
        stream_id = 2 * i + 1
        client.send(spdy.SynStream(stream_id, {"n": [str(i)]}), spdy.DataFrame(stream_id, b"x", fin=True))
        reply = client.frame()
        assert isinstance(reply, spdy.SynReply) and reply.stream_id == stream_id, reply
        assert client.data_until_fin(stream_id) == b"X"


def test_a_consumer_that_never_reads_does_not_hide_a_client_that_left() -> None:
    server_sock, client_sock = socket.socketpair()
    stuck: list[SpdyStream] = []
    session = SpdySession(server_sock, stuck.append)  # nobody ever reads the stream
    reader = threading.Thread(target=session.serve, daemon=True)
    reader.start()
    client = Client(client_sock)
    client.send(spdy.SynStream(1, {}))
    client_sock.settimeout(2)
    with contextlib.suppress(TimeoutError):  # more than the stream and the socket hold
        for _ in range(80):
            client.send(spdy.DataFrame(1, b"y" * 65536))
    assert reader.is_alive()  # blocked delivering to a consumer that does not read
    client_sock.close()
    reader.join(10)
    assert not reader.is_alive() and session.closed.is_set()
