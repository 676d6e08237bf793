"""The node's view of pod overhead for the CRI server: the measurement on disk (reloaded when it
changes), VM sizing from it, and the check of what a pod declares against what was measured."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.config import Config
from kvmsandbox.errors import KvmSandboxError
from kvmsandbox.overhead.model import MEMORY_COMPONENTS, Measurement, load_measurement
from kvmsandbox.overhead.sizing import (
    STRUCT_PAGE_FRACTION,
    OverheadCheck,
    PodResources,
    VmSize,
    check_declared,
    size_vm,
)

log = logging.getLogger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True)
class Measured:
    """The overhead a pod is checked against, and where the figure comes from."""

    memory_bytes: int
    cpu_millicores: float
    source: str


class NodeOverhead:
    def __init__(self, config: Config, path: Path | None = None) -> None:
        self.config = config
        self.path = path or config.measurement_file
        self._lock = threading.Lock()
        self._cached: tuple[float, Measurement | None] | None = None
        self.problem = ""

    def measurement(self) -> Measurement | None:
        """The node's measurement, None when there is none or it is unreadable (``problem`` says why)."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            self.problem = f"no measurement at {self.path}: run `kvmsandbox overhead measure`"
            return None
        with self._lock:
            if self._cached is None or self._cached[0] != mtime:
                try:
                    self._cached = (mtime, load_measurement(self.path))
                    self.problem = ""
                except KvmSandboxError as e:
                    log.warning("ignoring the overhead measurement: %s", e)
                    self.problem = str(e)
                    self._cached = (mtime, None)
            return self._cached[1]

    def guest_memory_bytes(self) -> int:
        m = self.measurement()
        return m.guest_memory_bytes if m is not None else self.config.overhead.guest_memory_mib * MIB

    def size(self, resources: PodResources, host_cpus: int) -> VmSize:
        d = self.config.sandbox
        return size_vm(
            resources,
            default_vcpus=d.vcpus,
            default_memory_mib=d.memory_mib,
            min_memory_mib=d.min_memory_mib,
            max_vcpus=d.max_vcpus or host_cpus,
            guest_memory_bytes=self.guest_memory_bytes(),
        )

    def measured(self, at_boot: dict[str, int], vm_memory_mib: int = 0) -> Measured | None:
        """The node's observed overhead, else the pod's own figures taken at its boot.

        The node's figure was taken on VMs of the measurement's size: a bigger VM (sized from the
        pod's limits) also has bigger guest page structs (1/64 of the extra memory), added here.
        """
        m = self.measurement()
        if m is not None:
            measured_vm = int(m.conditions.get("vm_memory_mib", 0) or 0)
            extra = max(0, vm_memory_mib - measured_vm) * MIB // STRUCT_PAGE_FRACTION if measured_vm else 0
            source = f"node measurement {self.path}"
            if extra:
                source += f" + {extra / MIB:.0f} MiB of page structs for this pod's {vm_memory_mib} MiB VM"
            return Measured(m.observed_memory_bytes + extra, m.observed_cpu_millicores, source)
        if at_boot:
            memory = sum(at_boot.get(k, 0) for k in MEMORY_COMPONENTS)
            return Measured(memory, 0.0, "this pod's own figures at boot (no node measurement yet)")
        return None

    def check(
        self, declared: PodResources, at_boot: dict[str, int], vm_memory_mib: int = 0
    ) -> tuple[OverheadCheck, str] | None:
        measured = self.measured(at_boot, vm_memory_mib)
        if measured is None:
            return None
        return check_declared(declared, measured.memory_bytes, measured.cpu_millicores), measured.source
