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
    """Turns a byte stream into frames.

    Lenient (the guest's side): garbage is skipped up to the next magic, at any point of the stream,
    since a new host connection on a virtio-serial port can begin with the tail of an older frame.

    Strict (the host's side, ``strict=True``; the guest is not trusted): garbage is skipped only
    before the first good frame of a connection, at most ``MAX_RESYNC_BYTES`` of it and
    ``MAX_RESYNC_CANDIDATES`` false starts; after that, anything but a well-formed frame raises
    FrameError, and the connection is over. Each byte costs at most one parse, however crafted.
    """

    MAX_RESYNC_BYTES = 2 * MAX_FRAME_BYTES
    MAX_RESYNC_CANDIDATES = 4

    def __init__(self, *, strict: bool = False) -> None:
        self._buf = bytearray()
        self._strict = strict
        self._synced = False
        self._false_starts = 0
        self.skipped_bytes = 0

    def reset(self) -> None:
        """Forgets a partial frame (the peer went away in the middle of it)."""
        self._buf.clear()

    def feed(self, data: bytes) -> list[pb.Frame]:
        """Adds bytes and returns every complete frame they finish.

        Raises:
            FrameError: (strict) the stream is not well-formed frames.
        """
        self._buf += data
        frames: list[pb.Frame] = []
        while True:
            if not self._skip_to_magic():
                return frames
            if len(self._buf) < HEADER.size:
                return frames
            _, length = HEADER.unpack_from(self._buf)
            if length > MAX_FRAME_BYTES:
                self._false_start(f"a frame of {length} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
                continue
            end = HEADER.size + length
            if len(self._buf) < end:
                return frames
            frame = pb.Frame()
            try:
                frame.ParseFromString(bytes(self._buf[HEADER.size : end]))
            except Exception:
                self._false_start(f"a frame of {length} bytes does not decode")
                continue
            del self._buf[:end]
            self._synced = True
            frames.append(frame)

    def _skip_to_magic(self) -> bool:
        """Drops what is before the next magic; False when there is none yet."""
        start = self._buf.find(MAGIC)
        if start == 0:
            return True
        if self._strict and self._synced and (start > 0 or len(self._buf) >= len(MAGIC)):
            raise FrameError("bytes between frames")
        # Keep a possible magic prefix at the end when there is no magic yet.
        drop = start if start > 0 else max(0, len(self._buf) - (len(MAGIC) - 1))
        self._skip(drop)
        return start > 0

    def _false_start(self, why: str) -> None:
        """A magic that does not begin a frame: skipped in lenient mode and while resyncing."""
        if self._strict:
            self._false_starts += 1
            if self._synced or self._false_starts > self.MAX_RESYNC_CANDIDATES:
                raise FrameError(why)
        self._skip(len(MAGIC))  # a magic cannot overlap itself: no frame starts inside it

    def _skip(self, n: int) -> None:
        self.skipped_bytes += n
        del self._buf[:n]
        if self._strict and self.skipped_bytes > self.MAX_RESYNC_BYTES:
            raise FrameError(f"no frame in the first {self.skipped_bytes} bytes")
