"""The node's overhead measurement as it is kept on disk and handed between commands.

``kvmsandbox overhead measure`` writes it (to ``<state_dir>/overhead.json`` and, if asked, to a file
of the user's choice); the runtime reads it to size VMs and to check what pods declare; the
``runtimeclass`` and ``simulate`` commands read it to say what a pod costs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from kvmsandbox.errors import FailedPrecondition, InvalidArgument

FORMAT_VERSION = 1
MIB = 1024 * 1024

# Memory components, in bytes. The pod's memory overhead is the sum of the first four: what the
# guest itself needs (kernel reservation and idle use, which includes the agent) plus what the host
# spends beside the guest's RAM (VMM and the runtime's share). `agent_rss` and `vmm_tcg_cache`
# are parts of other components, shown to explain them.
MEMORY_COMPONENTS = (
    "guest_kernel_reserved",
    "guest_idle_used",
    "template_shared",
    "vmm_beyond_guest_ram",
    "runtime_share",
)
MEMORY_DETAILS = ("agent_rss", "vmm_tcg_cache", "vmm_guest_ram_touched", "vmm_guest_ram_pss", "vmm_pss")
# CPU components, in millicores. The idle ones are what the pod costs all the time; the start
# burst is shown beside them (it is transient and not part of podFixed).
CPU_COMPONENTS = ("vmm_idle", "runtime_idle")
CPU_DETAILS = ("agent_idle", "guest_idle", "vmm_container_start")


@dataclass(frozen=True)
class Spread:
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise InvalidArgument("no samples")
        return cls(min(values), statistics.median(values), max(values))


@dataclass
class Sample:
    """One sandbox's figures: memory in bytes, CPU in millicores."""

    memory: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def memory_total(self) -> int:
        return sum(self.memory.get(k, 0) for k in MEMORY_COMPONENTS)

    @property
    def guest_memory(self) -> int:
        """What the guest needs besides its containers: kernel reservation plus idle use."""
        return self.memory.get("guest_kernel_reserved", 0) + self.memory.get("guest_idle_used", 0)

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.get(k, 0.0) for k in CPU_COMPONENTS)


@dataclass
class Measurement:
    """N samples taken on one node, with the conditions they were taken under."""

    samples: list[Sample]
    margin_percent: float
    # accel, backend, vm_memory_mib, vcpus, kernel, tb_cache_mib, measured_at, idle_window_seconds...
    conditions: dict[str, Any] = field(default_factory=dict)

    def memory_spread(self, component: str) -> Spread:
        return Spread.of([float(s.memory.get(component, 0)) for s in self.samples])

    def cpu_spread(self, component: str) -> Spread:
        return Spread.of([s.cpu.get(component, 0.0) for s in self.samples])

    @property
    def observed_memory_bytes(self) -> int:
        """The highest total memory overhead any sample showed."""
        return max(s.memory_total for s in self.samples)

    @property
    def observed_cpu_millicores(self) -> float:
        return max(s.cpu_total for s in self.samples)

    @property
    def guest_memory_bytes(self) -> int:
        """The highest guest-side need (kernel reservation plus idle use): what VM sizing adds."""
        return max(s.guest_memory for s in self.samples)

    @property
    def recommended_memory_bytes(self) -> int:
        """Highest observed plus the margin, rounded up to a whole MiB."""
        return math.ceil(self._with_margin(self.observed_memory_bytes) / MIB) * MIB

    @property
    def recommended_cpu_millicores(self) -> int:
        """Highest observed plus the margin, rounded up to 10m, at least 10m."""
        return max(10, math.ceil(self._with_margin(self.observed_cpu_millicores) / 10) * 10)

    def _with_margin(self, value: float) -> Fraction:
        # Exact decimal arithmetic: 200 MiB + 10% is 220 MiB, not 220.00000000000003.
        return Fraction(str(value)) * (100 + Fraction(str(self.margin_percent))) / 100

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "conditions": self.conditions,
            "margin_percent": self.margin_percent,
            "samples": [asdict(s) for s in self.samples],
            # Derived figures, written for people and other tools; recomputed on load.
            "observed": {"memory_bytes": self.observed_memory_bytes, "cpu_millicores": self.observed_cpu_millicores},
            "guest_memory_bytes": self.guest_memory_bytes,
            "recommended": {
                "memory_bytes": self.recommended_memory_bytes,
                "cpu_millicores": self.recommended_cpu_millicores,
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "<measurement>") -> Measurement:
        try:
            if data.get("format") != FORMAT_VERSION:
                raise InvalidArgument(f"{source}: unknown measurement format {data.get('format')!r}")
            samples = [
                Sample(
                    memory={k: int(v) for k, v in s["memory"].items()}, cpu={k: float(v) for k, v in s["cpu"].items()}
                )
                for s in data["samples"]
            ]
            if not samples:
                raise InvalidArgument(f"{source}: the measurement has no samples")
            return cls(
                samples=samples, margin_percent=float(data["margin_percent"]), conditions=dict(data["conditions"])
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidArgument(f"{source} is not a kvmsandbox overhead measurement: {e!r}") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


def load_measurement(path: Path) -> Measurement:
    """Raises FailedPrecondition when the file does not exist, InvalidArgument when it is not a measurement."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FailedPrecondition(
            f"no overhead measurement at {path}: run `kvmsandbox overhead measure` on this node first"
        ) from None
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path} is not a kvmsandbox overhead measurement")
    return Measurement.from_json(data, str(path))
