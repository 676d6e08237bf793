"""Thousands of random and malformed requests to every RPC of a real server (a fixed seed; set
KVMSANDBOX_FUZZ_REQUESTS for a longer run): no unhandled exception (INTERNAL "failed inside" or
UNKNOWN), no call over its deadline, no traceback in the server's log, no file made outside the
state dirs, the server's memory back where it was, and the server still answers and restarts."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from tests.cri.conftest import REPO, CriServer
from tests.cri.fuzz import Call, Fuzzer
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

REQUESTS = int(os.environ.get("KVMSANDBOX_FUZZ_REQUESTS", "3000"))
WARM_UP = 1000
CALL_DEADLINE = 15.0
WATCHED = [Path("/etc"), Path("/tmp"), Path("/var/log"), Path("/"), REPO]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def listing() -> set[str]:
    return {str(d / name) for d in WATCHED for name in os.listdir(d)}


def _send(stubs: dict[str, Any], calls: Iterable[Call]) -> tuple[collections.Counter[str], list[str]]:
    """Sends every call; returns the status codes seen and the calls that crashed the server."""
    codes: collections.Counter[str] = collections.Counter()
    crashes: list[str] = []
    for n, call in enumerate(calls):
        stub = getattr(stubs[call.service], call.method.name)
        started = time.monotonic()
        try:
            stub(call.request, timeout=CALL_DEADLINE)
            codes["OK"] += 1
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
            codes[code.name] += 1
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED) or "failed inside" in details:
                crashes.append(f"#{n} {call.method.name}: {code.name} {details[:300]}")
        assert time.monotonic() - started < CALL_DEADLINE + 1, f"#{n} {call.method.name} took too long"
    return codes, crashes


def test_random_requests_to_every_rpc(cri_server: CriServer) -> None:
    assert cri_server.process is not None and cri_server.channel is not None
    pid = cri_server.process.pid
    log_start = cri_server.log.stat().st_size
    stubs = {"RuntimeService": cri_server.runtime, "ImageService": cri_server.images}
    # Warm up with requests of the same kind: the gRPC server's threads and the allocator's arenas
    # reach their steady size; what the run adds beyond it is what requests leave behind.
    _send(stubs, Fuzzer(seed=1).calls(WARM_UP))
    rss_before, files_before = rss_kib(pid), listing()
    t0 = time.monotonic()
    codes, crashes = _send(stubs, Fuzzer(seed=20261129).calls(REQUESTS))
    elapsed = time.monotonic() - t0
    print(f"\n{REQUESTS} requests in {elapsed:.1f}s: {dict(codes.most_common())}")
    assert not crashes, "\n".join(crashes[:20])
    assert cri_server.runtime.Version(cri.VersionRequest()).runtime_name == "kvmsandbox"
    log = cri_server.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 : log.index("Traceback") + 3000]
    assert listing() == files_before
    assert not cri_server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items
    peak = rss_kib(pid)
    # What the allocator keeps after large requests goes back to the system within its trim period.
    settled = wait_until(
        lambda: (rss_kib(pid) - rss_before < 20 * 1024) and rss_kib(pid), 30, "the server's memory to settle"
    )
    print(f"server RSS {rss_before / 1024:.1f} MiB before, {peak / 1024:.1f} at the end, {settled / 1024:.1f} settled")
    cri_server.stop()
    cri_server.start()
    assert cri_server.runtime.Version(cri.VersionRequest()).runtime_name == "kvmsandbox"
