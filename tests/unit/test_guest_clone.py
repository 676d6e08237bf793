"""A clone's identity in the guest agent: bounded entropy, the ioctl argument, the clock floor."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from kvmsandbox.agent.guest import clone
from kvmsandbox.agent.guest.errors import AgentFault, InvalidArgument


def test_entropy_argument_is_rand_pool_info_credited_in_bits() -> None:
    arg = clone.entropy_ioctl_arg(b"x" * 64)
    assert struct.unpack("ii", arg[:8]) == (512, 64)
    assert arg[8:] == b"x" * 64


@pytest.mark.parametrize("size", [0, 1, clone.MIN_ENTROPY_BYTES - 1, clone.MAX_ENTROPY_BYTES + 1, 1 << 20])
def test_entropy_out_of_bounds_is_refused_before_the_kernel_is_asked(size: int, tmp_path: Path) -> None:
    device = tmp_path / "urandom"
    with pytest.raises(InvalidArgument, match="clone entropy"):
        clone.reseed(b"\0" * size, device=str(device))
    assert not device.exists()


def test_a_device_refusing_the_ioctl_is_an_agent_fault(tmp_path: Path) -> None:
    # A regular file has no RNDADDENTROPY: the kernel answers ENOTTY.
    device = tmp_path / "urandom"
    device.write_bytes(b"")
    with pytest.raises(AgentFault, match="reseed"):
        clone.reseed(b"\1" * 32, device=str(device))


def test_python_random_is_reseeded_from_the_reseeded_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clone.fcntl, "ioctl", lambda *a: 0)
    random.seed(1)
    template_state = random.random()
    random.seed(1)
    clone.reseed(b"a" * 32, device="/dev/null")
    first = random.random()
    random.seed(1)
    clone.reseed(b"a" * 32, device="/dev/null")
    # Two clones with the same state and even the same host bytes part ways.
    assert len({template_state, first, random.random()}) == 3


def test_a_clock_before_2020_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="before 2020"):
        clone.set_clock(0)
