"""The ``kvmsandbox`` command: doctor, guest image, demo."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from kvmsandbox import __version__
from kvmsandbox.config import Config, load_config
from kvmsandbox.errors import KvmSandboxError


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else None)


def cmd_guest_image_build(args: argparse.Namespace) -> int:
    from kvmsandbox.guest_image import build_guest_image, describe

    config = _config(args)
    report = build_guest_image(config.guest_image_dir, force=args.force, progress=lambda m: print(f"  {m}", flush=True))
    print(describe(report))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from kvmsandbox.doctor import run_doctor

    return run_doctor(_config(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from kvmsandbox.demo import run_demo

    return run_demo(_config(args), backend=args.backend, keep=args.keep)


def cmd_serve(args: argparse.Namespace) -> int:
    from kvmsandbox.cri.server import serve

    config = _config(args)
    ready = threading.Event()
    if args.demo:
        from kvmsandbox.demo import run_cri_demo

        threading.Thread(target=run_cri_demo, args=(config, ready), name="demo", daemon=True).start()
    return serve(config, ready=ready)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvmsandbox", description="A container runtime that runs every pod in its own VM."
    )
    parser.add_argument("--version", action="version", version=f"kvmsandbox {__version__}")
    parser.add_argument("--config", help="YAML config file (default /etc/kvmsandbox/config.yaml if it exists)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every event")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the CRI (RuntimeService and ImageService) on a unix socket")
    p.add_argument("--demo", action="store_true", help="once serving, run a demo pod through the socket")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("doctor", help="check this host and say what to fix")
    p.set_defaults(func=cmd_doctor)

    gi = sub.add_parser("guest-image", help="build or inspect the guest image")
    gi_sub = gi.add_subparsers(dest="guest_image_command", required=True)
    p = gi_sub.add_parser("build", help="build the guest image (cached by a hash of its recipe and the agent)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    p.set_defaults(func=cmd_guest_image_build)

    p = sub.add_parser("demo", help="boot a sandbox, run a container in it, print its output, tear down")
    p.add_argument("--backend", choices=["libvirt", "qemu"], help="override the configured hypervisor backend")
    p.add_argument("--keep", action="store_true", help="leave the sandbox running")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KvmSandboxError as e:
        print(f"kvmsandbox: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def tool_version(argv: list[str]) -> str:
    """First line a tool prints for its version, or why there is none."""
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.2f}s"


if __name__ == "__main__":
    raise SystemExit(main())
