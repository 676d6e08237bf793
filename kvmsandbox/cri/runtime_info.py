"""Version, Status, RuntimeConfig, UpdateRuntimeConfig."""

from __future__ import annotations

import json
from typing import Any

from kvmsandbox import __version__
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import CriState
from kvmsandbox.sandbox.states import SandboxState

RUNTIME_NAME = "kvmsandbox"
API_VERSION = "v1"


def version(state: CriState, req: cri.VersionRequest) -> cri.VersionResponse:
    return cri.VersionResponse(
        version="0.1.0", runtime_name=RUNTIME_NAME, runtime_version=__version__, runtime_api_version=API_VERSION
    )


def status(state: CriState, req: cri.StatusRequest) -> cri.StatusResponse:
    m = state.manager
    net = m.networking.status()
    conditions = [
        cri.RuntimeCondition(type="RuntimeReady", status=True),
        cri.RuntimeCondition(type="NetworkReady", status=net.ready, reason=net.reason, message=net.message),
    ]
    info = {}
    if req.verbose:
        info["config"] = json.dumps(
            {
                "accel": m.accel,
                "accel_reason": m.accel_reason,
                "agent_transport": m.transport,
                "hypervisor": m.hypervisor.name,
                "guest_image": {"key": m.image.key, "kernel": m.image.kernel_version, "rootfs": str(m.image.rootfs)},
                "runtime_handlers": state.config.runtime_handlers,
                "pod_cidr": state.pod_cidr,
                "network": {
                    "ready": net.ready,
                    "message": net.message,
                    "cni_conf_dirs": [str(d) for d in state.config.network.cni_conf_dirs],
                    "cni_bin_dirs": [str(d) for d in state.config.network.cni_bin_dirs],
                },
                "overhead": node_overhead_info(state),
            }
        )
    # Every handler (and "", the default one, as containerd lists it) has the same features.
    features = cri.RuntimeHandlerFeatures(recursive_read_only_mounts=True, user_namespaces=False)
    handlers = [cri.RuntimeHandler(name=name, features=features) for name in ["", *state.config.runtime_handlers]]
    return cri.StatusResponse(
        status=cri.RuntimeStatus(conditions=conditions),
        info=info,
        runtime_handlers=handlers,
        features=cri.RuntimeFeatures(supplemental_groups_policy=True),
    )


def node_overhead_info(state: CriState) -> dict[str, Any]:
    """The node's measurement and every pod whose declared overhead is below it."""
    node = state.overhead
    m = node.measurement()
    out: dict[str, Any] = {
        "measurement_file": str(node.path),
        "vmm_cgroup": state.config.overhead.vmm_cgroup,
        "host_cgroups": state.manager.cgroups_reason,
        "guest_memory_bytes_for_sizing": node.guest_memory_bytes(),
    }
    if m is None:
        out["problem"] = node.problem
    else:
        out["observed"] = {"memory_bytes": m.observed_memory_bytes, "cpu_millicores": m.observed_cpu_millicores}
        out["recommended_pod_fixed"] = {
            "memory_bytes": m.recommended_memory_bytes,
            "cpu_millicores": m.recommended_cpu_millicores,
        }
        out["conditions"] = m.conditions
    warnings = []
    for record in state.manager.list_sandboxes():
        if record.state is not SandboxState.READY:
            continue
        pod = state.pod(record)
        checked = state.overhead_for(pod.runtime_handler).check(
            pod.declared_overhead, record.overhead_at_boot, record.memory_mib
        )
        if checked is not None and checked[0].warning:
            warnings.append({"pod_sandbox_id": record.id, "warning": checked[0].warning})
    out["pods_declaring_too_little"] = warnings
    if state.manager.warm_pool is not None:
        # Clones waiting for pods: memory the node spends on no pod yet.
        out["warm_pool"] = state.manager.warm_pool.status()
    return out


def runtime_config(state: CriState, req: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
    # Pod cgroups on the host are plain cgroupfs directories; there is no systemd here to delegate to.
    return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=cri.CGROUPFS))


def update_runtime_config(state: CriState, req: cri.UpdateRuntimeConfigRequest) -> cri.UpdateRuntimeConfigResponse:
    state.pod_cidr = req.runtime_config.network_config.pod_cidr
    return cri.UpdateRuntimeConfigResponse()
