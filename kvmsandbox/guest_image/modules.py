"""Kernel module dependency closure, from the files depmod writes (modules.dep & co).

The initramfs has busybox ``insmod`` only (no modprobe, no depmod data), so the load order is
computed here: every wanted module after its dependencies, built-in modules left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmsandbox.errors import GuestImageError

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    """The kernel's name for a module file: ``kernel/fs/9p/9p.ko.xz`` -> ``9p``, ``virtio-rng`` ->
    ``virtio_rng`` (the kernel treats ``-`` and ``_`` alike in module names)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass(frozen=True)
class ModuleIndex:
    """What depmod knows about one kernel's modules."""

    paths: dict[str, str]
    """Module name -> file path relative to /lib/modules/<version>."""
    deps: dict[str, tuple[str, ...]]
    """Module name -> names of every module it needs (modules.dep lists the whole transitive set)."""
    builtin: frozenset[str] = frozenset()
    softdeps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Module name -> its ``pre:`` soft dependencies (module names or aliases), from modules.softdep."""
    aliases: dict[str, frozenset[str]] = field(default_factory=dict)
    """Alias -> module names providing it (loadable ones from modules.alias, built-in ones too)."""


def parse_modules_dep(text: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Parses modules.dep (``path: dep-path dep-path ...`` per line) into (paths, deps) by name.

    Raises:
        GuestImageError: a line has no colon.
    """
    paths: dict[str, str] = {}
    deps: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise GuestImageError(f"modules.dep line {lineno} is malformed: {line!r}")
        name = module_name(path.strip())
        paths[name] = path.strip()
        deps[name] = tuple(module_name(d) for d in rest.split())
    return paths, deps


def parse_builtin(text: str) -> frozenset[str]:
    """Names of the built-in modules, from modules.builtin (one path per line)."""
    return frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())


def parse_softdeps(text: str) -> dict[str, tuple[str, ...]]:
    """The ``pre:`` soft dependencies per module, from modules.softdep
    (``softdep NAME pre: A B post: C``)."""
    result: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        pre: list[str] = []
        section = ""
        for word in words[2:]:
            if word.endswith(":"):
                section = word
            elif section == "pre:":
                pre.append(word)
        if pre:
            name = module_name(words[1])
            result[name] = (*result.get(name, ()), *pre)
    return result


def parse_aliases(alias_text: str, builtin_modinfo: bytes = b"") -> dict[str, frozenset[str]]:
    """Alias -> module names, from modules.alias (``alias ALIAS NAME``) and the ``NAME.alias=ALIAS``
    records of modules.builtin.modinfo (NUL separated)."""
    result: dict[str, set[str]] = {}
    for line in alias_text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            result.setdefault(words[1], set()).add(module_name(words[2]))
    for record in builtin_modinfo.split(b"\0"):
        key, sep, value = record.decode(errors="replace").partition("=")
        name, dot, attr = key.partition(".")
        if sep and dot and attr == "alias":
            result.setdefault(value, set()).add(module_name(name))
    return {alias: frozenset(names) for alias, names in result.items()}


def load_index(modules_dir: Path) -> ModuleIndex:
    """Reads the depmod files of ``/lib/modules/<version>`` (modules.dep is required, the others
    are optional).

    Raises:
        GuestImageError: modules.dep is missing or malformed.
    """

    def read(name: str) -> str:
        p = modules_dir / name
        return p.read_text() if p.is_file() else ""

    dep_file = modules_dir / "modules.dep"
    if not dep_file.is_file():
        raise GuestImageError(f"{dep_file} is missing (depmod did not run?)")
    paths, deps = parse_modules_dep(dep_file.read_text())
    modinfo = modules_dir / "modules.builtin.modinfo"
    return ModuleIndex(
        paths=paths,
        deps=deps,
        builtin=parse_builtin(read("modules.builtin")),
        softdeps=parse_softdeps(read("modules.softdep")),
        aliases=parse_aliases(read("modules.alias"), modinfo.read_bytes() if modinfo.is_file() else b""),
    )


def module_closure(wanted: Sequence[str], index: ModuleIndex) -> list[str]:
    """Every module needed to load ``wanted``, each after its dependencies (modules.dep) and after
    the modules its ``pre:`` soft dependencies name; built-in modules are left out. The order is
    deterministic: wanted modules in the given order, each preceded by what it needs.

    Soft dependencies on an alias (``crypto-crc32c``) are not resolved by guessing among the modules
    that provide it; one of them must come earlier in ``wanted`` (or be built in).

    Raises:
        GuestImageError: a module is unknown, the dependencies form a cycle, or an alias soft
            dependency is not satisfied by an earlier module.
    """
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(raw: str) -> None:
        name = module_name(raw)
        if name in done or name in index.builtin:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise GuestImageError(f"module dependency cycle: {cycle}")
        if name not in index.paths:
            needed_by = f" (needed by {visiting[-1]})" if visiting else ""
            raise GuestImageError(f"kernel module {raw}{needed_by} is neither in modules.dep nor built in")
        visiting.append(name)
        for soft in index.softdeps.get(name, ()):
            _visit_soft(soft, name)
        for dep in index.deps.get(name, ()):
            visit(dep)
        visiting.pop()
        done.add(name)
        order.append(name)

    def _visit_soft(target: str, owner: str) -> None:
        as_module = module_name(target)
        if as_module in index.paths or as_module in index.builtin:
            visit(as_module)
            return
        providers = index.aliases.get(target)
        if providers is None:
            # modprobe ignores soft dependencies that name nothing; so do we.
            return
        if providers & (done | index.builtin):
            return
        raise GuestImageError(
            f"module {owner} soft-depends on {target!r} (provided by {', '.join(sorted(providers))}): "
            f"list one of them before {owner} in the recipe's modules"
        )

    for name in wanted:
        visit(name)
    return order


def module_paths(order: Iterable[str], index: ModuleIndex) -> list[tuple[str, str]]:
    """(name, path relative to /lib/modules/<version>) for each module of a closure. Raises nothing."""
    return [(name, index.paths[name]) for name in order]
