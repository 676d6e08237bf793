"""The states of a sandbox and of a container, and the one table of legal moves between them."""

from __future__ import annotations

import enum
from typing import Protocol, TypeVar

from kvmsandbox.errors import IllegalTransition


class SandboxState(enum.Enum):
    """BOOTING until the guest is set up; READY while the agent serves it; BROKEN when the agent is
    unreachable or misbehaves (nothing more is asked of the guest, stop and remove still work);
    STOPPED once the VM is gone (the record stays until removed)."""

    BOOTING = "booting"
    READY = "ready"
    BROKEN = "broken"
    STOPPED = "stopped"


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


S = TypeVar("S", SandboxState, ContainerState)

# Staying in the same state is never a transition: callers that are idempotent check first.
TRANSITIONS: dict[enum.Enum, frozenset[enum.Enum]] = {
    # BOOTING -> STOPPED: stopped (or removed, keeping its network) before it became ready.
    SandboxState.BOOTING: frozenset({SandboxState.READY, SandboxState.STOPPED}),
    SandboxState.READY: frozenset({SandboxState.BROKEN, SandboxState.STOPPED}),
    SandboxState.BROKEN: frozenset({SandboxState.STOPPED}),
    SandboxState.STOPPED: frozenset(),
    # CREATED -> EXITED: the sandbox stopped before the container was started.
    ContainerState.CREATED: frozenset({ContainerState.RUNNING, ContainerState.EXITED}),
    ContainerState.RUNNING: frozenset({ContainerState.EXITED}),
    ContainerState.EXITED: frozenset(),
}


class _Stateful(Protocol[S]):
    id: str
    state: S


def move(obj: _Stateful[S], new: S) -> None:
    """Moves ``obj`` (a sandbox or container record) to ``new``.

    Raises:
        IllegalTransition: the table has no such move; the message names both states.
    """
    if new not in TRANSITIONS[obj.state]:
        kind = "sandbox" if isinstance(new, SandboxState) else "container"
        raise IllegalTransition(f"{kind} {obj.id} cannot go from {obj.state.value} to {new.value}")
    obj.state = new
