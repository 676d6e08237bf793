"""Booting and destroying guest VMs: one interface, a libvirt backend and a direct QEMU backend.

Importing this package does not import libvirt; open_hypervisor() loads the backend it is asked for.
"""

from kvmsandbox.hypervisor.accel import Accel, detect_accel
from kvmsandbox.hypervisor.capabilities import Capabilities, choose_shared_filesystem, choose_transport
from kvmsandbox.hypervisor.factory import backend_capabilities, open_hypervisor
from kvmsandbox.hypervisor.spec import (
    AGENT_PORT_NAME,
    AGENT_VSOCK_PORT,
    SHARED_DIR_TAG,
    AgentChannel,
    Hypervisor,
    VMInfo,
    VMSpec,
)

__all__ = [
    "AGENT_PORT_NAME",
    "AGENT_VSOCK_PORT",
    "SHARED_DIR_TAG",
    "Accel",
    "AgentChannel",
    "Capabilities",
    "Hypervisor",
    "VMInfo",
    "VMSpec",
    "backend_capabilities",
    "choose_shared_filesystem",
    "choose_transport",
    "detect_accel",
    "open_hypervisor",
]
