"""The NIC commands of a sandbox's network done over rtnetlink in the agent's own process.

Each ``ip`` command the network plan holds (``network.interface_commands``, ``route_commands``) is
a fork of the agent plus two execs of busybox; under TCG a fresh guest translates all of that code
first, ~70 ms per command. ``run`` carries out the plan's commands it knows as one netlink request
each, and hands anything else to ``fallback``. Errors carry the kernel's words (``File exists`` for
an address that is there already, as ``ip`` says it).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from kvmsandbox.agent.guest.errors import AgentFault

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 0x1, 0x4, 0x200, 0x400, 0x100
NLMSG_ERROR = 2
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
IP_PREFIX = ("/bin/busybox", "ip")
SYSCTL_PREFIX = ("/bin/busybox", "sysctl", "-w")
PROC_SYS = Path("/proc/sys")
RECV_BYTES = 65536


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("HH", length, kind) + payload + b"\0" * (-length % 4)


def _request(kind: int, flags: int, body: bytes, seq: int = 1) -> bytes:
    return struct.pack("IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0) + body


def _talk(message: bytes, what: str) -> None:
    """Sends one request and reads its acknowledgement. Raises AgentFault with the kernel's words."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.settimeout(10.0)
        try:
            sock.send(message)
            answer = sock.recv(RECV_BYTES)
        except OSError as e:
            raise AgentFault(f"{what}: netlink: {e}") from None
    offset = 0
    while offset + 16 <= len(answer):
        length, kind = struct.unpack_from("IH", answer, offset)
        if kind == NLMSG_ERROR and offset + 20 <= len(answer):
            (code,) = struct.unpack_from("i", answer, offset + 16)
            if code:
                raise AgentFault(f"{what}: {os.strerror(-code)}")
            return
        if length < 16:
            break
        offset += (length + 3) & ~3
    raise AgentFault(f"{what}: netlink gave no acknowledgement")


def _index(name: str, what: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise AgentFault(f"{what}: no interface {name!r}") from None


def set_link(name: str, *, address: str = "", new_name: str = "", mtu: int = 0, up: bool | None = None) -> None:
    """One change of link ``name``: its MAC, name, MTU or state. Raises AgentFault."""
    what = f"link {name}"
    attrs = b""
    if address:
        attrs += _attr(IFLA_ADDRESS, bytes.fromhex(address.replace(":", "")))
    if new_name:
        attrs += _attr(IFLA_IFNAME, new_name.encode() + b"\0")
    if mtu:
        attrs += _attr(IFLA_MTU, struct.pack("I", mtu))
    change = IFF_UP if up is not None else 0
    flags = IFF_UP if up else 0
    body = struct.pack("BxHiII", socket.AF_UNSPEC, 0, _index(name, what), flags, change) + attrs
    _talk(_request(RTM_NEWLINK, 0, body), what)


def add_address(name: str, cidr: str) -> None:
    """Adds ``cidr`` (address/prefix) to link ``name``. Raises AgentFault (``File exists``)."""
    what = f"address {cidr} on {name}"
    iface = ipaddress.ip_interface(cidr)
    family = socket.AF_INET6 if iface.version == 6 else socket.AF_INET
    packed = iface.ip.packed
    body = struct.pack("BBBBI", family, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, _index(name, what))
    body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    _talk(_request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body), what)


def replace_route(destination: str, gateway: str, name: str, ipv6: bool) -> None:
    """``ip route replace``: ``destination`` ("default" or a prefix) through ``gateway`` (or on
    the link) on ``name``. Raises AgentFault."""
    what = f"route {destination} on {name}"
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    net = ipaddress.ip_network(("::/0" if ipv6 else "0.0.0.0/0") if destination == "default" else destination)
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    body = struct.pack("BBBBBBBBI", family, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
    if net.prefixlen:
        body += _attr(RTA_DST, net.network_address.packed)
    if gateway:
        body += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
    body += _attr(RTA_OIF, struct.pack("I", _index(name, what)))
    _talk(_request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body), what)


def _link_command(args: Sequence[str]) -> bool:
    # link set dev NAME (address MAC | name NEW | mtu N | up | down)
    if len(args) not in (5, 6) or tuple(args[:3]) != ("link", "set", "dev"):
        return False
    name, rest = args[3], list(args[4:])
    if rest == ["up"] or rest == ["down"]:
        set_link(name, up=rest == ["up"])
    elif len(rest) == 2 and rest[0] == "address":
        set_link(name, address=rest[1])
    elif len(rest) == 2 and rest[0] == "name":
        set_link(name, new_name=rest[1])
    elif len(rest) == 2 and rest[0] == "mtu" and rest[1].isdigit():
        set_link(name, mtu=int(rest[1]))
    else:
        return False
    return True


def _route_command(args: Sequence[str]) -> bool:
    # [-6] route replace DEST [via GW] dev NAME
    ipv6 = bool(args) and args[0] == "-6"
    rest = list(args[1:] if ipv6 else args)
    if len(rest) < 5 or rest[:2] != ["route", "replace"] or rest[-2] != "dev":
        return False
    middle = rest[3:-2]
    if middle and (len(middle) != 2 or middle[0] != "via"):
        return False
    replace_route(rest[2], middle[1] if middle else "", rest[-1], ipv6)
    return True


def run(argv: Sequence[str], fallback: Callable[[Sequence[str]], None]) -> None:
    """Carries out one command of the network plan over netlink (or by writing /proc/sys), or
    passes it to ``fallback``. Raises AgentFault."""
    args = list(argv)
    try:
        if tuple(args[:2]) == IP_PREFIX:
            ip_args = args[2:]
            if _link_command(ip_args) or _route_command(ip_args):
                return
            if len(ip_args) == 5 and ip_args[:2] == ["addr", "add"] and ip_args[3] == "dev":
                add_address(ip_args[4], ip_args[2])
                return
        if tuple(args[:3]) == SYSCTL_PREFIX and len(args) == 4 and "=" in args[3]:
            key, _, value = args[3].partition("=")
            if ".." not in key and not key.startswith("/"):
                # The plan writes slashes (interface names may hold dots), as sysctl(8) reads them.
                (PROC_SYS / (key if "/" in key else key.replace(".", "/"))).write_text(value + "\n")
                return
    except (ValueError, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOENT:
            raise AgentFault(f"{' '.join(args)}: {e.strerror}") from None
        raise AgentFault(f"{' '.join(args)}: {e}") from None
    fallback(argv)
