"""The guest agent's network setup without a VM: the ``ip`` commands it would run, finding NICs in a
fake sysfs, the run loop with a fake runner, and the hosts file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvmsandbox.agent.guest import sandbox
from kvmsandbox.agent.guest.errors import AgentFault, InvalidArgument
from kvmsandbox.agent.guest.network import (
    configure_network,
    find_interface_by_mac,
    interface_commands,
    route_commands,
    run_command,
)
from kvmsandbox.agent.guest.reaper import Reaper
from kvmsandbox.agent.v1 import agent_pb2 as pb

IP = ["/bin/busybox", "ip"]
MAC = "52:54:00:12:34:56"
HAVE_BUSYBOX = os.access("/bin/busybox", os.X_OK)


def make_nic(root: Path, name: str, mac: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "address").write_text(mac + "\n")


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys-class-net"
    make_nic(root, "lo", "00:00:00:00:00:00")
    make_nic(root, "enp0s3", MAC)
    return root


class FakeRun:
    """Records commands; fails those for which ``errors`` has a matching stderr."""

    def __init__(self, errors: dict[tuple[str, ...], str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.errors = errors or {}

    def __call__(self, argv: Sequence[str]) -> None:
        self.calls.append(list(argv))
        stderr = self.errors.get(tuple(argv))
        if stderr is not None:
            raise AgentFault(f"{' '.join(argv)}: failed (exit status 2): {stderr}")


# --- interface_commands ---


def test_interface_commands_rename_mtu_ipv4() -> None:
    iface = pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16"], mtu=1450)
    assert interface_commands("enp0s3", iface) == [
        [*IP, "link", "set", "dev", "enp0s3", "down"],
        [*IP, "link", "set", "dev", "enp0s3", "name", "eth0"],
        [*IP, "link", "set", "dev", "eth0", "mtu", "1450"],
        [*IP, "addr", "add", "10.88.0.5/16", "dev", "eth0"],
        [*IP, "link", "set", "dev", "eth0", "up"],
    ]


def test_interface_commands_same_name_and_mtu_zero_are_omitted() -> None:
    iface = pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16", "10.89.0.5/24"])
    assert interface_commands("eth0", iface) == [
        [*IP, "addr", "add", "10.88.0.5/16", "dev", "eth0"],
        [*IP, "addr", "add", "10.89.0.5/24", "dev", "eth0"],
        [*IP, "link", "set", "dev", "eth0", "up"],
    ]


def test_interface_commands_ipv6_turns_dad_off_before_adding() -> None:
    iface = pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16", "fd00::5/64"])
    assert interface_commands("eth0", iface) == [
        ["/bin/busybox", "sysctl", "-w", "net/ipv6/conf/eth0/accept_dad=0"],
        [*IP, "addr", "add", "10.88.0.5/16", "dev", "eth0"],
        [*IP, "addr", "add", "fd00::5/64", "dev", "eth0"],
        [*IP, "link", "set", "dev", "eth0", "up"],
    ]


def test_interface_commands_without_a_name_keep_the_kernel_name() -> None:
    assert interface_commands("enp0s3", pb.Interface(mac=MAC)) == [[*IP, "link", "set", "dev", "enp0s3", "up"]]


@pytest.mark.parametrize(
    "iface",
    [
        pb.Interface(name="eth0", addresses=["10.88.0.5"]),
        pb.Interface(name="a-name-far-too-long"),
        pb.Interface(name="eth/0"),
    ],
)
def test_interface_commands_reject_malformed_interfaces(iface: pb.Interface) -> None:
    with pytest.raises(InvalidArgument):
        interface_commands("eth0", iface)


# --- route_commands ---


def test_route_commands_ipv4() -> None:
    routes = [
        pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1"),
        pb.Route(destination="10.96.0.0/12", gateway="10.88.0.1", interface="eth1"),
        pb.Route(destination="10.88.0.0/16"),
    ]
    assert route_commands(routes, "eth0") == [
        [*IP, "route", "replace", "default", "via", "10.88.0.1", "dev", "eth0"],
        [*IP, "route", "replace", "10.96.0.0/12", "via", "10.88.0.1", "dev", "eth1"],
        [*IP, "route", "replace", "10.88.0.0/16", "dev", "eth0"],
    ]


def test_route_commands_ipv6() -> None:
    routes = [
        pb.Route(destination="::/0", gateway="fd00::1"),
        pb.Route(destination="fd00:96::/108", interface="eth0"),
        pb.Route(destination="default", gateway="fe80::1"),
    ]
    assert route_commands(routes, "eth0") == [
        [*IP, "-6", "route", "replace", "default", "via", "fd00::1", "dev", "eth0"],
        [*IP, "-6", "route", "replace", "fd00:96::/108", "dev", "eth0"],
        [*IP, "-6", "route", "replace", "default", "via", "fe80::1", "dev", "eth0"],
    ]


def test_route_commands_need_a_destination_and_an_interface() -> None:
    with pytest.raises(InvalidArgument):
        route_commands([pb.Route(gateway="10.88.0.1")], "eth0")
    with pytest.raises(InvalidArgument, match="no interface"):
        route_commands([pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1")], "")


# --- find_interface_by_mac ---


def test_find_interface_by_mac(sysfs: Path) -> None:
    assert find_interface_by_mac(MAC, sysfs, timeout=0) == "enp0s3"
    assert find_interface_by_mac(MAC.upper(), sysfs, timeout=0) == "enp0s3"


def test_find_interface_by_mac_waits_for_a_late_nic(sysfs: Path) -> None:
    late = "52:54:00:ab:cd:ef"

    def hotplug() -> None:
        time.sleep(0.2)
        make_nic(sysfs, "eth1", late)

    t = threading.Thread(target=hotplug)
    t.start()
    try:
        assert find_interface_by_mac(late, sysfs, timeout=5) == "eth1"
    finally:
        t.join()


def test_find_interface_by_mac_missing_lists_what_it_saw(sysfs: Path) -> None:
    start = time.monotonic()
    with pytest.raises(AgentFault) as e:
        find_interface_by_mac("52:54:00:00:00:99", sysfs, timeout=0.2)
    assert time.monotonic() - start >= 0.2
    assert "52:54:00:00:00:99" in str(e.value)
    assert "enp0s3 (52:54:00:12:34:56)" in str(e.value)
    assert "lo (00:00:00:00:00:00)" in str(e.value)


# --- configure_network ---


def test_configure_network_runs_interfaces_then_routes(sysfs: Path) -> None:
    run = FakeRun()
    configure_network(
        [pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16"], mtu=1500)],
        [pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1")],
        run=run,
        sys_class_net=sysfs,
        wait=0,
    )
    assert run.calls == [
        [*IP, "link", "set", "dev", "enp0s3", "down"],
        [*IP, "link", "set", "dev", "enp0s3", "name", "eth0"],
        [*IP, "link", "set", "dev", "eth0", "mtu", "1500"],
        [*IP, "addr", "add", "10.88.0.5/16", "dev", "eth0"],
        [*IP, "link", "set", "dev", "eth0", "up"],
        [*IP, "route", "replace", "default", "via", "10.88.0.1", "dev", "eth0"],
    ]


def test_configure_network_again_tolerates_existing_addresses(sysfs: Path) -> None:
    """A retried CreateSandbox: the NIC has its name and address already."""
    (sysfs / "enp0s3").rename(sysfs / "eth0")
    addr = (*IP, "addr", "add", "10.88.0.5/16", "dev", "eth0")
    run = FakeRun({addr: "ip: RTNETLINK answers: File exists"})
    configure_network(
        [pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16"])],
        [pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1")],
        run=run,
        sys_class_net=sysfs,
        wait=0,
    )
    assert run.calls == [
        list(addr),
        [*IP, "link", "set", "dev", "eth0", "up"],
        [*IP, "route", "replace", "default", "via", "10.88.0.1", "dev", "eth0"],
    ]


def test_configure_network_other_failures_are_errors(sysfs: Path) -> None:
    rename = (*IP, "link", "set", "dev", "enp0s3", "name", "eth0")
    run = FakeRun({rename: "ip: RTNETLINK answers: File exists"})
    with pytest.raises(AgentFault, match=r"name eth0.*File exists"):
        configure_network([pb.Interface(name="eth0", mac=MAC)], [], run=run, sys_class_net=sysfs, wait=0)
    assert run.calls[-1] == list(rename)


def test_configure_network_checks_everything_before_running(sysfs: Path) -> None:
    run = FakeRun()
    with pytest.raises(InvalidArgument):
        configure_network(
            [pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16"])],
            [pb.Route(gateway="10.88.0.1")],
            run=run,
            sys_class_net=sysfs,
            wait=0,
        )
    with pytest.raises(InvalidArgument, match="no MAC"):
        configure_network([pb.Interface(name="eth0")], [], run=run, sys_class_net=sysfs, wait=0)
    assert run.calls == []


# --- run_command (real busybox on the host, when it has one) ---


@pytest.mark.skipif(not HAVE_BUSYBOX, reason="needs /bin/busybox")
def test_run_command_success_and_failure() -> None:
    run_command(["/bin/busybox", "true"])
    with pytest.raises(AgentFault) as e:
        run_command(["/bin/busybox", "sh", "-c", "echo 'RTNETLINK answers: File exists' >&2; exit 2"])
    assert "/bin/busybox sh -c" in str(e.value)
    assert "exit status 2" in str(e.value)
    assert "RTNETLINK answers: File exists" in str(e.value)
    with pytest.raises(AgentFault, match="did not finish"):
        run_command(["/bin/busybox", "sleep", "5"], timeout=0.3)
    with pytest.raises(AgentFault, match="exit status 127"):
        run_command(["/nonexistent/ip"])


@pytest.mark.skipif(not HAVE_BUSYBOX, reason="needs /bin/busybox")
def test_run_command_sees_failures_while_the_reaper_runs() -> None:
    """The agent's reaper takes every child's exit status; failures must still be noticed."""
    script = """
from kvmsandbox.agent.guest.errors import AgentFault
from kvmsandbox.agent.guest.network import run_command
from kvmsandbox.agent.guest.reaper import Reaper
Reaper().start()
try:
    run_command(["/bin/busybox", "sh", "-c", "sleep 0.1; echo nope >&2; exit 3"])
except AgentFault as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    assert "exit status 3" in out.stdout
    assert "nope" in out.stdout


# --- hosts file and CreateSandbox ---


def test_hosts_file_puts_the_hostname_on_the_pod_ip_only() -> None:
    extra = [pb.HostEntry(ip="10.1.2.3", names=["foo", "foo.local"])]
    assert sandbox.hosts_file("web-0", extra, "10.88.0.5") == (
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.88.0.5\tweb-0\n10.1.2.3\tfoo foo.local\n"
    )


def test_hosts_file_without_a_network_is_unchanged() -> None:
    assert sandbox.hosts_file("web-0", []) == (
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tweb-0\n"
    )


def test_pod_ip() -> None:
    assert sandbox.pod_ip([]) == ""
    assert sandbox.pod_ip([pb.Interface(name="eth0")]) == ""
    ifaces = [pb.Interface(addresses=["fd00::5/64", "10.88.0.5/16"]), pb.Interface(addresses=["10.9.0.1/24"])]
    assert sandbox.pod_ip(ifaces) == "fd00::5"


def test_create_sandbox_configures_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[pb.Interface], list[pb.Route]]] = []
    monkeypatch.setattr(sandbox, "SANDBOX_DIR", tmp_path)
    monkeypatch.setattr(socket, "sethostname", lambda name: None)
    monkeypatch.setattr(sandbox, "configure_network", lambda i, r: calls.append((list(i), list(r))))
    iface = pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16"])
    route = pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1")
    req = pb.CreateSandboxRequest(sandbox_id="abc", hostname="web-0", interfaces=[iface], routes=[route])
    setup = sandbox.SandboxSetup(Reaper())
    try:
        resp = setup.create(req)
        assert calls == [([iface], [route])]
        assert "10.88.0.5\tweb-0\n" in Path(resp.hosts_path).read_text()
        assert resp.shm_path == str(tmp_path / "shm") and os.path.ismount(resp.shm_path)
    finally:
        setup.destroy()  # the pod's /dev/shm is a real tmpfs here too
    assert not os.path.ismount(tmp_path / "shm")
    again = sandbox.SandboxSetup(Reaper())
    try:
        again.create(pb.CreateSandboxRequest(sandbox_id="abc", hostname="web-0"))
        assert len(calls) == 1
    finally:
        again.destroy()


# --- a clone's NIC (still at its template's MAC) ---

TEMPLATE_MAC = "02:6b:76:73:00:01"


def test_clone_nic_found_by_template_mac_takes_the_pod_mac_first(sysfs: Path) -> None:
    (sysfs / "enp0s3" / "address").write_text(TEMPLATE_MAC + "\n")
    run = FakeRun()
    configure_network(
        [pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16"], template_mac=TEMPLATE_MAC)],
        [],
        run=run,
        sys_class_net=sysfs,
        wait=0,
    )
    assert run.calls[0] == [*IP, "link", "set", "dev", "enp0s3", "address", MAC]
    assert [*IP, "link", "set", "dev", "eth0", "up"] in run.calls


def test_clone_nic_retried_after_its_mac_changed_is_not_changed_again(sysfs: Path) -> None:
    run = FakeRun()
    configure_network(
        [pb.Interface(name="eth0", mac=MAC, template_mac=TEMPLATE_MAC)], [], run=run, sys_class_net=sysfs, wait=0
    )
    assert not any("address" in call for call in run.calls)


def test_template_mac_matches_no_other_nic(sysfs: Path) -> None:
    with pytest.raises(AgentFault, match="no network interface"):
        configure_network(
            [pb.Interface(mac="02:00:00:00:00:99", template_mac="02:00:00:00:00:98")],
            [],
            run=FakeRun(),
            sys_class_net=sysfs,
            wait=0,
        )
