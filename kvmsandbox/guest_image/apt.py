"""The host's apt: its configured mirrors (for mmdebstrap) and package downloads (kernel, busybox).

The guest image uses the same Debian mirror as the host, so it builds wherever the host can install
packages (including behind a local mirror or proxy) and never needs a URL of its own.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.errors import GuestImageError

ETC_APT = Path("/etc/apt")
# apt-get download as root warns that its sandbox user cannot write the target dir; run it as root.
APT_OPTIONS = ("-o", "APT::Sandbox::User=root")


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` source: a mirror URI with its suites and components."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def parse_deb822(text: str) -> list[AptSource]:
    """The ``deb`` entries of a deb822 ``.sources`` file (``Enabled: no`` ones are skipped).
    Raises nothing: paragraphs without URIs or Suites are ignored, as apt would reject them."""
    sources: list[AptSource] = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in paragraph.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        uris, suites = fields.get("uris", "").split(), tuple(fields.get("suites", "").split())
        signed_by = fields.get("signed-by") or None
        if signed_by is not None and " " in signed_by:
            signed_by = None  # an inline key block; mmdebstrap then falls back to the default keyrings
        for uri in uris:
            if suites:
                sources.append(AptSource(uri, suites, tuple(fields.get("components", "").split()), signed_by))
    return sources


def parse_one_line(text: str) -> list[AptSource]:
    """The ``deb`` lines of a one-line-style ``sources.list``. Raises nothing."""
    sources: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        signed_by = None
        options = re.match(r"deb\s+\[([^\]]*)\]\s*", line)
        if options:
            for opt in options.group(1).split():
                name, _, value = opt.partition("=")
                if name == "signed-by":
                    signed_by = value
            line = "deb " + line[options.end() :]
        words = line.split()
        if len(words) >= 3:
            sources.append(AptSource(words[1], (words[2],), tuple(words[3:]), signed_by))
    return sources


def host_sources(etc_apt: Path = ETC_APT) -> list[AptSource]:
    """Every ``deb`` source configured on the host, in apt's file order. Raises nothing."""
    sources: list[AptSource] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        sources += parse_one_line(main.read_text(errors="replace"))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += parse_one_line(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                sources += parse_deb822(path.read_text(errors="replace"))
    return sources


def mirror_lines(
    sources: Sequence[AptSource], suite: str, update_suites: Sequence[str], components: Sequence[str]
) -> list[str]:
    """mmdebstrap mirror arguments (``deb [signed-by=K] URI SUITE COMPONENTS``) for ``suite`` and
    those ``update_suites`` the host has, each from the first host source carrying it.

    Raises:
        GuestImageError: no host source carries ``suite`` with the wanted components.
    """
    lines: list[str] = []
    for wanted in (suite, *update_suites):
        for src in sources:
            if wanted in src.suites and set(components) <= set(src.components):
                opts = f"[signed-by={src.signed_by}] " if src.signed_by else ""
                lines.append(f"deb {opts}{src.uri} {wanted} {' '.join(components)}")
                break
        else:
            if wanted == suite:
                raise GuestImageError(
                    f"no apt source on this host carries suite {suite!r} with components "
                    f"{', '.join(components)} (looked in /etc/apt/sources.list and sources.list.d)"
                )
    return lines


def _run(args: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestImageError(f"{args[0]} is not installed on this host") from None
    if proc.returncode != 0:
        words = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise GuestImageError(f"{' '.join(args)} failed (exit {proc.returncode}): {' / '.join(words)}")
    return proc.stdout


def parse_depends(output: str, prefix: str) -> str | None:
    """The first package named in ``apt-cache depends`` output's Depends lines that starts with
    ``prefix``. Raises nothing."""
    for line in output.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if m and m.group(1).startswith(prefix) and not m.group(1).startswith("<"):
            return m.group(1)
    return None


def resolve_kernel_package(metapackage: str) -> str:
    """The versioned kernel package the metapackage depends on (``linux-image-amd64`` ->
    ``linux-image-6.1.0-56-amd64``), as apt's candidate has it.

    Raises:
        GuestImageError: apt does not know the metapackage (no package lists: run apt-get update) or
            it depends on no kernel image.
    """
    try:
        out = _run(["apt-cache", *APT_OPTIONS, "depends", metapackage])
    except GuestImageError as e:
        raise GuestImageError(
            f"apt cannot find the kernel metapackage {metapackage} ({e}); "
            "are the package lists present (apt-get update)?"
        ) from None
    package = parse_depends(out, "linux-image-")
    if package is None:
        raise GuestImageError(
            f"{metapackage} depends on no linux-image-* package (apt-cache depends said {out.strip()!r})"
        )
    return package


def download(packages: Sequence[str], dest: Path) -> dict[str, Path]:
    """Downloads the candidate .deb of each package into ``dest``; returns package -> file.

    Raises:
        GuestImageError: apt cannot find or fetch a package.
    """
    before = set(dest.glob("*.deb"))
    try:
        _run(["apt-get", *APT_OPTIONS, "-q", "download", *packages], cwd=dest)
    except GuestImageError as e:
        raise GuestImageError(
            f"cannot download {', '.join(packages)}: {e}; are the package lists present (apt-get update)?"
        ) from None
    fetched = sorted(set(dest.glob("*.deb")) - before)
    result: dict[str, Path] = {}
    for package in packages:
        matches = [p for p in fetched if p.name.startswith(package + "_")]
        if len(matches) != 1:
            raise GuestImageError(f"apt-get download {package} left {len(matches)} matching .deb files in {dest}")
        result[package] = matches[0]
    return result


def extract(deb: Path, dest: Path) -> None:
    """Unpacks a .deb's files into ``dest`` (``dpkg -x``).

    Raises:
        GuestImageError: dpkg failed.
    """
    _run(["dpkg", "-x", str(deb), str(dest)])


def package_version(deb: Path) -> str:
    """The Version field of a .deb.

    Raises:
        GuestImageError: dpkg-deb failed.
    """
    return _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
