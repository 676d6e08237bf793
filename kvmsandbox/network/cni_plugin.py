"""Runs one CNI plugin executable once, as the CNI spec (1.0) says: its config as JSON on stdin, the
request in CNI_* environment variables, a result or an error object as JSON on stdout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsandbox.errors import InvalidArgument, NetworkError

log = logging.getLogger(__name__)

# The spec's rule for container ids.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_container_id(container_id: str) -> None:
    """Raises InvalidArgument for an id the spec does not allow."""
    if not _CONTAINER_ID.fullmatch(container_id):
        raise InvalidArgument(
            f"{container_id!r} is not a usable CNI container id: it must start with a letter or digit "
            "and have only letters, digits, '_', '.' and '-'"
        )


def check_ifname(ifname: str) -> None:
    """Raises InvalidArgument for a name the kernel would refuse for an interface."""
    if not 0 < len(ifname.encode()) <= 15 or ifname in (".", "..") or any(c in ifname for c in "/: \t\n"):
        raise InvalidArgument(f"{ifname!r} is not a usable interface name (at most 15 bytes, no '/', ':' or spaces)")


def cni_args(args: Mapping[str, str] | None) -> str:
    """``args`` as CNI_ARGS (``IgnoreUnknown=1;K=V;...``).

    Raises:
        InvalidArgument: a key or value holds ';' or '='.
    """
    pairs = ["IgnoreUnknown=1"]
    for key, value in (args or {}).items():
        if key == "IgnoreUnknown":
            continue
        if not key or any(c in key + value for c in ";="):
            raise InvalidArgument(
                f"the CNI argument {key}={value!r} cannot be passed: keys and values hold no ';' or '='"
            )
        pairs.append(f"{key}={value}")
    return ";".join(pairs)


@dataclass(frozen=True)
class PluginRequest:
    """Everything one ADD or DEL of one container passes to the plugins."""

    command: str
    container_id: str
    netns: str
    ifname: str
    cni_args: str
    capability_args: dict[str, Any]


def find_plugin(kind: str, bin_dirs: list[Path]) -> Path | None:
    """The executable for plugin ``kind`` in the first of ``bin_dirs`` that has it; None if none has."""
    if "/" in kind or kind in (".", ".."):
        return None
    for directory in bin_dirs:
        path = directory / kind
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def run_plugin(
    kind: str, conf: dict[str, Any], request: PluginRequest, network: str, bin_dirs: list[Path], timeout: float
) -> bytes:
    """Runs plugin ``kind`` once for network ``network`` and returns its stdout.

    Raises:
        NetworkError: it is missing, could not start, timed out or reported an error.
    """
    doing = (
        f"add container {request.container_id} to"
        if request.command == "ADD"
        else f"remove container {request.container_id} from"
    )
    what = f"CNI plugin {kind!r} could not {doing} network {network!r}"
    path = find_plugin(kind, bin_dirs)
    if path is None:
        searched = ", ".join(str(d) for d in bin_dirs) or "(no plugin directories configured)"
        raise NetworkError(f"{what}: there is no executable {kind!r} in {searched}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(
        CNI_COMMAND=request.command,
        CNI_CONTAINERID=request.container_id,
        CNI_NETNS=request.netns,
        CNI_IFNAME=request.ifname,
        CNI_ARGS=request.cni_args,
        CNI_PATH=os.pathsep.join(str(d) for d in bin_dirs),
    )
    log.debug("CNI %s %s (network %s, container %s)", request.command, kind, network, request.container_id)
    try:
        # Its own process group, so a timeout also ends what it started (iptables, IPAM plugins).
        proc = subprocess.Popen(
            [str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as e:
        raise NetworkError(f"{what}: it could not be started: {e}") from None
    try:
        stdout, stderr = proc.communicate(json.dumps(conf).encode(), timeout=max(timeout, 0.001))
    except subprocess.TimeoutExpired:
        raise NetworkError(f"{what}: it did not finish within {timeout:.1f} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
    if proc.returncode != 0:
        raise NetworkError(f"{what}: {_plugin_error(stdout, stderr, proc.returncode)}")
    return stdout


def _plugin_error(stdout: bytes, stderr: bytes, returncode: int) -> str:
    """A plugin's failure in words: its error object's msg and details, else whatever it printed."""
    text = stdout.decode(errors="replace").strip()
    err_text = stderr.decode(errors="replace").strip()
    try:
        error = json.loads(text)
    except ValueError:
        error = None
    if isinstance(error, dict) and error.get("msg"):
        words = str(error["msg"])
        if error.get("details"):
            words += f": {error['details']}"
        if error.get("code") is not None:
            words += f" (CNI error code {error['code']})"
        return words
    return err_text or text or f"it exited with status {returncode} and printed nothing"
