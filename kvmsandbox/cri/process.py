"""What runs in a container: the CRI container config merged with the image config, the way
kubelet users expect from containerd and CRI-O (Kubernetes' command/args rules)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.errors import InvalidArgument
from kvmsandbox.host.beneath import read_in_root
from kvmsandbox.sandbox.oci_spec import ProcessSpec


def command_line(image_config: dict[str, Any], command: Sequence[str], args: Sequence[str]) -> list[str]:
    """Kubernetes' rules: ``command`` replaces the image's Entrypoint (and drops its Cmd), ``args``
    replace the image's Cmd.

    Raises:
        InvalidArgument: nothing to run (neither the container nor the image says what).
    """
    entrypoint = list(image_config.get("Entrypoint") or [])
    cmd = list(image_config.get("Cmd") or [])
    argv = [*command, *args] if command else [*entrypoint, *(args or cmd)]
    if not argv:
        raise InvalidArgument("no command: the container config and the image both leave it empty")
    return argv


def merged_env(image_env: Sequence[str], envs: Sequence[cri.KeyValue]) -> list[str]:
    """Image environment first, container variables override by name."""
    env: dict[str, str] = {}
    for item in image_env:
        name, _, value = item.partition("=")
        env[name] = value
    for kv in envs:
        # value is bytes in the current CRI (string before); the wire is the same.
        env[kv.key] = kv.value.decode(errors="replace")
    return [f"{k}={v}" for k, v in env.items()]


# An image's /etc/passwd or /etc/group larger than this is refused (a real one is a few KiB).
MAX_ACCOUNT_FILE_BYTES = 1024 * 1024


def _lookup(layers: Sequence[Path], file: str, name: str, field: int) -> int | None:
    """The numeric id of ``name`` in /etc/passwd or /etc/group of the image (top layer first),
    read inside the layer: a link in the image never leads the host out of it.

    Raises:
        InvalidArgument: the file is larger than MAX_ACCOUNT_FILE_BYTES.
    """
    for layer in layers:
        try:
            data = read_in_root(layer, file, MAX_ACCOUNT_FILE_BYTES)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise InvalidArgument(f"the image's /{file} cannot be read: {e.strerror}") from None
        if data is None:
            return None
        for line in data.decode(errors="replace").splitlines():
            parts = line.split(":")
            if len(parts) > field and parts[0] == name and parts[field].isdigit() and len(parts[field]) <= 10:
                return int(parts[field])
        return None
    return None


def resolve_user(user: str, layers: Sequence[Path]) -> tuple[int, int]:
    """(uid, gid) for an image ``User`` ("uid", "uid:gid", "name", "name:group"); root if empty.

    Raises:
        InvalidArgument: a name that the image's /etc/passwd or /etc/group does not know.
    """
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    if name.isdigit():
        uid = int(name)
        gid = None
    else:
        found = _lookup(layers, "etc/passwd", name, 2)
        if found is None:
            raise InvalidArgument(f"image user {name!r} is not in the image's /etc/passwd")
        uid = found
        gid = _lookup(layers, "etc/passwd", name, 3)
    if group:
        gid = int(group) if group.isdigit() else _lookup(layers, "etc/group", group, 2)
        if gid is None:
            raise InvalidArgument(f"image group {group!r} is not in the image's /etc/group")
    return uid, gid if gid is not None else 0


def process_spec(config: cri.ContainerConfig, image_config: dict[str, Any], layers: Sequence[Path]) -> ProcessSpec:
    """The process of a container from its CRI config and its image's config.

    Raises:
        InvalidArgument: nothing to run, or a user or group the image does not know.
    """
    sc = config.linux.security_context
    uid, gid = resolve_user(str(image_config.get("User") or ""), layers)
    if sc.HasField("run_as_user"):
        uid = sc.run_as_user.value
        gid = 0
    elif sc.run_as_username:
        uid, gid = resolve_user(sc.run_as_username, layers)
    if sc.HasField("run_as_group"):
        gid = sc.run_as_group.value
    return ProcessSpec(
        args=command_line(image_config, config.command, config.args),
        env=merged_env(image_config.get("Env") or [], config.envs),
        cwd=config.working_dir or str(image_config.get("WorkingDir") or "") or "/",
        uid=uid,
        gid=gid,
        additional_gids=[int(g) for g in sc.supplemental_groups],
        terminal=config.tty,
        stdin=config.stdin,
        stdin_once=config.stdin_once,
    )
