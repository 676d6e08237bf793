"""A test mode of the agent: it breaks the protocol on purpose, as a guest root that replaced the
agent would, so that the host's defences are exercised by a real guest over a real channel
(tests/vm/test_hostile_agent_guest.py).

Armed only by ``kvmsandbox.misbehave=<scenario>`` on the kernel command line, which the host puts
there only when a test passes it to ``SandboxManager.create_sandbox(cmdline_extra=...)``: no CRI
request, config key or container can. Until the host's first UpdateContainer request (the
trigger: the host sends it only when the CRI asks, never on its own nor in a node-wide call, so the
pod boots and its containers are made first) the agent behaves; from the trigger on it plays its
scenario, and a trigger the scenario does not answer itself is answered OK (no limits change):

``bad-magic``       the trigger's answer under a wrong magic
``huge-garbage``    a frame of MAX_FRAME_BYTES that does not decode
``undecodable``     a well-formed frame whose answer body does not decode
``unknown-enum``    every container is listed in a state no version knows, and ContainerStats
                    answers with a status code no version knows
``unknown-ids``     more answers to ids never sent than the host drops quietly
``endless-output``  every ReadStdio answers at once with a full chunk of short lines, never the end
``stats-max``       every ContainerStats answer has the largest value in every figure
``silence``         no answer to anything any more; the connection stays open
``flood``           answers to ids never sent, 60 KiB each, spread over FLOOD_SECONDS (fewer, in
                    count and bytes, than the host drops quietly), then the trigger's answer
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from kvmsandbox.agent import wire
from kvmsandbox.agent.guest import log
from kvmsandbox.agent.v1 import agent_pb2 as pb

Handler = Callable[[pb.Request], pb.Response]
Send = Callable[[bytes], None]
Scenario = Callable[[Handler, pb.Request, Send, bool], bool]

CMDLINE_KEY = "kvmsandbox.misbehave="
TRIGGER = "UpdateContainer"
# Ids the host never uses (its ids count up from a random 48-bit start).
NEVER_SENT_ID = 2**63
UNKNOWN_CODE = 4242
UNKNOWN_STATE = 99
# The host drops up to 4096 answers to ids it never sent (a serial port replays old answers).
STRAY_ANSWERS = 5000
FLOOD_SECONDS = 10.0
FLOOD_FRAMES = 4000
FLOOD_BODY_BYTES = 60 * 1024
ENDLESS_CHUNK_BYTES = 1024 * 1024
ENDLESS_LINE = b"endless output, never an end of file\n"


def _frame(response: pb.Response) -> bytes:
    return wire.encode(pb.Frame(response=response))


def _ok(request: pb.Request) -> bytes:
    return _frame(pb.Response(id=request.id, status=pb.Status(code=pb.OK)))


def _stray(i: int, body: bytes = b"") -> bytes:
    return _frame(pb.Response(id=NEVER_SENT_ID + i, status=pb.Status(code=pb.OK), body=body))


def _bad_magic(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    if not first:
        return False
    send(b"KSA0" + _ok(request)[len(wire.MAGIC) :])
    return True


def _huge_garbage(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    if not first:
        return False
    # 0xff bytes make a varint longer than any: no parser takes them for a message.
    send(wire.HEADER.pack(wire.MAGIC, wire.MAX_FRAME_BYTES) + b"\xff" * wire.MAX_FRAME_BYTES)
    return True


def _undecodable(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    if not first:
        return False
    send(_frame(pb.Response(id=request.id, status=pb.Status(code=pb.OK), body=b"\xff" * 64)))
    return True


def _unknown_enum(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    if first:
        return False
    if request.method == "ListContainers":
        response = handler(request)
        listed = pb.ListContainersResponse.FromString(response.body)
        for c in listed.containers:
            c.state = UNKNOWN_STATE  # type: ignore[assignment]
        response.body = listed.SerializeToString()
        send(_frame(response))
        return True
    if request.method == "ContainerStats":
        status = pb.Status(code=UNKNOWN_CODE, message="a code from the future")  # type: ignore[arg-type]
        send(_frame(pb.Response(id=request.id, status=status)))
        return True
    return False


def _unknown_ids(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    if not first:
        return False
    for i in range(STRAY_ANSWERS):
        send(_stray(i))
    return True


def _endless_output(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    if request.method != "ReadStdio":
        return False
    asked = pb.ReadStdioRequest.FromString(request.body)
    size = min(asked.max_bytes or ENDLESS_CHUNK_BYTES, ENDLESS_CHUNK_BYTES)
    data = (ENDLESS_LINE * (size // len(ENDLESS_LINE) + 1))[:size]
    answer = pb.ReadStdioResponse(data=data, eof=False)
    # Agents that keep positions say where the data is: exactly where the host asked.
    positions = {"offset": getattr(asked, "offset", 0), "positioned": True}
    for name, value in positions.items():
        if name in answer.DESCRIPTOR.fields_by_name:
            setattr(answer, name, value)
    send(_frame(pb.Response(id=request.id, status=pb.Status(code=pb.OK), body=answer.SerializeToString())))
    return True


def largest_stats() -> pb.ContainerStatsResponse:
    """Every unsigned figure 2^64-1, every signed one 2^63-1."""
    stats = pb.ContainerStatsResponse()
    for field in stats.DESCRIPTOR.fields:
        unsigned = field.type in (field.TYPE_UINT64, field.TYPE_FIXED64)
        setattr(stats, field.name, 2**64 - 1 if unsigned else 2**63 - 1)
    return stats


def _stats_max(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    if request.method != "ContainerStats":
        return False
    body = largest_stats().SerializeToString()
    send(_frame(pb.Response(id=request.id, status=pb.Status(code=pb.OK), body=body)))
    return True


def _silence(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    return True


def _flood(handler: Handler, request: pb.Request, send: Send, first: bool) -> bool:
    if not first:
        return False

    def flood() -> None:
        frame = _stray(0, b"\xab" * FLOOD_BODY_BYTES)
        start = time.monotonic()
        end = start + FLOOD_SECONDS
        sent = 0
        while time.monotonic() < end and sent < FLOOD_FRAMES:
            send(frame)
            sent += 1
            time.sleep(max(0.0, start + sent * FLOOD_SECONDS / FLOOD_FRAMES - time.monotonic()))
        log.event("flood-over", frames=sent, frame_bytes=len(frame))
        send(_ok(request))

    threading.Thread(target=flood, name="flood", daemon=True).start()
    return True


SCENARIOS: dict[str, Scenario] = {
    "bad-magic": _bad_magic,
    "huge-garbage": _huge_garbage,
    "undecodable": _undecodable,
    "unknown-enum": _unknown_enum,
    "unknown-ids": _unknown_ids,
    "endless-output": _endless_output,
    "stats-max": _stats_max,
    "silence": _silence,
    "flood": _flood,
}


class Misbehaviour:
    """One scenario, armed: ``take`` sees every request before the agent answers it."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self._play = SCENARIOS[scenario]
        self._lock = threading.Lock()
        self._triggered = False

    def take(self, handler: Handler, request: pb.Request, send: Send) -> bool:
        """True when the scenario dealt with ``request`` (the caller sends nothing), False when
        the agent answers it as usual."""
        with self._lock:
            first = not self._triggered and request.method == TRIGGER
            self._triggered = self._triggered or first
            if not self._triggered:
                return False
        if first:
            log.event("misbehaving", scenario=self.scenario)
        if self._play(handler, request, send, first):
            return True
        if first:
            send(_ok(request))
        return first


armed: Misbehaviour | None = None


def arm(cmdline: Path = Path("/proc/cmdline")) -> None:
    """Arms the scenario the kernel command line names, if any (an unknown one arms nothing)."""
    global armed
    try:
        words = cmdline.read_text().split()
    except OSError:
        return
    for word in words:
        if word.startswith(CMDLINE_KEY) and word[len(CMDLINE_KEY) :] in SCENARIOS:
            armed = Misbehaviour(word[len(CMDLINE_KEY) :])
            log.event("misbehave-armed", scenario=armed.scenario)
