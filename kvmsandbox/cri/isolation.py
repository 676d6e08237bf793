"""What a CRI security context asks of the kernel beyond the process: namespaces, seccomp, masked
and read-only /proc paths, privilege. The pod's VM is its node-facing boundary, so the host's
namespaces (network, PID, IPC, user) are never shared with a pod: asking for them is refused.
"""

from __future__ import annotations

from kvmsandbox.cri import seccomp
from kvmsandbox.cri.process import proc_paths
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.errors import FailedPrecondition, InvalidArgument
from kvmsandbox.sandbox.oci_spec import DEFAULT_CAPABILITIES, Isolation, ProcessSpec
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.states import ContainerState
from kvmsandbox.sandbox.types import PodKernel

POD_PID_NAMESPACE = "pid_namespace"  # its key in SandboxRecord.guest_files


def refuse_host_namespaces(what: str, ns: cri.NamespaceOption) -> None:
    """Raises InvalidArgument when ``ns`` asks for one of the node's namespaces."""
    for kind, mode in (("network", ns.network), ("PID", ns.pid), ("IPC", ns.ipc)):
        if mode == cri.NODE:
            raise InvalidArgument(
                f"{what} asks for the host {kind} (the node's {kind} namespace): kvmsandbox runs each pod "
                f"in its own VM, whose kernel cannot share the host's namespaces"
            )
    if ns.HasField("userns_options") and ns.userns_options.mode != cri.NODE:
        raise InvalidArgument(f"{what} asks for a user namespace: kvmsandbox does not support user namespaces")


def pod_kernel(config: cri.PodSandboxConfig) -> PodKernel:
    """The pod's sysctls and whether it shares one process namespace (PID mode POD, the default)."""
    ns = config.linux.security_context.namespace_options
    refuse_host_namespaces("the pod", ns)
    return PodKernel(sysctls=tuple(sorted(config.linux.sysctls.items())), share_pid_namespace=ns.pid == cri.POD)


def _pid_namespace(sandbox: SandboxRecord, ns: cri.NamespaceOption) -> str:
    if ns.pid == cri.CONTAINER:
        return ""
    if ns.pid == cri.TARGET:
        target = sandbox.containers.get(ns.target_id)
        if target is None:
            raise FailedPrecondition(f"target container {ns.target_id[:80]!r} is not a container of this pod")
        # A process that has exited leaves its pid to be reused: only a live one names its namespace.
        if target.state is not ContainerState.RUNNING or not target.pid:
            raise FailedPrecondition(f"target container {ns.target_id[:80]!r} is not running")
        return f"/proc/{target.pid}/ns/pid"
    path = sandbox.guest_files.get(POD_PID_NAMESPACE, "")
    if not path:
        raise FailedPrecondition(
            "the container asks for the pod's process namespace, but the pod was made without one "
            "(its PID mode is CONTAINER)"
        )
    return path


def _seccomp(sc: cri.LinuxContainerSecurityContext, capabilities: list[str]) -> dict[str, object] | None:
    """The OCI seccomp filter: the ``seccomp`` field, else the deprecated ``seccomp_profile_path``;
    neither set means unconfined, as containerd has it. Privileged containers get none."""
    if sc.privileged:
        return None
    if sc.HasField("seccomp"):
        kind, ref = sc.seccomp.profile_type, sc.seccomp.localhost_ref
        if kind == cri.SecurityProfile.Unconfined:
            return None
        if kind == cri.SecurityProfile.Localhost:
            return seccomp.load_localhost(ref, capabilities)
        return seccomp.runtime_default(capabilities)
    path = sc.seccomp_profile_path
    if path in ("", "unconfined"):
        return None
    if path in ("runtime/default", "docker/default"):
        return seccomp.runtime_default(capabilities)
    if path.startswith("localhost/"):
        return seccomp.load_localhost(path.removeprefix("localhost"), capabilities)
    raise InvalidArgument(f"seccomp_profile_path {path[:80]!r}: not runtime/default, unconfined or localhost/PATH")


def container_isolation(sandbox: SandboxRecord, config: cri.ContainerConfig, process: ProcessSpec) -> Isolation:
    """The container's Isolation.

    Raises:
        InvalidArgument: a host namespace, a bad seccomp profile or path.
        FailedPrecondition: a PID namespace to join that this pod does not have.
    """
    sc = config.linux.security_context
    refuse_host_namespaces("the container", sc.namespace_options)
    masked, readonly = proc_paths(sc)
    caps = list(DEFAULT_CAPABILITIES if process.capabilities is None else process.capabilities)
    return Isolation(
        masked_paths=masked,
        readonly_paths=readonly,
        seccomp=_seccomp(sc, caps),
        pid_namespace=_pid_namespace(sandbox, sc.namespace_options),
        privileged=sc.privileged,
        shm=sandbox.guest_files.get("shm", ""),
    )
