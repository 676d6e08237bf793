"""The guest image recipe (``images/guest/recipe.yaml``), parsed and checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from kvmsandbox.errors import GuestImageError

RECIPE_DIR = Path("images") / "guest"
"""Where the recipe lives, relative to the source root."""
RECIPE_FILE = "recipe.yaml"
INIT_FILE = "init"

InitramfsCompression = Literal["none", "gzip"]
ErofsCompression = Literal["none", "lz4", "lz4hc"]
KernelFormat = Literal["pvh-elf", "bzimage"]


@dataclass(frozen=True)
class Recipe:
    """What goes into the guest image; see the comments in recipe.yaml for each field."""

    directory: Path
    suite: str
    components: tuple[str, ...]
    update_suites: tuple[str, ...]
    packages: tuple[str, ...]
    mmdebstrap_hooks: tuple[str, ...]
    required_files: tuple[str, ...]
    required_python_modules: tuple[str, ...]
    strip: tuple[str, ...]
    keep: tuple[str, ...]
    mount_points: tuple[str, ...]
    files: dict[str, str]
    kernel_metapackage: str
    kernel_format: KernelFormat
    initramfs_busybox_package: str
    modules: tuple[str, ...]
    initramfs_compression: InitramfsCompression
    erofs_compression: ErofsCompression

    @property
    def init_script(self) -> Path:
        """The initramfs /init shell script."""
        return self.directory / INIT_FILE


def _strings(data: dict[str, Any], name: str, *, required: bool = True) -> tuple[str, ...]:
    value = data.get(name)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise GuestImageError(f"recipe: {name!r} must be a list of non-empty strings")
    return tuple(value)


def _string(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise GuestImageError(f"recipe: {name!r} must be a non-empty string")
    return value


def _choice(data: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = data.get(name, choices[0])
    if value not in choices:
        raise GuestImageError(f"recipe: {name!r} must be one of {', '.join(choices)}, not {value!r}")
    return cast(str, value)


def _files(data: dict[str, Any], name: str) -> dict[str, str]:
    value = data.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise GuestImageError(f"recipe: {name!r} must map relative paths to file contents")
    _relative_paths(name, tuple(value))
    return dict(value)


def _relative_paths(name: str, paths: tuple[str, ...]) -> tuple[str, ...]:
    for p in paths:
        if p.startswith("/") or ".." in Path(p).parts:
            raise GuestImageError(f"recipe: {name!r} entry {p!r} must be relative to the root, without '..'")
    return paths


def parse_recipe(text: str, directory: Path) -> Recipe:
    """Parses recipe YAML text; ``directory`` is where the recipe (and its init script) live.

    Raises:
        GuestImageError: the text is not YAML or a field is missing or malformed.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GuestImageError(f"recipe: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise GuestImageError("recipe: the top level must be a mapping")
    known = set(Recipe.__dataclass_fields__) - {"directory"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GuestImageError(f"recipe: unknown field(s) {', '.join(unknown)}")
    return Recipe(
        directory=directory,
        suite=_string(data, "suite"),
        components=_strings(data, "components"),
        update_suites=_strings(data, "update_suites", required=False),
        packages=_strings(data, "packages"),
        mmdebstrap_hooks=_strings(data, "mmdebstrap_hooks", required=False),
        required_files=_relative_paths("required_files", _strings(data, "required_files", required=False)),
        required_python_modules=_strings(data, "required_python_modules", required=False),
        strip=_relative_paths("strip", _strings(data, "strip", required=False)),
        keep=_relative_paths("keep", _strings(data, "keep", required=False)),
        mount_points=_relative_paths("mount_points", _strings(data, "mount_points")),
        files=_files(data, "files"),
        kernel_metapackage=_string(data, "kernel_metapackage"),
        kernel_format=cast(KernelFormat, _choice(data, "kernel_format", ("pvh-elf", "bzimage"))),
        initramfs_busybox_package=_string(data, "initramfs_busybox_package"),
        modules=_strings(data, "modules"),
        initramfs_compression=cast(InitramfsCompression, _choice(data, "initramfs_compression", ("none", "gzip"))),
        erofs_compression=cast(ErofsCompression, _choice(data, "erofs_compression", ("none", "lz4", "lz4hc"))),
    )


def default_source_root() -> Path:
    """The source tree this package was loaded from (holds ``images/`` and ``kvmsandbox/``)."""
    return Path(__file__).resolve().parents[2]


def load_recipe(source_root: Path | None = None) -> Recipe:
    """Reads ``images/guest/recipe.yaml`` below ``source_root`` (default: this source tree).

    Raises:
        GuestImageError: the recipe or its init script is missing or malformed.
    """
    directory = (source_root or default_source_root()) / RECIPE_DIR
    path = directory / RECIPE_FILE
    try:
        text = path.read_text()
    except OSError as e:
        raise GuestImageError(f"cannot read the guest image recipe {path}: {e.strerror}") from None
    recipe = parse_recipe(text, directory)
    if not recipe.init_script.is_file():
        raise GuestImageError(f"the initramfs init script {recipe.init_script} is missing")
    return recipe
