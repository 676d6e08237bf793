"""Framing of the agent protocol, shared by the host client and the in-guest agent.

A frame is ``MAGIC | uint32 big-endian length | Frame message``. The reader resynchronises on the
magic: a virtio-serial port keeps no connection boundaries, so a new host connection can begin
with the tail of a frame written for the previous one. Method tables come from the ``Agent``
service in ``agent.proto``, so neither end repeats the message types by hand.
"""

from __future__ import annotations

import struct

from google.protobuf import message_factory
from google.protobuf.message import Message

from kvmsandbox.agent.v1 import agent_pb2 as pb

MAGIC = b"KSA1"
HEADER = struct.Struct(">4sI")
# Large enough for any OCI spec or stdio chunk, small enough that a corrupt length cannot make a
# reader allocate without bound.
MAX_FRAME_BYTES = 4 * 1024 * 1024
AGENT_VSOCK_PORT = 1024
AGENT_SERIAL_PORT_NAME = "org.kvmsandbox.agent.0"


class FrameError(Exception):
    """A frame could not be encoded or decoded."""


class Method:
    """One RPC of the Agent service: its name and its request and response message classes."""

    # A plain class, not a dataclass: importing dataclasses costs the guest agent 0.2 s under TCG.
    __slots__ = ("name", "request_type", "response_type")

    def __init__(self, name: str, request_type: type[Message], response_type: type[Message]) -> None:
        self.name = name
        self.request_type = request_type
        self.response_type = response_type


def _method_table() -> dict[str, Method]:
    service = pb.DESCRIPTOR.services_by_name["Agent"]
    return {
        m.name: Method(
            m.name,
            message_factory.GetMessageClass(m.input_type),
            message_factory.GetMessageClass(m.output_type),
        )
        for m in service.methods
    }


METHODS: dict[str, Method] = _method_table()


def encode(frame: pb.Frame) -> bytes:
    """Serialises a frame with its header.

    Raises:
        FrameError: the frame is larger than MAX_FRAME_BYTES.
    """
    body = frame.SerializeToString()
    if len(body) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
    return HEADER.pack(MAGIC, len(body)) + body


class FrameDecoder:
    """Turns a byte stream into frames; skips garbage up to the next magic."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped_bytes = 0

    def reset(self) -> None:
        """Forgets a partial frame (the peer went away in the middle of it)."""
        self._buf.clear()

    def feed(self, data: bytes) -> list[pb.Frame]:
        """Adds bytes and returns every complete frame they finish."""
        self._buf += data
        frames: list[pb.Frame] = []
        while True:
            start = self._buf.find(MAGIC)
            if start < 0:
                # Keep a possible magic prefix at the end, drop the rest.
                keep = len(MAGIC) - 1
                self.skipped_bytes += max(0, len(self._buf) - keep)
                del self._buf[: max(0, len(self._buf) - keep)]
                return frames
            if start:
                self.skipped_bytes += start
                del self._buf[:start]
            if len(self._buf) < HEADER.size:
                return frames
            _, length = HEADER.unpack_from(self._buf)
            if length > MAX_FRAME_BYTES:
                # Not a real header: skip this magic and look for the next.
                self.skipped_bytes += 1
                del self._buf[:1]
                continue
            end = HEADER.size + length
            if len(self._buf) < end:
                return frames
            frame = pb.Frame()
            try:
                frame.ParseFromString(bytes(self._buf[HEADER.size : end]))
            except Exception:
                self.skipped_bytes += 1
                del self._buf[:1]
                continue
            del self._buf[:end]
            frames.append(frame)
