"""The host's command-line tools: which are installed, and at what version."""

from __future__ import annotations

import shutil
import subprocess


def tool_version(argv: list[str]) -> str:
    """First line a tool prints for its version, or why there is none."""
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return out.strip().splitlines()[0] if out.strip() else "unknown"
