"""The guest's root tree (mmdebstrap) and its read-only erofs image (compression: see the recipe)."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from kvmsandbox.errors import GuestImageError
from kvmsandbox.guest_image.recipe import Recipe

Progress = Callable[[str], None]

MMDEBSTRAP_HOOKS = Path("/usr/share/mmdebstrap/hooks")


def run(args: Sequence[str], what: str, *, timeout: float | None = None) -> str:
    """Runs a build tool with no stdin (CI has none) and returns its stdout.

    Raises:
        GuestImageError: the tool is missing, failed or timed out; the message carries its last words.
    """
    try:
        proc = subprocess.run(
            list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise GuestImageError(f"{what}: {args[0]} is not installed on this host") from None
    except subprocess.TimeoutExpired:
        raise GuestImageError(f"{what}: {args[0]} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-8:]
        raise GuestImageError(f"{what} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    return proc.stdout


def mmdebstrap_args(recipe: Recipe, tree: Path, mirrors: Sequence[str]) -> list[str]:
    """The mmdebstrap command line that builds the base tree. Raises nothing."""
    args = [
        "mmdebstrap",
        "--variant=essential",
        "--mode=root",
        "--format=directory",
        f"--components={','.join(recipe.components)}",
        f"--include={','.join(recipe.packages)}",
    ]
    # dpkg then never unpacks docs/man/locales at all; strip_tree() catches what the first
    # (essential) extraction unpacked before these options applied.
    args += [f"--dpkgopt=path-exclude=/{pattern}" for pattern in recipe.strip if pattern.startswith("usr/")]
    args += [f"--dpkgopt=path-include=/{pattern}" for pattern in recipe.keep]
    args += [f"--hook-dir={MMDEBSTRAP_HOOKS / hook}" for hook in recipe.mmdebstrap_hooks]
    return [*args, recipe.suite, str(tree), *mirrors]


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def strip_tree(tree: Path, strip: Sequence[str], keep: Sequence[str]) -> int:
    """Deletes what matches the ``strip`` globs below ``tree``, except files matching ``keep``;
    directories left empty by that go too. Returns the number of bytes freed.

    Raises:
        OSError: a file could not be removed.
    """
    freed = 0
    for pattern in strip:
        for match in sorted(tree.glob(pattern), reverse=True):
            candidates = [match] if not match.is_dir() or match.is_symlink() else list(match.rglob("*"))
            for path in sorted(candidates, reverse=True):
                rel = path.relative_to(tree).as_posix()
                if path.is_dir() and not path.is_symlink():
                    if not any(path.iterdir()):
                        path.rmdir()
                elif not _matches(rel, keep):
                    freed += path.lstat().st_size
                    path.unlink()
            if match.is_dir() and not match.is_symlink() and not any(match.iterdir()):
                match.rmdir()
    return freed


def make_mount_points(tree: Path, mount_points: Sequence[str]) -> None:
    """Creates the empty directories the guest mounts over (``/tmp`` sticky and world-writable).

    Raises:
        OSError: a directory could not be created.
    """
    for rel in mount_points:
        (tree / rel).mkdir(parents=True, exist_ok=True)
    for rel in ("tmp", "var/tmp"):
        if (tree / rel).is_dir():
            (tree / rel).chmod(0o1777)


def write_files(tree: Path, files: dict[str, str]) -> None:
    """Writes the recipe's files into the tree, replacing what is there (a symlink included).

    Raises:
        OSError: a file could not be written.
    """
    for rel, content in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_text(content)
        path.chmod(0o644)


def guest_python(tree: Path) -> str:
    """``major.minor`` of the tree's /usr/bin/python3 (Debian links it to ``python3.X``).

    Raises:
        GuestImageError: the tree has no python3 link of that form.
    """
    link = tree / "usr/bin/python3"
    try:
        target = os.readlink(link)
    except OSError:
        raise GuestImageError(f"{link} is missing or not a symlink: is python3 in the recipe's packages?") from None
    name = Path(target).name
    if not name.startswith("python3."):
        raise GuestImageError(f"{link} points to {target}, not python3.X")
    return name.removeprefix("python")


def check_tree(tree: Path, recipe: Recipe) -> None:
    """Checks that the tree has what the agent needs: the recipe's required files, and the Python
    modules it imports (tried with the guest's own interpreter in a chroot).

    Raises:
        GuestImageError: something is missing; the message names it.
    """
    missing = [rel for rel in recipe.required_files if not (tree / rel).exists()]
    if missing:
        raise GuestImageError(f"the guest tree lacks {', '.join(missing)}: add the package to the recipe")
    if recipe.required_python_modules:
        code = "import " + ", ".join(recipe.required_python_modules)
        run(["chroot", str(tree), "/usr/bin/python3", "-S", "-c", code], "importing the agent's stdlib modules")


def ensure_stdlib_compiled(tree: Path, python: str) -> bool:
    """Byte-compiles the guest's stdlib inside the tree unless Debian's postinst already did it
    (the root is read-only at runtime, and compiling under TCG at every boot would cost seconds).
    Returns True when it had to compile.

    Raises:
        GuestImageError: the stdlib is missing or compileall failed.
    """
    stdlib = tree / f"usr/lib/python{python}"
    tag = f"cpython-{python.replace('.', '')}"
    probes = [stdlib / "__pycache__" / f"os.{tag}.pyc", stdlib / "encodings" / "__pycache__" / f"__init__.{tag}.pyc"]
    if not stdlib.is_dir():
        raise GuestImageError(f"{stdlib} is missing")
    if all(p.is_file() for p in probes):
        return False
    run(
        ["chroot", str(tree), "/usr/bin/python3", "-m", "compileall", "-q", f"/usr/lib/python{python}"],
        "byte-compiling the guest stdlib",
    )
    return True


def build_base_tree(recipe: Recipe, tree: Path, mirrors: Sequence[str], progress: Progress) -> dict[str, object]:
    """mmdebstrap + strip + mount points + checks; returns facts for the manifest.

    Raises:
        GuestImageError: not root, mmdebstrap failed, or the tree misses what the agent needs.
    """
    if os.geteuid() != 0:
        raise GuestImageError("building the guest base tree needs root (mmdebstrap --mode=root, chroot)")
    for hook in recipe.mmdebstrap_hooks:
        if not (MMDEBSTRAP_HOOKS / hook).is_dir():
            raise GuestImageError(f"mmdebstrap hook {MMDEBSTRAP_HOOKS / hook} is missing (mmdebstrap too old?)")
    progress(f"mmdebstrap --variant=essential {recipe.suite} + {', '.join(recipe.packages)} from {mirrors[0]}")
    run(mmdebstrap_args(recipe, tree, mirrors), "mmdebstrap", timeout=1800)
    freed = strip_tree(tree, recipe.strip, recipe.keep)
    make_mount_points(tree, recipe.mount_points)
    write_files(tree, recipe.files)
    python = guest_python(tree)
    compiled = ensure_stdlib_compiled(tree, python)
    check_tree(tree, recipe)
    progress(
        f"base tree ready: python {python}, {freed / 2**20:.1f} MiB stripped"
        + (", stdlib byte-compiled" if compiled else "")
    )
    return {"guest_python": python, "stripped_bytes": freed, "stdlib_compiled_by_us": compiled}


def hardlink_copy(src: Path, dest: Path) -> None:
    """Copies a tree with hard links for files (``cp -al``): fast, and safe because nothing
    modifies the copied files in place (the final stage only adds files under /opt).

    Raises:
        GuestImageError: cp failed.
    """
    run(["cp", "-a", "--link", str(src), str(dest)], "hard-link copy of the base tree")


def make_erofs(tree: Path, image: Path, compression: str) -> None:
    """Writes ``tree`` as an erofs image (ownership, modes, mtimes and xattrs kept).

    Raises:
        GuestImageError: mkfs.erofs failed.
    """
    args = ["mkfs.erofs", "--quiet"]
    if compression != "none":
        args.append(f"-z{compression}")
    run([*args, str(image), str(tree)], "mkfs.erofs")


def remove_tree(path: Path) -> None:
    """Removes a build directory, unmounting first whatever an interrupted mmdebstrap left mounted
    below it (removing files through a live /proc or /sys mount would be wrong).

    Raises:
        GuestImageError: a mount below it could not be unmounted.
        OSError: removal failed.
    """
    if not path.exists() and not path.is_symlink():
        return
    prefix = str(path.resolve()) + "/"
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point.startswith(prefix):
                mounts.append(mount_point)
    for mount_point in sorted(mounts, key=len, reverse=True):
        run(["umount", "--lazy", mount_point], f"unmounting {mount_point} left by an interrupted build")
    shutil.rmtree(path)
