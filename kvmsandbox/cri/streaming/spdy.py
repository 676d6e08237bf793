"""SPDY/3.1 framing: what kubelet and crictl speak to a runtime's streaming server after an HTTP
upgrade (``Upgrade: SPDY/3.1``). Pure encoding and decoding, no I/O: the server feeds bytes in and
writes the bytes ``encode`` returns.

A frame is 8 bytes of header and a payload. Control frames (first bit set) carry version 3, a type,
flags and a 24-bit length; data frames carry a 31-bit stream id, flags and a 24-bit length.
Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are name/value pairs compressed with zlib and the
SPDY/3 dictionary, one compression context per direction for the whole connection, each block
ended with a sync flush.

The peer is untrusted: every length is bounded (a frame's payload, a header block once
inflated, the number and size of headers), and anything malformed raises SpdyError with a
sentence that says what was wrong; the caller ends the connection.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
# RST_STREAM status codes (SPDY/3 section 2.6.3).
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM = 1, 2, 3
CANCEL, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 5, 6, 7
# SETTINGS id of the initial flow-control window.
SETTINGS_INITIAL_WINDOW_SIZE = 7
DEFAULT_WINDOW = 64 * 1024

MAX_PAYLOAD = (1 << 24) - 1
"""The largest payload a frame can declare."""
MAX_HEADER_BLOCK = 256 * 1024
"""The most an inflated header block may hold (kubelet's are a few hundred bytes)."""
MAX_HEADERS = 256
MAX_CONTROL_FRAME = MAX_HEADER_BLOCK + 64
"""A control frame's payload is at most a header block and its fixed fields."""
MAX_DATA_FRAME = 1 << 20
"""Data frames from clients are 32 KiB (Go's io.Copy): a megabyte is plenty."""
MAX_SETTINGS = 64

# The SPDY/3 header compression dictionary (spdy-protocol-draft3, section 2.6.10.1): these words,
# each after its length as 4 bytes big-endian, then the tail as is.
_DICTIONARY_WORDS = (
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICTIONARY_WORDS) + _DICTIONARY_TAIL.encode()


class SpdyError(Exception):
    """The peer sent something that is not SPDY/3.1 as this server speaks it."""


Headers = dict[str, list[str]]


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Headers
    associated_to: int = 0
    priority: int = 0
    fin: bool = False
    unidirectional: bool = False


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    values: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = 0


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


Frame = DataFrame | SynStream | SynReply | HeadersFrame | RstStream | Settings | Ping | GoAway | WindowUpdate


class Encoder:
    """Turns frames into bytes; one per connection and direction (its header compression context
    spans the connection)."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def encode(self, frame: Frame) -> bytes:
        """The frame's bytes. Raises SpdyError for a frame that cannot be written (too long, a bad id)."""
        if isinstance(frame, DataFrame):
            _check_id(frame.stream_id)
            if len(frame.data) > MAX_PAYLOAD:
                raise SpdyError(f"a data frame of {len(frame.data)} bytes is over {MAX_PAYLOAD}")
            head = struct.pack(">IB", frame.stream_id, FLAG_FIN if frame.fin else 0)
            return head + len(frame.data).to_bytes(3, "big") + frame.data
        kind, flags, payload = self._control(frame)
        if len(payload) > MAX_PAYLOAD:
            raise SpdyError(f"a control frame of {len(payload)} bytes is over {MAX_PAYLOAD}")
        return struct.pack(">HHB", 0x8000 | VERSION, kind, flags) + len(payload).to_bytes(3, "big") + payload

    def _control(self, frame: Frame) -> tuple[int, int, bytes]:
        if isinstance(frame, SynStream):
            _check_id(frame.stream_id)
            flags = (FLAG_FIN if frame.fin else 0) | (FLAG_UNIDIRECTIONAL if frame.unidirectional else 0)
            head = struct.pack(">IIBB", frame.stream_id, frame.associated_to, (frame.priority & 7) << 5, 0)
            return SYN_STREAM, flags, head + self._block(frame.headers)
        if isinstance(frame, SynReply | HeadersFrame):
            _check_id(frame.stream_id)
            kind = SYN_REPLY if isinstance(frame, SynReply) else HEADERS
            return kind, FLAG_FIN if frame.fin else 0, struct.pack(">I", frame.stream_id) + self._block(frame.headers)
        if isinstance(frame, RstStream):
            return RST_STREAM, 0, struct.pack(">II", frame.stream_id & 0x7FFFFFFF, frame.status)
        if isinstance(frame, Settings):
            entries = b"".join(struct.pack(">II", key & 0xFFFFFF, value) for key, value in frame.values.items())
            return SETTINGS, 0, struct.pack(">I", len(frame.values)) + entries
        if isinstance(frame, Ping):
            return PING, 0, struct.pack(">I", frame.ping_id)
        if isinstance(frame, GoAway):
            return GOAWAY, 0, struct.pack(">II", frame.last_good_stream_id & 0x7FFFFFFF, frame.status)
        if isinstance(frame, WindowUpdate):
            return WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id & 0x7FFFFFFF, frame.delta & 0x7FFFFFFF)
        raise SpdyError(f"cannot encode {frame!r}")

    def _block(self, headers: Headers) -> bytes:
        raw = [struct.pack(">I", len(headers))]
        for name, values in headers.items():
            key, value = name.lower().encode(), "\0".join(values).encode()
            raw += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
        return self._deflate.compress(b"".join(raw)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)


def _check_id(stream_id: int) -> None:
    if not 0 < stream_id < 1 << 31:
        raise SpdyError(f"stream id {stream_id} is outside 1..2^31-1")


class Decoder:
    """Turns the bytes a peer sends into frames, however they are split; one per connection."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._inflate = zlib.decompressobj(15, DICTIONARY)

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame complete after ``data``; a partial frame waits for more.

        Raises:
            SpdyError: a frame is malformed, too large or of another SPDY version.
        """
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 8:
            length = int.from_bytes(self._buffer[5:8], "big")
            # Checked on the 8 header bytes, before a large payload is buffered.
            control = bool(self._buffer[0] & 0x80)
            if control and int.from_bytes(self._buffer[0:2], "big") & 0x7FFF != VERSION:
                raise SpdyError(
                    f"a control frame of SPDY version {int.from_bytes(self._buffer[0:2], 'big') & 0x7FFF}; "
                    "this server speaks version 3"
                )
            limit = MAX_CONTROL_FRAME if control else MAX_DATA_FRAME
            if length > limit:
                raise SpdyError(f"a {'control' if control else 'data'} frame of {length} bytes (at most {limit})")
            if len(self._buffer) < 8 + length:
                break
            head, payload = bytes(self._buffer[:8]), bytes(self._buffer[8 : 8 + length])
            del self._buffer[: 8 + length]
            frame = self._frame(head, payload)
            if frame is not None:
                frames.append(frame)
        return frames

    def _frame(self, head: bytes, payload: bytes) -> Frame | None:
        first, kind, flags = struct.unpack(">HHB", head[:5])
        if not first & 0x8000:
            stream_id = struct.unpack(">I", head[:4])[0] & 0x7FFFFFFF
            if stream_id == 0:
                raise SpdyError("a data frame on stream 0")
            return DataFrame(stream_id, payload, bool(flags & FLAG_FIN))
        if first & 0x7FFF != VERSION:
            raise SpdyError(f"a control frame of SPDY version {first & 0x7FFF}; this server speaks version 3")
        try:
            return self._control(kind, flags, payload)
        except struct.error:
            raise SpdyError(f"control frame of type {kind} is too short ({len(payload)} bytes)") from None

    def _control(self, kind: int, flags: int, payload: bytes) -> Frame | None:
        fin = bool(flags & FLAG_FIN)
        if kind == SYN_STREAM:
            stream_id, associated, priority = struct.unpack(">IIB", payload[:9])
            return SynStream(
                _stream(stream_id), self._block(payload[10:]), associated & 0x7FFFFFFF, priority >> 5,
                fin, bool(flags & FLAG_UNIDIRECTIONAL),
            )  # fmt: skip
        if kind in (SYN_REPLY, HEADERS):
            stream_id = _stream(struct.unpack(">I", payload[:4])[0])
            block = self._block(payload[4:])
            return SynReply(stream_id, block, fin) if kind == SYN_REPLY else HeadersFrame(stream_id, block, fin)
        if kind == RST_STREAM:
            stream_id, status = struct.unpack(">II", payload[:8])
            return RstStream(stream_id & 0x7FFFFFFF, status)
        if kind == SETTINGS:
            (count,) = struct.unpack(">I", payload[:4])
            if count > MAX_SETTINGS or len(payload) < 4 + 8 * count:
                raise SpdyError(f"a SETTINGS frame announcing {count} entries in {len(payload)} bytes")
            values = {}
            for i in range(count):
                key, value = struct.unpack(">II", payload[4 + 8 * i : 12 + 8 * i])
                values[key & 0xFFFFFF] = value
            return Settings(values)
        if kind == PING:
            return Ping(struct.unpack(">I", payload[:4])[0])
        if kind == GOAWAY:
            last, status = (
                struct.unpack(">II", payload[:8]) if len(payload) >= 8 else (*struct.unpack(">I", payload[:4]), 0)
            )
            return GoAway(last & 0x7FFFFFFF, status)
        if kind == WINDOW_UPDATE:
            stream_id, delta = struct.unpack(">II", payload[:8])
            return WindowUpdate(stream_id & 0x7FFFFFFF, delta & 0x7FFFFFFF)
        return None  # unknown control frames are ignored, as the protocol says

    def _block(self, compressed: bytes) -> Headers:
        try:
            raw = self._inflate.decompress(compressed, MAX_HEADER_BLOCK + 1)
        except zlib.error as e:
            raise SpdyError(f"a header block that does not inflate ({e})") from None
        if len(raw) > MAX_HEADER_BLOCK or self._inflate.unconsumed_tail:
            raise SpdyError(f"a header block inflates to more than {MAX_HEADER_BLOCK} bytes")
        return _pairs(raw)


def _stream(stream_id: int) -> int:
    stream_id &= 0x7FFFFFFF
    if stream_id == 0:
        raise SpdyError("a stream frame for stream 0")
    return stream_id


def _pairs(raw: bytes) -> Headers:
    """Name/value pairs of an inflated header block: lower-case names, each once, values split on NUL."""
    try:
        (count,) = struct.unpack(">I", raw[:4])
        if count > MAX_HEADERS:
            raise SpdyError(f"a header block with {count} headers (at most {MAX_HEADERS})")
        headers: Headers = {}
        pos = 4
        for _ in range(count):
            name, pos = _string(raw, pos)
            value, pos = _string(raw, pos)
            key = name.decode("ascii")
            if not key or key != key.lower() or key in headers:
                raise SpdyError(f"header name {key!r} is empty, not lower-case or repeated")
            headers[key] = value.decode("utf-8", errors="replace").split("\0")
    except (struct.error, UnicodeDecodeError):
        raise SpdyError("a header block that does not parse") from None
    if pos != len(raw):
        raise SpdyError(f"{len(raw) - pos} bytes after the last header")
    return headers


def _string(raw: bytes, pos: int) -> tuple[bytes, int]:
    (length,) = struct.unpack(">I", raw[pos : pos + 4])
    end = pos + 4 + length
    if end > len(raw):
        raise SpdyError("a header longer than its block")
    return raw[pos + 4 : end], end
