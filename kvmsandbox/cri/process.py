"""What runs in a container: the CRI container config merged with the image config, the way
kubelet users expect from containerd and CRI-O (Kubernetes' command/args rules)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.errors import InvalidArgument
from kvmsandbox.host.beneath import read_in_root
from kvmsandbox.sandbox.oci_spec import ALL_CAPABILITIES, DEFAULT_CAPABILITIES, ProcessSpec


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


def _account_lines(layers: Sequence[Path], file: str) -> list[list[str]]:
    """The colon-separated lines of the image's /etc/passwd or /etc/group (top layer first)."""
    for layer in layers:
        try:
            data = read_in_root(layer, file, MAX_ACCOUNT_FILE_BYTES)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise InvalidArgument(f"the image's /{file} cannot be read: {e.strerror}") from None
        return [] if data is None else [line.split(":") for line in data.decode(errors="replace").splitlines()]
    return []


def _account_of_uid(layers: Sequence[Path], uid: int) -> tuple[str, int] | None:
    """(name, primary gid) of ``uid`` in the image's /etc/passwd, if it is there."""
    for parts in _account_lines(layers, "etc/passwd"):
        if len(parts) > 3 and parts[2] == str(uid) and parts[3].isdigit() and len(parts[3]) <= 10:
            return parts[0], int(parts[3])
    return None


MAX_GROUPS = 1024  # supplementary groups of a container (the kernel allows 65536; no image needs many)


def _image_groups(layers: Sequence[Path], name: str) -> list[int]:
    """The gids of the image's /etc/group entries that list ``name`` as a member."""
    if not name:
        return []
    return [
        int(parts[2])
        for parts in _account_lines(layers, "etc/group")
        if len(parts) > 3 and parts[2].isdigit() and len(parts[2]) <= 10 and name in parts[3].split(",")
    ]


def groups(sc: cri.LinuxContainerSecurityContext, uid: int, gid: int, layers: Sequence[Path]) -> list[int]:
    """The supplementary groups, as containerd gives them: the primary group, with policy Merge (the
    default) the image's groups listing the user, then ``supplemental_groups``; each once."""
    found = [gid]
    account = _account_of_uid(layers, uid)
    if sc.supplemental_groups_policy != cri.Strict and account is not None:
        found += _image_groups(layers, account[0])
    found += [int(g) for g in sc.supplemental_groups]
    unique = list(dict.fromkeys(found))
    if len(unique) > MAX_GROUPS:
        raise InvalidArgument(f"the container would have {len(unique)} supplementary groups, more than {MAX_GROUPS}")
    return unique


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
    if sc.HasField("run_as_group") and not (sc.HasField("run_as_user") or sc.run_as_username):
        raise InvalidArgument("run_as_group needs run_as_user or run_as_username (a group without a user)")
    uid, gid = resolve_user(str(image_config.get("User") or ""), layers)
    if sc.HasField("run_as_user"):
        uid = sc.run_as_user.value
        account = _account_of_uid(layers, uid)  # its primary group, as the image's /etc/passwd says
        gid = account[1] if account is not None else 0
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
        additional_gids=groups(sc, uid, gid, layers),
        terminal=config.tty,
        stdin=config.stdin,
        stdin_once=config.stdin_once,
        capabilities=capabilities(sc),
        no_new_privileges=sc.no_new_privs,
    )


# Capability names a security context may carry, without the CAP_ prefix; "ALL" is all of them.
MAX_CAPABILITY_NAMES = 64


def capabilities(sc: cri.LinuxContainerSecurityContext) -> list[str]:
    """The container's capability set, as containerd makes it: everything when privileged; else
    the default set, all of them if ``add`` names ALL, none if ``drop`` does, then the other
    names added and dropped.

    Raises:
        InvalidArgument: a name Linux does not know, or too many.
    """
    if sc.privileged:
        return list(ALL_CAPABILITIES)
    add, drop = list(sc.capabilities.add_capabilities), list(sc.capabilities.drop_capabilities)
    if len(add) + len(drop) > MAX_CAPABILITY_NAMES:
        raise InvalidArgument(f"at most {MAX_CAPABILITY_NAMES} capabilities may be added and dropped")
    # "ALL" in any case, as containerd compares.
    caps = list(ALL_CAPABILITIES) if any(n.upper() == "ALL" for n in add) else list(DEFAULT_CAPABILITIES)
    if any(n.upper() == "ALL" for n in drop):
        caps = []
    for name, keep in [*((n, True) for n in add), *((n, False) for n in drop)]:
        if name.upper() == "ALL":
            continue
        cap = name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}"
        if cap not in ALL_CAPABILITIES:
            raise InvalidArgument(f"unknown capability {name[:40]!r}")
        if keep and cap not in caps:
            caps.append(cap)
        elif not keep and cap in caps:
            caps.remove(cap)
    return caps


def proc_paths(sc: cri.LinuxContainerSecurityContext) -> tuple[list[str] | None, list[str] | None]:
    """(masked paths, read-only paths): none for a privileged container, the context's own when
    it lists any, else None (the runtime's defaults), as containerd does.

    Raises:
        InvalidArgument: a path that is not absolute, or too many.
    """
    if sc.privileged:
        return [], []
    out: list[list[str] | None] = []
    for paths in (sc.masked_paths, sc.readonly_paths):
        if len(paths) > 256 or any(not p.startswith("/") or len(p) > 4096 or "\0" in p for p in paths):
            raise InvalidArgument("masked and read-only paths must be at most 256 absolute paths")
        out.append(list(paths) if paths else None)
    return out[0], out[1]
