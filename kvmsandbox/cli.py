"""The ``kvmsandbox`` command: serve, console, doctor, guest image, demo, templates, overhead."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmsandbox import __version__
from kvmsandbox.config import Config, load_config
from kvmsandbox.errors import InvalidArgument, KvmSandboxError

if TYPE_CHECKING:
    from kvmsandbox.overhead.model import Measurement


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


def cmd_console(args: argparse.Namespace) -> int:
    from kvmsandbox.console.client import run

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run(_config(args), args.pod, args.identity, command)


def cmd_overhead_measure(args: argparse.Namespace) -> int:
    from kvmsandbox.overhead.measure import measure_node
    from kvmsandbox.overhead.report import render_measurement
    from kvmsandbox.runtime import open_manager
    from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs

    config = _config(args)
    if args.samples < 1:
        raise InvalidArgument("--samples must be at least 1")
    margin = config.overhead.margin_percent if args.margin is None else args.margin
    if margin < 0:
        raise InvalidArgument("--margin must not be negative")
    handler = args.handler or config.runtime_handlers[0]
    if handler not in config.runtime_handlers:
        raise InvalidArgument(
            f"unknown runtime handler {handler!r}: this node serves {', '.join(config.runtime_handlers)}"
        )
    from_template = handler in config.templates.handlers
    manager = open_manager(config, "qemu" if from_template else args.backend)
    start = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{elapsed(start):>7}] {message}", file=sys.stderr, flush=True)

    try:
        layer = make_busybox_rootfs(config.cache_dir / "overhead-busybox-rootfs")
        m = measure_node(
            manager, layer, args.samples, margin_percent=margin, progress=progress, from_template=from_template
        )
    finally:
        manager.close()
    print(render_measurement(m))
    target = config.measurement_file_for(handler)
    m.save(target)
    print(f"\nwritten to {target} (read for handler {handler}'s RuntimeClass; the node's file for sizing and checks)")
    if args.json:
        m.save(Path(args.json))
        print(f"written to {args.json}")
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    """``template build|list|rm``: the VM templates of this node (qemu backend)."""
    from kvmsandbox.runtime import open_manager

    config = _config(args)
    manager = open_manager(config, "qemu")
    try:
        templates = manager.templates
        if args.template_command == "build":
            if not templates.supported:
                raise InvalidArgument("VM templates need the qemu backend")
            if args.vcpus not in templates.vcpus:
                raise InvalidArgument(
                    f"--vcpus {args.vcpus}: templates are kept for {templates.vcpus} (templates.vcpus)"
                )
            sizes = [int(m) for m in args.memory] if args.memory else templates.classes
            for memory in sizes:
                size = templates.memory_class(memory)
                if size is None:
                    raise InvalidArgument(f"{memory} MiB is above the largest memory class {templates.classes[-1]}")
                start = time.monotonic()
                info = templates.build(args.vcpus, size)
                print(f"template {info.key}: {args.vcpus} vCPU, {size} MiB, "
                      f"{info.data_bytes / 2**20:.1f} MiB of guest memory shared, {elapsed(start)}")  # fmt: skip
        elif args.template_command == "list":
            listed = templates.listed()
            print(f"{'KEY':<26}{'VCPUS':>6}{'MEMORY':>9}{'SHARED':>10}  {'BUILT':<20} STATE")
            for item in listed:
                if item.info is None:
                    print(f"{item.key:<26}{'?':>6}{'?':>9}{'?':>10}  {'?':<20} unreadable")
                    continue
                i = item.info
                built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_at))
                state = "stale" if item.stale else "current"
                print(f"{i.key:<26}{i.inputs.get('vcpus', '?'):>6}{i.memory_mib:>6}MiB"
                      f"{i.data_bytes / 2**20:>7.1f}MiB  {built:<20} {state}")  # fmt: skip
            if not listed:
                print("(no templates)")
        else:
            keys = [t.key for t in templates.listed() if args.all or (args.stale and t.stale) or t.key in args.keys]
            unknown = set(args.keys) - {t.key for t in templates.listed()}
            if unknown:
                raise InvalidArgument(f"no template {sorted(unknown)[0]!r} (see `kvmsandbox template list`)")
            for key in keys:
                templates.remove(key)
                print(f"removed template {key}")
    finally:
        manager.close()
    return 0


def _measurement_from(args: argparse.Namespace, config: Config) -> Measurement:
    from kvmsandbox.overhead.model import load_measurement

    handler = getattr(args, "handler", None) or config.runtime_handlers[0]
    return load_measurement(Path(args.from_file) if args.from_file else config.measurement_file_for(handler))


def cmd_overhead_runtimeclass(args: argparse.Namespace) -> int:
    from kvmsandbox.overhead.runtimeclass import runtime_class_yaml

    config = _config(args)
    m = _measurement_from(args, config)
    handler = args.handler or config.runtime_handlers[0]
    c = m.conditions
    comment = (
        f"Pod overhead measured by kvmsandbox on {c.get('measured_at', '?')}: {plural(len(m.samples), 'pod')}, "
        f"accel {c.get('accel', '?')}, highest observed {m.observed_memory_bytes / 2**20:.1f} MiB and "
        f"{m.observed_cpu_millicores:.1f}m, plus a {m.margin_percent:g}% margin. A pod's VM is sized from its "
        "memory limit, and every GiB of it costs the guest 16 MiB of page structs more: the margin covers "
        f"limits up to {(m.recommended_memory_bytes - m.observed_memory_bytes) * 64 / 2**30:.1f} GiB; "
        "pods above get a warning."
    )
    print(
        runtime_class_yaml(
            handler,
            m.recommended_memory_bytes,
            m.recommended_cpu_millicores,
            config.overhead.node_selector,
            comment=comment,
            source=(
                f"measured {c.get('measured_at', '?')}, {plural(len(m.samples), 'sample')}, accel {c.get('accel', '?')}"
            ),
        ),
        end="",
    )
    return 0


def cmd_overhead_simulate(args: argparse.Namespace) -> int:
    from kvmsandbox.overhead.simulate import run_simulation
    from kvmsandbox.overhead.simulation_report import render_text

    config = _config(args)
    m = _measurement_from(args, config)
    out = Path(args.out)
    result = run_simulation(args.node_memory, args.node_cpu, Path(args.pods), m, out)
    print(render_text(result))
    print(f"\nwritten {out / 'simulation.md'} and {out / 'simulation.png'}")
    return 0


def _add_template_parser(sub: Any) -> None:
    tp = sub.add_parser("template", help="VM templates pods start from (qemu backend, templates.handlers)")
    tp_sub = tp.add_subparsers(dest="template_command", required=True)
    p = tp_sub.add_parser("build", help="build the templates now instead of on first use")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs of the template (default 1)")
    p.add_argument("--memory", action="append", help="MiB (rounded up to a class); default: every class")
    p.set_defaults(func=cmd_template)
    p = tp_sub.add_parser("list", help="the templates on disk, current or stale")
    p.set_defaults(func=cmd_template)
    p = tp_sub.add_parser("rm", help="remove templates (running clones keep running)")
    p.add_argument("keys", nargs="*", help="template keys (see list)")
    p.add_argument("--stale", action="store_true", help="every stale template")
    p.add_argument("--all", action="store_true", help="every template")
    p.set_defaults(func=cmd_template)


def _parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser("console", help="an authenticated shell in a pod's guest (outside its containers)")
    p.add_argument("--identity", "-i", help="private key (default: ~/.ssh/id_ed25519, id_ecdsa, id_rsa)")
    p.add_argument("pod", help="the pod's sandbox id (or a unique prefix)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="a command to run instead of a shell")
    p.set_defaults(func=cmd_console)

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

    _add_template_parser(sub)

    ov = sub.add_parser("overhead", help="measure what a VM pod costs; RuntimeClass; scheduling experiment")
    ov_sub = ov.add_subparsers(dest="overhead_command", required=True)
    p = ov_sub.add_parser("measure", help="boot N sandboxes with an idle container each and measure them")
    p.add_argument("--samples", type=int, default=3, help="sandboxes to boot (default 3)")
    p.add_argument("--json", help="also write the measurement to this file")
    p.add_argument("--margin", type=float, help="percent added to the highest observed (default from config)")
    p.add_argument("--backend", choices=["libvirt", "qemu"], help="override the configured hypervisor backend")
    p.add_argument("--handler", help="measure this runtime handler's pods (clones for a template handler)")
    p.set_defaults(func=cmd_overhead_measure)
    p = ov_sub.add_parser("runtimeclass", help="print a RuntimeClass with the measured overhead.podFixed")
    p.add_argument("--handler", help="RuntimeClass handler (default: the first configured runtime handler)")
    p.add_argument("--from", dest="from_file", help="measurement file (default: this node's)")
    p.set_defaults(func=cmd_overhead_runtimeclass)
    p = ov_sub.add_parser("simulate", help="pack a workload with no, Kata's and the measured overhead")
    p.add_argument("--node-memory", required=True, help="node memory, e.g. 24Gi")
    p.add_argument("--node-cpu", required=True, help="node CPUs, e.g. 2 or 1500m")
    p.add_argument("--pods", required=True, help="workload YAML (see examples/overhead/pods.yaml)")
    p.add_argument("--from", dest="from_file", help="measurement file (default: this node's)")
    p.add_argument("--out", default="simulation", help="directory for simulation.md and simulation.png")
    p.set_defaults(func=cmd_overhead_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.2f}s"


if __name__ == "__main__":
    raise SystemExit(main())
