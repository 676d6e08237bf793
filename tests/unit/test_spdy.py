"""SPDY/3.1 framing and header compression: round trips however the bytes are split, the shared
compression context, and hostile input rejected with a sentence."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest

from kvmsandbox.cri.streaming import spdy

KUBELET_EXEC = {
    "streamtype": ["stdout"],
    "connection": ["Upgrade"],
    "x-stream-protocol-version": ["v4.channel.k8s.io", "v3.channel.k8s.io"],
}

ALL_FRAMES: list[spdy.Frame] = [
    spdy.SynStream(1, KUBELET_EXEC, associated_to=0, priority=3, fin=False, unidirectional=True),
    spdy.SynReply(1, {"status": ["200"]}, fin=True),
    spdy.HeadersFrame(3, {"port": ["8080"], "requestid": ["0"]}),
    spdy.DataFrame(1, b"hello \x00 world" * 100, fin=True),
    spdy.DataFrame(5, b""),
    spdy.RstStream(7, spdy.CANCEL),
    spdy.Settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20, 4: 100}),
    spdy.Ping(2),
    spdy.GoAway(9, 0),
    spdy.WindowUpdate(1, 65536),
]


def test_the_dictionary_is_the_one_of_the_spdy3_draft() -> None:
    assert len(spdy.DICTIONARY) == 1423
    assert hashlib.sha256(spdy.DICTIONARY).hexdigest() == (
        "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
    )


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_every_frame_survives_a_round_trip_however_it_is_split(chunk: int) -> None:
    encoder, decoder = spdy.Encoder(), spdy.Decoder()
    wire = b"".join(encoder.encode(f) for f in ALL_FRAMES)
    got: list[spdy.Frame] = []
    for i in range(0, len(wire), chunk):
        got += decoder.feed(wire[i : i + chunk])
    assert got == ALL_FRAMES


def test_header_blocks_share_one_compression_context_per_direction() -> None:
    encoder, decoder = spdy.Encoder(), spdy.Decoder()
    first = encoder.encode(spdy.SynStream(1, KUBELET_EXEC))
    second = encoder.encode(spdy.SynStream(3, KUBELET_EXEC))
    assert len(second) < len(first)  # the second refers back to the first
    assert decoder.feed(first + second) == [spdy.SynStream(1, KUBELET_EXEC), spdy.SynStream(3, KUBELET_EXEC)]
    # A decoder that missed the first block cannot read the second: the context is the stream's.
    with pytest.raises(spdy.SpdyError, match=r"does not inflate|does not parse"):
        spdy.Decoder().feed(second)


def test_a_block_from_another_zlib_with_the_dictionary_decodes() -> None:
    """As a Go peer (its own zlib, the same dictionary, a sync flush per block) writes it."""
    raw = struct.pack(">I", 1) + struct.pack(">I", 4) + b"port" + struct.pack(">I", 2) + b"80"
    deflate = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    block = deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)
    payload = struct.pack(">IIBB", 5, 0, 0, 0) + block
    frame = struct.pack(">HHB", 0x8003, spdy.SYN_STREAM, 0) + len(payload).to_bytes(3, "big") + payload
    assert spdy.Decoder().feed(frame) == [spdy.SynStream(5, {"port": ["80"]})]


def control(kind: int, payload: bytes, version: int = 3) -> bytes:
    return struct.pack(">HHB", 0x8000 | version, kind, 0) + len(payload).to_bytes(3, "big") + payload


def block(raw: bytes) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    return deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)


def header_pairs(*pairs: tuple[bytes, bytes], count: int | None = None) -> bytes:
    out = struct.pack(">I", len(pairs) if count is None else count)
    for name, value in pairs:
        out += struct.pack(">I", len(name)) + name + struct.pack(">I", len(value)) + value
    return out


SYN = struct.pack(">IIBB", 1, 0, 0, 0)


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (control(spdy.PING, b"\0\0\0\1", version=2), "SPDY version 2"),
        (b"\x00\x00\x00\x00\x00\x00\x00\x01x", "data frame on stream 0"),
        (control(spdy.SYN_STREAM, struct.pack(">IIBB", 0, 0, 0, 0) + block(header_pairs())), "stream 0"),
        (control(spdy.RST_STREAM, b"\0\0"), "too short"),
        (control(spdy.SETTINGS, struct.pack(">I", 1_000_000)), "SETTINGS frame announcing 1000000"),
        (control(spdy.SYN_STREAM, SYN + block(b"\0" * 10_000_000)), "inflates to more than"),
        (control(spdy.SYN_STREAM, SYN + block(header_pairs(count=100_000))), "100000 headers"),
        (control(spdy.SYN_STREAM, SYN + block(header_pairs((b"Port", b"1")))), "not lower-case"),
        (control(spdy.SYN_STREAM, SYN + block(header_pairs((b"a", b"1"), (b"a", b"2")))), "repeated"),
        (control(spdy.SYN_STREAM, SYN + block(header_pairs((b"a", b"1"), count=2))), "does not parse"),
        (control(spdy.SYN_STREAM, SYN + block(header_pairs((b"a", b"1")) + b"junk")), "after the last header"),
        (control(spdy.SYN_STREAM, SYN + block(struct.pack(">II", 1, 1 << 30))), "longer than its block"),
        (control(spdy.SYN_STREAM, SYN + b"\x00garbage that is no deflate stream"), "does not inflate"),
        # Refused on the 8 header bytes alone, before any payload is buffered.
        (struct.pack(">HHB", 0x8003, spdy.SYN_STREAM, 0) + (1 << 20).to_bytes(3, "big"), "at most"),
        (struct.pack(">IB", 1, 0) + (2 << 20).to_bytes(3, "big"), "data frame of 2097152 bytes"),
    ],
)
def test_malformed_frames_are_refused_with_a_sentence(wire: bytes, words: str) -> None:
    with pytest.raises(spdy.SpdyError, match=words):
        spdy.Decoder().feed(wire)


def test_unknown_control_frames_are_skipped_and_partial_frames_wait() -> None:
    decoder = spdy.Decoder()
    assert decoder.feed(control(0x77, b"whatever")) == []
    ping = control(spdy.PING, b"\0\0\0\x05")
    assert decoder.feed(ping[:9]) == []
    assert decoder.feed(ping[9:]) == [spdy.Ping(5)]


def test_frames_that_cannot_be_written_are_refused() -> None:
    encoder = spdy.Encoder()
    with pytest.raises(spdy.SpdyError, match="stream id 0"):
        encoder.encode(spdy.DataFrame(0, b"x"))
    with pytest.raises(spdy.SpdyError, match="over"):
        encoder.encode(spdy.DataFrame(1, b"x" * (spdy.MAX_PAYLOAD + 1)))
