"""Named network namespaces, as `ip netns` makes them: a bind mount of the namespace at
/run/netns/<name>, so it outlives the processes in it and CNI plugins can open it by path."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kvmsandbox.errors import AlreadyExists, InvalidArgument, NetworkError

NETNS_DIR = Path("/run/netns")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{name!r} is not a usable network namespace name: use 1 to 64 letters, digits, '-' or '_'"
        )


def netns_path(name: str) -> Path:
    """Where the namespace called ``name`` is (or would be) mounted."""
    _check_name(name)
    return NETNS_DIR / name


def _is_netns(path: Path) -> bool:
    # Every namespace file lives on the one nsfs filesystem; a file left behind by a crash (or
    # anything else at that path) lives on /run's tmpfs instead.
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def netns_exists(name: str) -> bool:
    """True when /run/netns/<name> is a mounted network namespace (not just a leftover file)."""
    return _is_netns(netns_path(name))


def _ip_netns(*args: str, timeout: float = 30) -> None:
    try:
        proc = subprocess.run(["ip", "netns", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise NetworkError(f"`ip netns {' '.join(args)}` did not finish within {timeout:g} s") from None
    except OSError as e:
        raise NetworkError(f"could not run `ip netns {' '.join(args)}`: {e}") from None
    if proc.returncode != 0:
        raise NetworkError(f"`ip netns {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")


def create_netns(name: str, *, exist_ok: bool = False) -> Path:
    """Creates the network namespace ``name`` and returns its path.

    Raises:
        InvalidArgument: the name is not usable.
        AlreadyExists: a namespace of that name exists and ``exist_ok`` is false.
        NetworkError: `ip netns add` failed.
    """
    path = netns_path(name)
    if _is_netns(path):
        if exist_ok:
            return path
        raise AlreadyExists(f"network namespace {name!r} exists already ({path})")
    if path.exists():
        # A file without a namespace mounted on it (a crash between mount and cleanup): `ip netns
        # add` would refuse it, and nothing can be using it.
        _ip_netns("delete", name)
    _ip_netns("add", name)
    return path


def delete_netns(name: str) -> None:
    """Removes the namespace ``name`` (its mount and file); nothing happens if there is none.

    The kernel frees the namespace, and the interfaces in it, once no process is left in it.

    Raises:
        InvalidArgument: the name is not usable.
        NetworkError: `ip netns delete` failed.
    """
    path = netns_path(name)
    if not path.exists() and not path.is_symlink():
        return
    _ip_netns("delete", name)


def run_in_netns(name: str, argv: Sequence[str], timeout: float = 30) -> str:
    """Runs ``argv`` inside the namespace ``name`` (with `ip netns exec`) and returns its stdout.

    Raises:
        InvalidArgument: the name is not usable or ``argv`` is empty.
        NetworkError: the command could not run, failed (the message has its stderr) or timed out.
    """
    _check_name(name)
    if not argv:
        raise InvalidArgument("run_in_netns needs a command to run")
    shown = " ".join(argv)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetworkError(f"`{shown}` in network namespace {name!r} did not finish within {timeout:g} s") from None
    except OSError as e:
        raise NetworkError(f"could not run `{shown}` in network namespace {name!r}: {e}") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise NetworkError(f"`{shown}` in network namespace {name!r} failed: {detail}")
    return proc.stdout
