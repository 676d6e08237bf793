"""Pod-wide guest settings: sysctl names never leave /proc/sys; the guest's pod PID namespace path
is checked before the host records it."""

from __future__ import annotations

import pytest

from kvmsandbox.agent.guest.errors import InvalidArgument
from kvmsandbox.agent.guest.podns import apply_sysctls, sysctl_path
from kvmsandbox.sandbox.boot import PID_NAMESPACE_PATH, SHM_PATH


def test_sysctl_names_map_below_proc_sys() -> None:
    assert sysctl_path("kernel.shm_rmid_forced") == "/proc/sys/kernel/shm_rmid_forced"
    assert sysctl_path("net/ipv4/conf/eth0.1/forwarding") == "/proc/sys/net/ipv4/conf/eth0.1/forwarding"


@pytest.mark.parametrize(
    "name",
    ["", "../etc/passwd", "kernel/../../etc/shadow", "net..ipv4", "/kernel.x", "kernel.x/", "a" * 300, "k\x00x", "K.x"],
)
def test_hostile_sysctl_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        sysctl_path(name)


def test_too_many_or_bad_values_are_refused_before_any_write() -> None:
    with pytest.raises(InvalidArgument, match="more than 256"):
        apply_sysctls({f"net.k{i}": "1" for i in range(257)})
    with pytest.raises(InvalidArgument, match="NUL or newline"):
        apply_sysctls({"kernel.x": "1\n2"})


def test_only_the_agents_pinned_pid_namespace_path_is_recorded() -> None:
    assert PID_NAMESPACE_PATH.match("/run/kvmsandbox/sandbox/pid-namespace")
    for bad in ("/etc/passwd", "/proc/12/ns/pid", "/run/kvmsandbox/sandbox/pid-namespace\n", "/run/x/../pid", ""):
        assert not PID_NAMESPACE_PATH.match(bad), bad
        assert not SHM_PATH.match(bad), bad
    assert SHM_PATH.match("/run/kvmsandbox/sandbox/shm")


def test_kubelets_sysctl_form_and_systemds_rule() -> None:
    # kubelet sends net/ipv4/conf/eno2.100/rp_filter as net.ipv4.conf.eno2/100.rp_filter.
    assert sysctl_path("net.ipv4.conf.eno2/100.rp_filter") == "/proc/sys/net/ipv4/conf/eno2.100/rp_filter"
