"""The host client against an agent that breaks the protocol (a guest root can replace the agent
with anything): a scripted peer on a socket pair answers each request as an attacker would. Every
misbehaviour ends in AgentMisbehaved (a KvmSandboxError), is reported once, costs bounded parsing
and leaves the client refusing further calls without reconnecting."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kvmsandbox.agent import client as client_module
from kvmsandbox.agent import wire
from kvmsandbox.agent.client import MAX_STRAY_ANSWERS, AgentClient
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import (
    AgentError,
    AgentMisbehaved,
    DeadlineExceeded,
    InvalidArgument,
    KvmSandboxError,
    Unavailable,
)

Answer = Callable[[pb.Request], bytes]


class FakeAgent:
    """Reads requests and writes whatever ``answer`` makes of each."""

    def __init__(self, answer: Answer) -> None:
        self.host, self.guest = socket.socketpair()
        self.connects = 0
        self.violations: list[str] = []
        self._answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        decoder = wire.FrameDecoder()
        try:
            while data := self.guest.recv(65536):
                for frame in decoder.feed(data):
                    self.guest.sendall(self._answer(frame.request))
        except OSError:
            return  # the test closed its end

    def client(self) -> AgentClient:
        def connect(timeout: float) -> socket.socket:
            self.connects += 1
            if self.connects > 1:
                raise ConnectionRefusedError("one connection only")
            return self.host

        return AgentClient(connect, "sandbox-evil", default_timeout=5, on_violation=self.violations.append)


def answer(request_id: int, code: int = pb.OK, body: bytes = b"", message: str = "") -> bytes:
    status = pb.Status(code=code, message=message)  # type: ignore[arg-type]
    return wire.encode(pb.Frame(response=pb.Response(id=request_id, status=status, body=body)))


@pytest.fixture
def agent_of() -> Iterator[Callable[[Answer], FakeAgent]]:
    made: list[FakeAgent] = []

    def make(a: Answer) -> FakeAgent:
        made.append(FakeAgent(a))
        return made[-1]

    yield make
    for a in made:
        a.guest.close()


OK_BODY = pb.HealthResponse(agent_version="1").SerializeToString()
FOUR_MIB = wire.MAX_FRAME_BYTES

# What the agent sends after a first good answer (before it, garbage may be the tail of a frame
# meant for an earlier connection: see the resync test below).
CASES: dict[str, Callable[[int], bytes]] = {
    "bad magic": lambda i: b"EVIL" + b"\0" * 64,
    "a 4 MiB frame of garbage": lambda i: wire.HEADER.pack(wire.MAGIC, FOUR_MIB) + b"\xff" * FOUR_MIB,
    "an oversized length": lambda i: wire.HEADER.pack(wire.MAGIC, FOUR_MIB + 1) + b"x" * 100,
    "an undecodable body": lambda i: answer(i, body=b"\xff\xff\xff\xff"),
    "an unknown status code": lambda i: answer(i, code=12345),
    "a request instead of an answer": lambda i: wire.encode(pb.Frame(request=pb.Request(id=i, method="Health"))),
}


@pytest.mark.parametrize("case", CASES)
def test_a_misbehaving_agent_is_final_and_reported_once(agent_of: Callable[[Answer], FakeAgent], case: str) -> None:
    answered: list[int] = []

    def good_then_evil(r: pb.Request) -> bytes:
        answered.append(r.id)
        return answer(r.id, body=OK_BODY) if len(answered) == 1 else CASES[case](r.id)

    agent = agent_of(good_then_evil)
    client = agent.client()
    assert client.call("Health", pb.HealthRequest(), pb.HealthResponse).agent_version == "1"
    with pytest.raises(AgentMisbehaved) as e:
        client.call("Health", pb.HealthRequest(), pb.HealthResponse)
    assert isinstance(e.value, KvmSandboxError) and e.value.grpc_code == "UNAVAILABLE"
    assert "sandbox-evil broke the protocol" in str(e.value)
    deadline = time.monotonic() + 5
    while not agent.violations and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(agent.violations) == 1
    # No second chance and no reconnection: the next call fails at once.
    with pytest.raises(AgentMisbehaved):
        client.call("Health", pb.HealthRequest(), pb.HealthResponse, timeout=0.5)
    assert agent.connects == 1 and len(agent.violations) == 1
    client.close()


def test_garbage_before_the_first_answer_is_skipped_within_a_bound(agent_of: Callable[[Answer], FakeAgent]) -> None:
    tail = answer(7, body=b"x" * 300)[11:]
    client = agent_of(lambda r: tail + answer(r.id, body=OK_BODY)).client()
    assert client.call("Health", pb.HealthRequest(), pb.HealthResponse).agent_version == "1"
    flood = agent_of(lambda r: b"\0" * (2 * FOUR_MIB + 64)).client()
    with pytest.raises(AgentMisbehaved, match="no frame in the first"):
        flood.call("Health", pb.HealthRequest(), pb.HealthResponse)


def test_stray_answers_are_dropped_up_to_a_bound(agent_of: Callable[[Answer], FakeAgent]) -> None:
    strays = lambda n: b"".join(answer(10**9 + i) for i in range(n))  # noqa: E731
    ok = pb.HealthResponse(agent_version="1").SerializeToString()
    tolerated = agent_of(lambda r: strays(MAX_STRAY_ANSWERS) + answer(r.id, body=ok)).client()
    assert tolerated.call("Health", pb.HealthRequest(), pb.HealthResponse).agent_version == "1"
    flooding = agent_of(lambda r: strays(MAX_STRAY_ANSWERS + 1) + answer(r.id, body=ok)).client()
    with pytest.raises(AgentMisbehaved, match="4097 answers"):
        flooding.call("Health", pb.HealthRequest(), pb.HealthResponse)


def test_stray_answers_are_dropped_up_to_a_byte_bound_too(
    agent_of: Callable[[Answer], FakeAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_STRAY_BYTES", 4 * 1024 * 1024)
    big = lambda n: b"".join(answer(10**9 + i, body=b"x" * 1_000_000) for i in range(n))  # noqa: E731
    ok = pb.HealthResponse(agent_version="1").SerializeToString()
    tolerated = agent_of(lambda r: big(4) + answer(r.id, body=ok)).client()
    assert tolerated.call("Health", pb.HealthRequest(), pb.HealthResponse).agent_version == "1"
    flooding = agent_of(lambda r: big(5) + answer(r.id, body=ok)).client()
    with pytest.raises(AgentMisbehaved, match="bytes"):
        flooding.call("Health", pb.HealthRequest(), pb.HealthResponse)


def test_an_agent_error_message_is_cut_short(agent_of: Callable[[Answer], FakeAgent]) -> None:
    client = agent_of(lambda r: answer(r.id, code=pb.NOT_FOUND, message="x" * 1_000_000)).client()
    with pytest.raises(AgentError) as e:
        client.call("Health", pb.HealthRequest(), pb.HealthResponse)
    assert e.value.grpc_code == "NOT_FOUND" and len(str(e.value)) < 1100


def test_crafted_frames_cost_one_parse_per_byte_at_most() -> None:
    """A stream of frame headers whose bodies never decode: the lenient decoder parses at most once
    per 4 bytes skipped, the strict one gives up after a few candidates."""
    body = b"\x0a\xff\xff\xff\xff\x0f" + b"\0" * 4096  # a length-delimited field longer than the body
    crafted = (wire.HEADER.pack(wire.MAGIC, len(body)) + body) * 128  # 512 KiB
    strict = wire.FrameDecoder(strict=True)
    with pytest.raises(wire.FrameError):
        strict.feed(crafted)
    # It gave up after a few candidates instead of parsing its way through all 128.
    assert strict.skipped_bytes <= (wire.FrameDecoder.MAX_RESYNC_CANDIDATES + 1) * (len(body) + wire.HEADER.size)


def test_strict_decoder_resyncs_only_before_the_first_frame() -> None:
    good = wire.encode(pb.Frame(response=pb.Response(id=1)))
    tail = wire.encode(pb.Frame(response=pb.Response(id=0, body=b"x" * 300)))[11:]
    strict = wire.FrameDecoder(strict=True)
    assert [f.response.id for f in strict.feed(tail + good)] == [1]
    with pytest.raises(wire.FrameError, match="between frames"):
        strict.feed(b"junk" + good)
    too_much = wire.FrameDecoder(strict=True)
    with pytest.raises(wire.FrameError, match="no frame in the first"):
        for _ in range(9):
            too_much.feed(b"\0" * wire.MAX_FRAME_BYTES)


def test_late_answers_to_calls_that_timed_out_are_not_stray(
    agent_of: Callable[[Answer], FakeAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest that was frozen answers every call it missed once it runs again: no violation."""
    monkeypatch.setattr(client_module, "MAX_STRAY_ANSWERS", 8)
    held: list[pb.Request] = []

    def hold_then_flush(r: pb.Request) -> bytes:
        if r.method == "Health":
            held.append(r)
            return b""
        return b"".join(answer(h.id, body=OK_BODY) for h in held) + answer(r.id, body=OK_BODY)

    agent = agent_of(hold_then_flush)
    client = agent.client()
    for _ in range(8 + 10):
        with pytest.raises(DeadlineExceeded):
            client.call("Health", pb.HealthRequest(), pb.HealthResponse, timeout=0.01)
    client.call("GuestDetails", pb.GuestDetailsRequest(), pb.HealthResponse)
    assert agent.violations == [] and client.violation is None


def test_an_agent_that_stops_reading_cannot_hold_a_call_past_its_deadline() -> None:
    host, guest = socket.socketpair()
    client = AgentClient(lambda timeout: host, "sandbox-deaf", default_timeout=5)
    big = pb.CreateContainerRequest(container_id="c", oci_spec_json="x" * (2 << 20))  # more than the socket buffers
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.call("CreateContainer", big, pb.CreateContainerResponse, timeout=1)
    with pytest.raises((DeadlineExceeded, Unavailable)):
        client.call("Health", pb.HealthRequest(), pb.HealthResponse, timeout=1)
    assert time.monotonic() - started < 5
    guest.close()
    client.close()


def test_a_request_larger_than_a_frame_is_an_invalid_argument() -> None:
    host, guest = socket.socketpair()
    client = AgentClient(lambda timeout: host, "sandbox-x", default_timeout=5)
    huge = pb.CreateContainerRequest(container_id="c", oci_spec_json="x" * (wire.MAX_FRAME_BYTES + 1))
    with pytest.raises(InvalidArgument, match="too large"):
        client.call("CreateContainer", huge, pb.CreateContainerResponse)
    guest.close()
    client.close()


def test_a_late_answer_is_taken_once(agent_of: Callable[[Answer], FakeAgent]) -> None:
    ids: list[int] = []

    def replaying(r: pb.Request) -> bytes:
        if r.method == "Health":
            ids.append(r.id)
            return b""
        return answer(ids[0], body=OK_BODY) * (MAX_STRAY_ANSWERS + 2) + answer(r.id, body=OK_BODY)

    agent = agent_of(replaying)
    client = agent.client()
    with pytest.raises(DeadlineExceeded):
        client.call("Health", pb.HealthRequest(), pb.HealthResponse, timeout=0.05)
    with pytest.raises(AgentMisbehaved, match="never sent"):
        client.call("GuestDetails", pb.GuestDetailsRequest(), pb.HealthResponse)


def test_stream_calls_refuse_answers_larger_than_asked_and_do_not_spin_on_empty_ones(
    agent_of: Callable[[Answer], FakeAgent],
) -> None:
    from kvmsandbox.agent import streams

    calls: dict[str, int] = {}

    def liar(req: pb.Request) -> bytes:
        calls[req.method] = calls.get(req.method, 0) + 1
        if req.method == "OpenPort":
            return answer(req.id, body=pb.OpenPortResponse(connection_id=7).SerializeToString())
        if req.method == "ReadPort":
            big = (
                pb.ReadPortResponse(data=b"x" * (streams.CHUNK + 1)) if calls[req.method] > 3 else pb.ReadPortResponse()
            )
            return answer(req.id, body=big.SerializeToString())
        if req.method == "WriteStdin":
            written = 0 if calls[req.method] < 5 else 1 << 30
            return answer(req.id, body=pb.WriteStdinResponse(written=written).SerializeToString())
        return answer(req.id)

    agent = agent_of(liar)
    client = agent.client()
    port = streams.PortStream(client, 80)
    started = time.monotonic()
    for _ in range(3):  # empty answers at once: each read still takes the minimum interval
        assert port.read() == (b"", False)
    assert time.monotonic() - started >= 3 * streams.MIN_CALL_INTERVAL * 0.9
    with pytest.raises(AgentMisbehaved, match="bytes for"):
        port.read()
    stdin = streams.StdinWriter(agent_of(liar).client(), "c", "")
    started = time.monotonic()
    with pytest.raises(AgentMisbehaved, match="took 1073741824 of 2"):
        stdin.write(b"hi", threading.Event())
    assert calls["WriteStdin"] == 5 and time.monotonic() - started >= 4 * streams.MIN_CALL_INTERVAL * 0.9
