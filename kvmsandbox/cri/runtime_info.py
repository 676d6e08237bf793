"""Version, Status, RuntimeConfig, UpdateRuntimeConfig."""

from __future__ import annotations

import json

from kvmsandbox import __version__
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import CriState

RUNTIME_NAME = "kvmsandbox"
API_VERSION = "v1"


def version(state: CriState, req: cri.VersionRequest) -> cri.VersionResponse:
    return cri.VersionResponse(
        version="0.1.0", runtime_name=RUNTIME_NAME, runtime_version=__version__, runtime_api_version=API_VERSION
    )


def status(state: CriState, req: cri.StatusRequest) -> cri.StatusResponse:
    m = state.manager
    conditions = [
        cri.RuntimeCondition(type="RuntimeReady", status=True),
        cri.RuntimeCondition(
            type="NetworkReady",
            status=False,
            reason="NetworkPluginNotReady",
            message="kvmsandbox does not set up pod networking (CNI) yet: pods have only a loopback interface",
        ),
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
            }
        )
    return cri.StatusResponse(status=cri.RuntimeStatus(conditions=conditions), info=info)


def runtime_config(state: CriState, req: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
    # Pod cgroups on the host are plain cgroupfs directories; there is no systemd here to delegate to.
    return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=cri.CGROUPFS))


def update_runtime_config(state: CriState, req: cri.UpdateRuntimeConfigRequest) -> cri.UpdateRuntimeConfigResponse:
    state.pod_cidr = req.runtime_config.network_config.pod_cidr
    return cri.UpdateRuntimeConfigResponse()
