"""What the benchmarks share: a SandboxManager over a throwaway state dir, opened as the runtime
opens one, closed and cleaned up after the run.

The scripts import it as a sibling (``from common import ...``): Python puts a script's own
directory first on ``sys.path``, so ``.venv/bin/python benchmarks/X.py`` finds it from any directory.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from kvmsandbox.config import AgentConfig, Config, HypervisorConfig
from kvmsandbox.guest_image import build_guest_image
from kvmsandbox.runtime import open_manager
from kvmsandbox.sandbox.manager import SandboxManager


@contextlib.contextmanager
def bench_manager(
    backend: Literal["libvirt", "qemu"],
    cache_dir: Path,
    *,
    work_dir: Path | None = None,
    ready_timeout: float = 300,
    **config_overrides: Any,
) -> Iterator[tuple[SandboxManager, Path]]:
    """Yields a SandboxManager on ``backend`` with its state and run dirs in ``work_dir`` (a new
    /tmp/ksb-* dir when None), and that dir for the benchmark's own files.

    The guest image in ``cache_dir`` is built first if it is missing or stale. ``config_overrides``
    are further ``Config`` fields (e.g. ``network``). On exit the manager lets go of its agents, the
    hypervisor connection is closed and ``work_dir`` is removed; sandboxes are the caller's to destroy.

    Raises:
        GuestImageError: the guest image cannot be built. HypervisorError: the backend cannot be opened.
    """
    work = work_dir or Path(tempfile.mkdtemp(prefix="ksb-", dir="/tmp"))
    work.chmod(0o711)  # VMMs (uids of their own) pass through to libvirt's files for them
    try:
        config = Config(
            state_dir=work / "state",
            run_dir=work / "run",
            cache_dir=cache_dir,
            hypervisor=HypervisorConfig(backend=backend),
            agent=AgentConfig(ready_timeout_seconds=ready_timeout),
            **config_overrides,
        )
        build_guest_image(config.guest_image_dir)
        manager = open_manager(config, backend)
        try:
            yield manager, work
        finally:
            manager.close()
            manager.hypervisor.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
