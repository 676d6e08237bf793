"""Pod-wide kernel settings in the guest: the pod's sysctls and its shared process namespace.

Containers share the guest's network, IPC and UTS namespaces (the VM is the pod), so a sysctl
written here applies to every container of the pod, as a pod sysctl does under runc in the
pause container's namespaces. The shared process namespace is a new PID namespace whose PID 1 is
a pause process (catatonit, which also reaps orphans); containers join it by its /proc path, and
never see the agent or anything else of the guest's own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Mapping

from kvmsandbox.agent.guest.errors import AgentFault, InvalidArgument
from kvmsandbox.agent.guest.process import Exit, spawn
from kvmsandbox.agent.guest.reaper import Reaper
from kvmsandbox.agent.linux import MNT_DETACH, MS_BIND, mount, umount

PAUSE = ("/usr/bin/unshare", "--pid", "--fork", "--kill-child", "/usr/bin/catatonit", "-P")
# The pod's PID namespace, bound here while the pause process starts: containers join it by this
# path, which names that namespace and no other for as long as the sandbox lives (a pid could be
# reused; if the pause process dies, joining fails instead of landing somewhere else).
POD_PID_NAMESPACE = "/run/kvmsandbox/sandbox/pid-namespace"
MAX_SYSCTLS = 256
MAX_SYSCTL_VALUE = 4096
# Dot- or slash-separated words (as Kubernetes names them); no "..", nothing outside /proc/sys.
_SYSCTL_NAME = re.compile(r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?([./][a-zA-Z0-9]([-_a-zA-Z0-9.]*[a-zA-Z0-9])?)*\Z")


def sysctl_path(name: str) -> str:
    """/proc/sys path of ``net.ipv4.ip_forward``, ``net/ipv4/conf/eth0.1/forwarding`` or
    kubelet's form of the latter, ``net.ipv4.conf.eth0/1.forwarding``: the first separator
    decides, as systemd's sysctl.d reads names (a dot first: dots and slashes swap).

    Raises:
        InvalidArgument: not a sysctl name.
    """
    if len(name) > 256 or not _SYSCTL_NAME.match(name) or ".." in name:
        raise InvalidArgument(f"sysctl {name[:64]!r}: not a sysctl name")
    first = next((c for c in name if c in "./"), "/")
    rel = name if first == "/" else name.translate(str.maketrans("./", "/."))
    return f"/proc/sys/{rel}"


def apply_sysctls(sysctls: Mapping[str, str]) -> None:
    """Writes each sysctl in the guest.

    Raises:
        InvalidArgument: too many, a bad name or value, no such key, or the kernel refused the value.
    """
    if len(sysctls) > MAX_SYSCTLS:
        raise InvalidArgument(f"{len(sysctls)} sysctls, more than {MAX_SYSCTLS}")
    for name, value in sorted(sysctls.items()):
        path = sysctl_path(name)
        if len(value) > MAX_SYSCTL_VALUE or "\0" in value or "\n" in value:
            raise InvalidArgument(f"sysctl {name}: the value is longer than {MAX_SYSCTL_VALUE} or has a NUL or newline")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"sysctl {name}: the guest kernel has no such key") from None
        except OSError as e:
            raise InvalidArgument(f"sysctl {name}: cannot be set ({os.strerror(e.errno or 0)})") from None
        try:
            os.write(fd, value.encode())
        except OSError as e:
            reason = "the kernel refused the value" if e.errno == errno.EINVAL else os.strerror(e.errno or 0)
            raise InvalidArgument(f"sysctl {name}={value[:64]!r}: {reason}") from None
        finally:
            os.close(fd)


class PodPidNamespace:
    """The pause process that holds the pod's shared process namespace."""

    def __init__(self, reaper: Reaper, path: str = POD_PID_NAMESPACE) -> None:
        self._reaper = reaper
        self._holder = 0  # the unshare process; its child is the namespace's PID 1
        self._exit: Exit | None = None
        self._pin = path
        self.path = ""

    def start(self, timeout: float = 10.0) -> str:
        """Starts the pause process (once) and returns its namespace's /proc path.

        Raises:
            AgentFault: it could not be started, or did not come up.
        """
        if self.path:
            return self.path
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self._holder, exit_ = spawn(self._reaper, PAUSE, stdout=devnull, stderr=devnull)
            self._exit = exit_
        except OSError as e:
            raise AgentFault(f"cannot start the pod's pause process: {e}") from None
        finally:
            os.close(devnull)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and exit_.info is None:
            try:
                with open(f"/proc/{self._holder}/task/{self._holder}/children") as f:
                    children = f.read().split()
            except OSError:
                children = []
            if children:
                self._bind(f"/proc/{int(children[0])}/ns/pid")
                self.path = self._pin
                return self.path
            time.sleep(0.01)
        self.stop()
        raise AgentFault("the pod's pause process did not start (is catatonit in the guest image?)")

    def _bind(self, ns: str) -> None:
        try:
            os.makedirs(os.path.dirname(self._pin), exist_ok=True)
            os.close(os.open(self._pin, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            mount(ns, self._pin, "", MS_BIND)
        except OSError as e:
            self.stop()
            raise AgentFault(f"cannot pin the pod's PID namespace: {e}") from None

    def stop(self) -> None:
        """Ends the pause process, and with it every process left in the namespace."""
        with contextlib.suppress(OSError):
            umount(self._pin, MNT_DETACH)
        if self._holder and self._exit is not None and self._exit.info is None:  # not reaped: still ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._holder, signal.SIGKILL)  # --kill-child takes the pause process along
        self._holder, self._exit, self.path = 0, None, ""
