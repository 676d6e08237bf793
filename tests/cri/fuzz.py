"""Random and malformed CRI requests, made from the API's own descriptors: every field of every
request message filled with hostile values (huge strings, NUL bytes, path traversal, absolute
paths, control characters, negative and huge numbers, unknown enum values, long lists and maps),
with a fixed seed so a failure can be replayed. Used by the fuzz test and ``benchmarks/fuzz.py``."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri

STRINGS = [
    "",
    "a",
    "web",
    "\x00",
    "nul\x00inside",
    "../../../../etc/kvmsandbox-fuzz",
    "/etc/kvmsandbox-fuzz",
    "/",
    ".",
    "..",
    "line\nbreak",
    "tab\there",
    "\r",
    "ünïcödé-名前",
    "-leading-dash",
    "UPPER_case",
    "a" * 64,
    "b" * 254,
    "c" * 5000,
    "127.0.0.1",
    "::1",
    "not:an:image@sha256:zz",
    "127.0.0.1:1/fuzz/image:tag",
    "%s%n%x",
    "SIGKILL",
    "99999999999",
]
INTS = [0, 1, -1, 2, 255, 65535, 65536, 2**31 - 1, -(2**31), 2**32, 2**63 - 1, -(2**63), 2**64 - 1]
SKIPPED = {
    "GetContainerEvents",
    "StreamPodSandboxes",
    "StreamContainers",
    "StreamContainerStats",
    "StreamPodSandboxStats",
    "StreamPodSandboxMetrics",
    "StreamImages",
}


F = FieldDescriptor
UNSIGNED = {F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_FIXED32, F.TYPE_FIXED64}
BITS_32 = {F.TYPE_INT32, F.TYPE_UINT32, F.TYPE_SINT32, F.TYPE_FIXED32, F.TYPE_SFIXED32, F.TYPE_ENUM}


@dataclass(frozen=True)
class Call:
    service: str
    method: MethodDescriptor
    request: Message


class Fuzzer:
    def __init__(self, seed: int, big_strings: bool = True) -> None:
        self.rng = random.Random(seed)
        self.big = big_strings

    def string(self) -> str:
        r = self.rng.random()
        if r < 0.7:
            return self.rng.choice(STRINGS)
        if r < 0.8 and self.big:
            return self.rng.choice("xyz\x00/.") * self.rng.choice([1024, 65536, 1 << 20])
        return "".join(chr(self.rng.randrange(0, 0x250)) for _ in range(self.rng.randrange(1, 40)))

    def integer(self, field: FieldDescriptor) -> int:
        value = self.rng.choice(INTS) if self.rng.random() < 0.8 else self.rng.randrange(-1000, 100000)
        unsigned = field.type in UNSIGNED
        bits = 32 if field.type in BITS_32 else 64
        lo, hi = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return min(max(value, lo), hi)

    def scalar(self, field: FieldDescriptor) -> object:
        t = field.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.string()
        if t == FieldDescriptor.TYPE_BYTES:
            return self.string().encode("utf-8", "surrogatepass")
        if t == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.rng.choice([0.0, -1.0, 1e300, float("inf")]) if t == FieldDescriptor.TYPE_DOUBLE else 1.5
        return self.integer(field)

    def fill(self, msg: Message, depth: int = 0, in_list: bool = False) -> Message:
        """Fills some fields of ``msg`` (huge strings only outside lists, so a message stays within
        a few MiB)."""
        big, self.big = self.big, self.big and not in_list
        try:
            return self._fill(msg, depth, in_list)
        finally:
            self.big = big

    def _fill(self, msg: Message, depth: int, in_list: bool) -> Message:
        for field in msg.DESCRIPTOR.fields:
            if self.rng.random() < (0.4 if depth < 3 else 0.9):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                mapping = getattr(msg, field.name)
                value_field = field.message_type.fields_by_name["value"]
                self.big = False
                for _ in range(self.rng.choice([1, 2, 3, 200])):
                    key = self.string()[:300]
                    if value_field.message_type is not None:
                        self.fill(mapping[key], depth + 1, in_list=True)
                    else:
                        mapping[key] = self.scalar(value_field)
                continue
            if field.is_repeated:
                items = getattr(msg, field.name)
                self.big = False
                for _ in range(self.rng.choice([1, 2, 3, 50, 2000] if depth < 2 else [1, 2])):
                    if field.message_type is not None:
                        self.fill(items.add(), depth + 1, in_list=True)
                    else:
                        items.append(self.scalar(field))
                continue
            if field.message_type is not None:
                if depth < 5:
                    self.fill(getattr(msg, field.name), depth + 1, in_list)
                continue
            setattr(msg, field.name, self.scalar(field))
        return msg

    def calls(self, n: int) -> Iterator[Call]:
        services = [cri.DESCRIPTOR.services_by_name[s] for s in ("RuntimeService", "ImageService")]
        methods = [
            (s.name, m)
            for s in services
            for m in s.methods
            if not m.server_streaming and not m.client_streaming and m.name not in SKIPPED
        ]
        for _ in range(n):
            service, method = self.rng.choice(methods)
            request = self.fill(GetMessageClass(method.input_type)())
            if method.name == "RunPodSandbox":
                # Never a pod that boots: an unknown handler, or a field the edge must refuse.
                if self.rng.random() < 0.5:
                    request.runtime_handler = "fuzz-" + str(self.rng.randrange(10**6))  # type: ignore[attr-defined]
                else:
                    request.config.metadata.name = "nul\x00" + self.string()[:100]  # type: ignore[attr-defined]
            if method.name == "PullImage":
                # No registry but a closed loopback port: a pull fails fast, never waits on DNS.
                request.image.image = self.rng.choice(  # type: ignore[attr-defined]
                    ["127.0.0.1:1/fuzz/image:tag", "not a reference", "\x00", "a" * 5000, ""]
                )
            yield Call(service, method, request)
