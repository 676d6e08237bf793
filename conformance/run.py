"""``make conformance``: critest against a real ``kvmsandbox serve``.

Starts a loopback docker-registry holding the images critest pulls (``images.py``), a server whose
registry mirrors map registry.k8s.io, k8s.gcr.io, gcr.io and public.ecr.aws to it, with its own
pod bridge, runs critest with only the not-applicable specs skipped (``skips.py``), prints critest's
summary and exits with critest's status. Every pod is removed and the server stopped afterwards.

    python -m conformance.run --critest PATH --crictl PATH [--focus RE] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from conformance.images import push_test_images
from conformance.skips import KNOWN_GAPS, NOT_APPLICABLE, skip_regex
from kvmsandbox.host.mounts import mounts_below
from kvmsandbox.hypervisor.libvirt_embed import prepare_embed_root, seed_capabilities
from tests.registry import running_registry

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("KVMSANDBOX_TEST_CACHE", "/var/cache/kvmsandbox"))
BRIDGE = "kvsbconf0"
SUBNET = "10.79.0.0/24"
MIRRORED = ("registry.k8s.io", "k8s.gcr.io", "gcr.io", "public.ecr.aws")


def _tool(path: str, name: str, variable: str) -> Path:
    tool = Path(path) if path else None
    if tool is None or not (tool.is_file() and os.access(tool, os.X_OK)):
        sys.exit(
            f"conformance: {name} not found ({path or 'not given'}): pass {variable}=/path/to/{name} "
            f"(cri-tools v1.36.0; see README, Conformance)"
        )
    return tool


def _config(base: Path, registry_url: str) -> dict[str, object]:
    net = base / "net.d"
    net.mkdir()
    conflist = {
        "cniVersion": "1.0.0",
        "name": "kvmsandbox-conformance",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(base / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (net / "10-conformance.conflist").write_text(json.dumps(conflist, indent=1))
    return {
        "state_dir": str(base / "s"),
        "run_dir": str(base / "r"),
        "cache_dir": str(CACHE_DIR),
        "socket": str(base / "cri.sock"),
        "agent": {"ready_timeout_seconds": 240},
        "network": {"cni_conf_dirs": [str(net)]},
        "registry": {"mirrors": {host: [registry_url] for host in MIRRORED}},
    }


def _serve(base: Path, config: dict[str, object]) -> subprocess.Popen[bytes]:
    libvirt_root = base / "s" / "libvirt"
    prepare_embed_root(libvirt_root)
    seed_capabilities(libvirt_root, CACHE_DIR / "libvirt-caps")
    config_path = base / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = open(base / "serve.log", "ab")  # noqa: SIM115 - the child holds it
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmsandbox.cli", "--config", str(config_path), "serve"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    socket = Path(str(config["socket"]))
    deadline = time.monotonic() + 120
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            sys.exit(f"conformance: kvmsandbox serve did not start:\n{(base / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.2)
    return process


def _cleanup(crictl: Path, socket: Path, process: subprocess.Popen[bytes]) -> None:
    """Removes what critest left (a failed spec can leave pods) and stops the server."""
    endpoint = f"unix://{socket}"
    listed = subprocess.run([str(crictl), "-r", endpoint, "pods", "-q"], capture_output=True, text=True, check=False)
    pods = listed.stdout.split()
    for pod in pods:
        subprocess.run([str(crictl), "-r", endpoint, "rmp", "-f", pod], capture_output=True, check=False)
    if pods:
        print(f"conformance: removed {len(pods)} pods critest left")
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    subprocess.run(["ip", "link", "del", "dev", BRIDGE], capture_output=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--critest", default=os.environ.get("CRITEST", ""))
    parser.add_argument("--crictl", default=os.environ.get("CRICTL", ""))
    parser.add_argument("--focus", default="", help="run only the specs matching this regular expression")
    parser.add_argument("--report", default="", help="write critest's JUnit report here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args(argv)
    critest = _tool(args.critest, "critest", "CRITEST")
    crictl = _tool(args.crictl, "crictl", "CRICTL")
    base = Path(tempfile.mkdtemp(prefix="kvsb-conf-", dir="/tmp"))
    base.chmod(0o711)  # the VMMs run as other users and must reach their files below
    started = time.monotonic()
    try:
        with running_registry(base / "registry") as registry:
            count = push_test_images(registry, base / "build", CACHE_DIR / "conformance", say=lambda s: print(s))
            print(f"conformance: {count} image references in {registry.url}")
            config = _config(base, registry.url)
            process = _serve(base, config)
            socket = Path(str(config["socket"]))
            try:
                rc = _critest(critest, socket, args.focus, args.report, base / "critest.json")
                _summary(base / "critest.json")
            finally:
                _cleanup(crictl, socket, process)
    finally:
        # A pod the server could not remove keeps mounts below: never delete through them.
        left = mounts_below(Path(os.path.realpath(base)))
        if left:
            print(f"conformance: {len(left)} mounts left below {base} (kept, not deleted): {left[0].mount_point}")
        if left or args.keep or os.environ.get("CONFORMANCE_KEEP"):
            print(f"conformance: work directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"conformance: critest exited {rc} after {time.monotonic() - started:.0f} s")
    return rc


def _summary(report: Path) -> None:
    """critest's counts from its JSON report (ginkgo's succinct output does not print them)."""
    try:
        suites = json.loads(report.read_text())
    except (OSError, ValueError) as e:
        print(f"conformance: no critest report ({e})")
        return
    specs = [s for suite in suites for s in suite.get("SpecReports", []) if s.get("LeafNodeType") == "It"]
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.get("State", "?")] = counts.get(s.get("State", "?"), 0) + 1
    print(
        f"conformance: critest v1.36.0: {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
        f"{counts.get('skipped', 0)} skipped of {len(specs)} specs"
    )
    for s in specs:
        if s.get("State") not in ("passed", "skipped"):
            print(f"  {s.get('State')}: {' '.join(s.get('ContainerHierarchyTexts') or [])} {s.get('LeafNodeText')}")


def _critest(critest: Path, socket: Path, focus: str, report: str, json_report: Path) -> int:
    print(f"conformance: skipping {len(NOT_APPLICABLE)} not-applicable specs (conformance/skips.py):")
    for text, reason in NOT_APPLICABLE:
        print(f"  - {text}: {reason}")
    print(f"conformance: skipping {len(KNOWN_GAPS)} specs that still fail here (known gaps, conformance/skips.py):")
    for text, reason in KNOWN_GAPS:
        print(f"  - {text}: {reason}")
    command = [
        str(critest),
        f"--runtime-endpoint=unix://{socket}",
        f"--image-endpoint=unix://{socket}",
        f"--ginkgo.skip={skip_regex()}",
        "--ginkgo.no-color",
        "--ginkgo.succinct",
        f"--ginkgo.json-report={json_report}",
    ]
    if focus:
        command.append(f"--ginkgo.focus={focus}")
    if report:
        command.append(f"--ginkgo.junit-report={report}")
    # critest looks for /etc/crictl.yaml and then its own directory; give it an empty config.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as cfg:
        cfg.write("{}\n")
        cfg.flush()
        return subprocess.run([*command, f"--config={cfg.name}"], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
