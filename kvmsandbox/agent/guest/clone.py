"""What a clone of a VM template does first: every clone resumes with its template's memory, so the
kernel's random pool, the agent's own generators and the wall clock are those of the moment the
template was saved. The host sends fresh entropy and its clock; both are applied before anything
else of the pod is set up."""

from __future__ import annotations

import fcntl
import os
import random
import struct
import time

from kvmsandbox.agent.guest import log
from kvmsandbox.agent.guest.errors import AgentFault, InvalidArgument
from kvmsandbox.agent.v1 import agent_pb2 as pb

URANDOM = "/dev/urandom"
MAX_ENTROPY_BYTES = 512
MIN_ENTROPY_BYTES = 32
# linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def entropy_ioctl_arg(entropy: bytes) -> bytes:
    """struct rand_pool_info for ``entropy``, credited in full (it comes from the host's CSPRNG)."""
    return struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy


def reseed(entropy: bytes, device: str = URANDOM) -> None:
    """Mixes ``entropy`` into the kernel's pool, reseeds the kernel's generator from it, and
    reseeds Python's ``random`` (whose state every clone would otherwise share).

    Raises:
        InvalidArgument: fewer than MIN_ENTROPY_BYTES or more than MAX_ENTROPY_BYTES.
        AgentFault: the kernel refused.
    """
    if not MIN_ENTROPY_BYTES <= len(entropy) <= MAX_ENTROPY_BYTES:
        raise InvalidArgument(
            f"clone entropy must be {MIN_ENTROPY_BYTES}-{MAX_ENTROPY_BYTES} bytes, got {len(entropy)}"
        )
    try:
        with open(device, "wb", buffering=0) as f:
            fcntl.ioctl(f.fileno(), RNDADDENTROPY, entropy_ioctl_arg(entropy))
            fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
    except OSError as e:
        raise AgentFault(f"cannot reseed the kernel's random generator: {e}") from None
    # From the reseeded kernel, not from the bytes credited to it.
    random.seed(os.urandom(32))


def set_clock(realtime_unix_ns: int) -> None:
    """Sets the wall clock. Raises InvalidArgument for a time before 2020, AgentFault when refused."""
    if realtime_unix_ns < 1_577_836_800 * 10**9:
        raise InvalidArgument(f"clone clock {realtime_unix_ns} ns is before 2020")
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, realtime_unix_ns)
    except OSError as e:
        raise AgentFault(f"cannot set the clock: {e}") from None


def apply(identity: pb.CloneIdentity) -> None:
    """A clone's identity (see the module docstring). Raises as ``reseed`` and ``set_clock``."""
    reseed(identity.entropy)
    if identity.realtime_unix_ns:
        set_clock(identity.realtime_unix_ns)
    log.event("clone-identity", entropy_bytes=str(len(identity.entropy)))
