"""The pod's network interfaces in the guest: found by MAC, renamed, addressed, brought up, then the
routes. Planned as busybox ``ip`` (and ``sysctl``) commands, carried out over rtnetlink in the
agent's own process (``netlink.run``; busybox only for a command it does not know)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kvmsandbox.agent.guest import log, netlink
from kvmsandbox.agent.guest.errors import AgentFault, InvalidArgument
from kvmsandbox.agent.v1 import agent_pb2 as pb

BUSYBOX = "/bin/busybox"
IP = (BUSYBOX, "ip")
SYS_CLASS_NET = Path("/sys/class/net")
# virtio_net probes its devices asynchronously: a NIC can appear a little after the agent starts.
NIC_WAIT_SECONDS = 5.0
NIC_POLL_SECONDS = 0.02
COMMAND_TIMEOUT = 10.0
IFNAMSIZ = 16
EXIT_MARK = "kvmsandbox-exit="

# Runs one command to completion; raises AgentFault (with the command and its stderr) if it fails.
Runner = Callable[[Sequence[str]], None]


def _read_mac(dev: Path) -> str:
    try:
        return (dev / "address").read_text().strip().lower()
    except OSError:
        return ""


def find_interface_by_mac(
    mac: str, sys_class_net: Path = SYS_CLASS_NET, timeout: float = NIC_WAIT_SECONDS, also: str = ""
) -> str:
    """The kernel name of the NIC whose address is ``mac`` (or ``also``), waiting up to ``timeout``
    seconds for it.

    Raises:
        AgentFault: no such NIC appeared; the message lists the interfaces seen.
    """
    wanted = mac.strip().lower()
    accepted = {wanted, also.strip().lower()} - {""}
    deadline = time.monotonic() + timeout
    while True:
        try:
            devs = sorted(sys_class_net.iterdir())
        except OSError:
            devs = []
        seen = {dev.name: _read_mac(dev) for dev in devs}
        for name, address in seen.items():
            if address in accepted:
                return name
        if time.monotonic() >= deadline:
            listed = ", ".join(f"{n} ({a or '?'})" for n, a in seen.items()) or "none"
            raise AgentFault(f"no network interface with MAC {wanted} appeared within {timeout:g}s; seen: {listed}")
        time.sleep(NIC_POLL_SECONDS)


def _is_ipv6(address: str) -> bool:
    return ":" in address


def _check_ifname(name: str) -> None:
    if not name or len(name) >= IFNAMSIZ or name in (".", "..") or any(c in name for c in "/: \t\n"):
        raise InvalidArgument(f"invalid interface name {name!r}")


def interface_commands(current_name: str, iface: pb.Interface, current_mac: str = "") -> list[list[str]]:
    """The commands that give NIC ``current_name`` (whose address is ``current_mac``) the wanted
    name, MTU and addresses, then bring it up; a clone's NIC (still at ``iface.template_mac``) gets
    the pod's MAC first.

    IPv6 addresses skip duplicate address detection (busybox ``ip`` has no ``nodad``: the
    interface's ``accept_dad`` is turned off instead), so they are usable at once.

    Raises:
        InvalidArgument: a bad interface name or an address without a prefix length.
    """
    name = iface.name or current_name
    _check_ifname(name)
    for address in iface.addresses:
        if "/" not in address or address.startswith("-"):
            raise InvalidArgument(f"interface {name}: address {address!r} needs a prefix length, e.g. 10.88.0.5/16")
    cmds: list[list[str]] = []
    if iface.template_mac and current_mac.lower() == iface.template_mac.lower():
        # A clone's NIC: the pod's address first (the device learns it through its control queue).
        cmds.append([*IP, "link", "set", "dev", current_name, "address", iface.mac.lower()])
    if name != current_name:
        cmds.append([*IP, "link", "set", "dev", current_name, "down"])
        cmds.append([*IP, "link", "set", "dev", current_name, "name", name])
    if iface.mtu:
        cmds.append([*IP, "link", "set", "dev", name, "mtu", str(iface.mtu)])
    if any(_is_ipv6(a) for a in iface.addresses):
        cmds.append([BUSYBOX, "sysctl", "-w", f"net/ipv6/conf/{name}/accept_dad=0"])
    cmds += [[*IP, "addr", "add", address, "dev", name] for address in iface.addresses]
    cmds.append([*IP, "link", "set", "dev", name, "up"])
    return cmds


def route_commands(routes: Sequence[pb.Route], default_dev: str) -> list[list[str]]:
    """``ip route replace`` commands (idempotent) for ``routes``; a route without an interface uses
    ``default_dev``.

    Raises:
        InvalidArgument: a route has no destination, or no interface to go through.
    """
    cmds: list[list[str]] = []
    for route in routes:
        dest = route.destination
        if not dest or dest.startswith("-"):
            raise InvalidArgument(f"route without a destination: {route}")
        dev = route.interface or default_dev
        if not dev:
            raise InvalidArgument(f"route to {dest} names no interface and there is none to default to")
        _check_ifname(dev)
        ipv6 = _is_ipv6(dest) or (dest == "default" and _is_ipv6(route.gateway))
        if dest in ("0.0.0.0/0", "::/0"):
            dest = "default"
        cmd = [*IP, "-6"] if ipv6 else [*IP]
        cmd += ["route", "replace", dest]
        if route.gateway:
            cmd += ["via", route.gateway]
        cmds.append([*cmd, "dev", dev])
    return cmds


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> None:
    """Runs ``argv`` under a busybox shell that prints its exit status.

    The agent's reaper collects every child's exit status (``waitpid(-1)``), so ``subprocess``
    cannot see it (it reports 0 when the status was taken): the shell, which waits for its own
    child, writes it to stdout instead.

    Raises:
        AgentFault: the command could not start, timed out or failed; with its stderr.
    """
    import subprocess  # only sandboxes with a network pay for importing it

    shown = " ".join(argv)
    wrapped = [BUSYBOX, "sh", "-c", f'"$@"; echo "{EXIT_MARK}$?"', "sh", *argv]
    try:
        proc = subprocess.run(
            wrapped, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise AgentFault(f"{shown}: did not finish within {timeout:g}s") from None
    except OSError as e:
        raise AgentFault(f"{shown}: cannot run: {e}") from None
    status = proc.stdout.rstrip("\n").rpartition("\n")[2]
    if status != f"{EXIT_MARK}0":
        code = status.removeprefix(EXIT_MARK) if status.startswith(EXIT_MARK) else "unknown"
        raise AgentFault(f"{shown}: failed (exit status {code}): {proc.stderr.strip() or 'no error output'}")


def _already_done(cmd: Sequence[str], error: AgentFault) -> bool:
    """An address that exists already: CreateSandbox is being retried."""
    return tuple(cmd[:4]) == (*IP, "addr", "add") and "File exists" in str(error)


def run_planned(argv: Sequence[str]) -> None:
    """A command of the plan, over netlink in this process where it can be (``netlink.run``)."""
    netlink.run(argv, run_command)


def configure_network(
    interfaces: Sequence[pb.Interface],
    routes: Sequence[pb.Route],
    run: Runner = run_planned,
    sys_class_net: Path = SYS_CLASS_NET,
    wait: float = NIC_WAIT_SECONDS,
) -> None:
    """Configures every interface (found by MAC), then the routes; safe to repeat. Everything is
    checked before the first command runs.

    Raises:
        InvalidArgument: a malformed interface or route. AgentFault: a NIC is missing or a command failed.
    """
    start = time.monotonic()
    plan: list[list[str]] = []
    names: list[str] = []
    for iface in interfaces:
        if not iface.mac:
            raise InvalidArgument(f"interface {iface.name!r} has no MAC address")
        # A clone's NIC has its template's MAC, or the pod's already when CreateSandbox is retried.
        current = find_interface_by_mac(iface.mac, sys_class_net, wait, also=iface.template_mac)
        plan += interface_commands(current, iface, _read_mac(sys_class_net / current))
        names.append(iface.name or current)
    plan += route_commands(routes, names[0] if names else "")
    for cmd in plan:
        try:
            run(cmd)
        except AgentFault as e:
            if not _already_done(cmd, e):
                raise
    log.event("network-configured", interfaces=",".join(names), seconds=f"{time.monotonic() - start:.3f}")
