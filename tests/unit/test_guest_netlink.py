"""The agent's netlink path against the real kernel, in a throwaway network namespace (a veth): the plan a
clone's CreateSandbox makes (MAC, rename, MTU, addresses, routes) ends where ``ip`` would put it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.agent.guest.errors import AgentFault
from kvmsandbox.agent.guest.netlink import run

REPO = Path(__file__).resolve().parents[2]
PLAN = [
    ["/bin/busybox", "ip", "link", "set", "dev", "d0", "address", "52:54:00:aa:bb:cc"],
    ["/bin/busybox", "ip", "link", "set", "dev", "d0", "down"],
    ["/bin/busybox", "ip", "link", "set", "dev", "d0", "name", "eth0"],
    ["/bin/busybox", "ip", "link", "set", "dev", "eth0", "mtu", "1400"],
    ["/bin/busybox", "sysctl", "-w", "net/ipv6/conf/eth0/accept_dad=0"],
    ["/bin/busybox", "ip", "addr", "add", "10.88.0.5/16", "dev", "eth0"],
    ["/bin/busybox", "ip", "addr", "add", "fd00::5/64", "dev", "eth0"],
    ["/bin/busybox", "ip", "link", "set", "dev", "eth0", "up"],
    ["/bin/busybox", "ip", "route", "replace", "default", "via", "10.88.0.1", "dev", "eth0"],
    ["/bin/busybox", "ip", "route", "replace", "10.96.0.0/12", "dev", "eth0"],
    ["/bin/busybox", "ip", "-6", "route", "replace", "default", "via", "fd00::1", "dev", "eth0"],
]


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: it makes a network namespace")
    name = f"kvsb-nl-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # A veth pair whose other end is up: d0 gets a carrier once it is up itself.
        subprocess.run(["ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "d1", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(netns: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ip_json(netns: str, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True, check=True).stdout
    return list(json.loads(out))


def test_the_plan_over_netlink_ends_where_ip_puts_it(netns: str) -> None:
    code = (
        "from kvmsandbox.agent.guest.netlink import run\n"
        "def nothing(argv): raise SystemExit('fell back: ' + ' '.join(argv))\n"
        f"for argv in {PLAN!r}: run(argv, nothing)\n"
    )
    done = in_netns(netns, code)
    assert done.returncode == 0, done.stderr + done.stdout
    (link,) = [entry for entry in ip_json(netns, "link", "show") if entry["ifname"] == "eth0"]
    assert link["address"] == "52:54:00:aa:bb:cc" and link["mtu"] == 1400 and "UP" in link["flags"]  # type: ignore[operator]
    addresses = {
        (a["local"], a["prefixlen"])
        for entry in ip_json(netns, "addr", "show", "dev", "eth0")
        for a in entry["addr_info"]
    }  # type: ignore[union-attr]
    assert {("10.88.0.5", 16), ("fd00::5", 64)} <= addresses
    routes = {(r["dst"], r.get("gateway")) for r in ip_json(netns, "route", "show")}
    assert ("default", "10.88.0.1") in routes and ("10.96.0.0/12", None) in routes
    assert ("default", "fd00::1") in {(r["dst"], r.get("gateway")) for r in ip_json(netns, "-6", "route", "show")}
    # Retried: an address exists already, in the words ip uses; a route replace is idempotent.
    again = in_netns(netns, code.replace(f"for argv in {PLAN!r}", f"for argv in {PLAN[5:6]!r}"))
    assert again.returncode != 0 and "File exists" in again.stderr
    routes_again = in_netns(netns, code.replace(f"for argv in {PLAN!r}", f"for argv in {PLAN[8:]!r}"))
    assert routes_again.returncode == 0, routes_again.stderr


def test_what_netlink_does_not_do_goes_to_the_fallback() -> None:
    seen: list[list[str]] = []
    run(["/bin/busybox", "ip", "link", "add", "x", "type", "dummy"], lambda argv: seen.append(list(argv)))
    run(["/bin/busybox", "ip", "addr", "flush", "dev", "eth0"], lambda argv: seen.append(list(argv)))
    assert len(seen) == 2


def test_a_missing_interface_is_an_agent_fault_naming_it() -> None:
    with pytest.raises(AgentFault, match="no interface 'nosuch0'"):
        run(["/bin/busybox", "ip", "link", "set", "dev", "nosuch0", "up"], lambda argv: None)
    with pytest.raises(AgentFault, match=r"10\.0\.0\.0/33"):
        run(["/bin/busybox", "ip", "addr", "add", "10.0.0.0/33", "dev", "lo"], lambda argv: None)
