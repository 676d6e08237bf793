"""The images critest pulls, built here and pushed to a loopback registry under the names critest
asks for; the server's mirrors then map registry.k8s.io, k8s.gcr.io and gcr.io to that registry.

They are made the way critest's own Dockerfiles (cri-tools ``images/``) and Kubernetes' e2e test
images make them, from parts this machine has: the host's static busybox for the busybox-based
ones, Debian's nginx for nginx, and two small C programs (``pause`` and the setuid ``nnp``).
The one image that cannot be made here is critest's ``test-image-digest@sha256:9700f9...``: a pull
by that exact digest needs the original bytes (see ``skips.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsandbox.guest_image import apt
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs
from tests.registry import Layer, Registry, image_config, make_layer, push_image

HERE = Path(__file__).resolve().parent
# Bump when what the cached nginx layer is made from changes.
NGINX_RECIPE = "bookworm nginx-light on busybox 2"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STAGING = "k8s-staging-cri-tools"  # gcr.io/k8s-staging-cri-tools/...
E2E = "e2e-test-images"  # registry.k8s.io/e2e-test-images/...

# As in the busybox image's own /etc/passwd and /etc/group (www-data is 33 there, nobody 65534).
PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
mail:x:12:
www-data:x:33:
operator:x:37:
users:x:100:
nogroup:x:65534:
"""


@dataclass(frozen=True)
class TestImage:
    """``repository`` is the path in the registry; ``config`` the image config's ``config``."""

    repository: str
    tags: tuple[str, ...]
    layers: tuple[str, ...]
    config: dict[str, Any]


def _marker(name: str) -> tuple[str, ...]:
    return ("busybox", f"marker:{name}")


# What critest pulls (cri-tools v1.36.0, pkg/validate and pkg/framework), by registry path.
IMAGES: tuple[TestImage, ...] = (
    TestImage(f"{E2E}/busybox", ("1.29-2",), ("busybox",), {"Cmd": ["sh"]}),
    TestImage(
        f"{E2E}/httpd",
        ("2.4.39-4",),
        ("busybox", "httpd"),
        {"Cmd": ["httpd-foreground"], "ExposedPorts": {"80/tcp": {}}},
    ),
    TestImage(
        f"{E2E}/nginx",
        ("1.14-2",),
        ("busybox", "nginx"),
        {"Cmd": ["nginx", "-g", "daemon off;"], "ExposedPorts": {"80/tcp": {}}},
    ),
    TestImage(f"{E2E}/nonewprivs", ("1.3",), ("busybox", "nnp"), {"Cmd": ["/usr/local/bin/nnp"]}),
    # registry.k8s.io/pause:3.9 and k8s.gcr.io/pause:3.9 both land here: the same image.
    TestImage("pause", ("3.9",), ("pause",), {"Entrypoint": ["/pause"], "Cmd": None}),
    *(
        TestImage(f"{STAGING}/{n}", ("latest",), _marker(n), {"Cmd": ["sh"]})
        for n in ("test-image-1", "test-image-2", "test-image-3", "test-image-latest")
    ),
    TestImage(f"{STAGING}/test-image-tags", ("1", "2", "3"), _marker("same-image"), {"Cmd": ["sh"]}),
    TestImage(f"{STAGING}/test-image-tag", ("test",), _marker("test"), {"Cmd": ["sh"]}),
    TestImage(f"{STAGING}/test-image-tag", ("all",), _marker("all"), {"Cmd": ["sh"]}),
    TestImage(f"{STAGING}/test-image-user-uid", ("latest",), ("busybox",), {"Cmd": ["sh"], "User": "1002"}),
    TestImage(f"{STAGING}/test-image-user-username", ("latest",), ("busybox",), {"Cmd": ["sh"], "User": "www-data"}),
    TestImage(f"{STAGING}/test-image-user-uid-group", ("latest",), ("busybox",), {"Cmd": ["sh"], "User": "1003:1004"}),
    TestImage(
        f"{STAGING}/test-image-user-username-group", ("latest",), ("busybox",), {"Cmd": ["sh"], "User": "www-data:1004"}
    ),
    TestImage(
        f"{STAGING}/test-image-predefined-group",
        ("latest",),
        ("busybox", "predefined-group"),
        {"Cmd": ["sh"], "User": "1000"},
    ),
)


# Two tools the e2e busybox image has and Debian's busybox-static lacks, as small scripts.
PGREP = """#!/bin/sh
# pgrep PATTERN: the pids of the processes whose name matches the extended regular expression.
[ $# -eq 1 ] || { echo "usage: pgrep PATTERN" >&2; exit 2; }
found=1
for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$pid" = "$$" ] && continue
    read -r comm < "$d/comm" 2>/dev/null || continue
    if echo "$comm" | grep -q -E -e "$1"; then echo "$pid"; found=0; fi
done
exit $found
"""
IPCS = """#!/bin/sh
# ipcs -m: the System V shared memory segments of this IPC namespace.
[ "$1" = "-m" ] || { echo "usage: ipcs -m" >&2; exit 2; }
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch     status"
tail -n +2 /proc/sysvipc/shm | while read -r key shmid perms size cpid lpid nattch uid rest; do
    echo "$key $shmid $uid $perms $size $nattch"
done
"""


def _busybox(tree: Path) -> None:
    """The e2e busybox image: Debian's dynamic busybox, whose shell runs commands from their files
    as that image's does (busybox-static runs its applets inside the shell, so a masked /bin/ls
    would still run), its applets hard links to it (masking one masks only it), and its libc."""
    debs = tree.with_name("busybox-deb")
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    apt.extract(apt.download(["busybox"], debs)["busybox"], debs / "root")
    binary = debs / "root/bin/busybox"
    make_busybox_rootfs(tree, binary)
    _copy_libraries(binary, tree)
    shutil.rmtree(debs)
    for link in [p for p in tree.rglob("*") if p.is_symlink() and os.readlink(p) == "/bin/busybox"]:
        link.unlink()
        os.link(tree / "bin/busybox", link)
    (tree / "etc/passwd").write_text(PASSWD)
    (tree / "etc/group").write_text(GROUP)
    for d in ("var/www", "var/run", "home"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    for name, text in (("pgrep", PGREP), ("ipcs", IPCS)):
        (tree / "usr/bin" / name).write_text(text)
        (tree / "usr/bin" / name).chmod(0o755)


def _copy_libraries(binary: Path, tree: Path) -> None:
    """The host's copies of the shared libraries ``binary`` needs (bookworm's, as the image's)."""
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    for line in ldd.stdout.splitlines():
        for lib in (w for w in line.replace("=>", " ").split() if w.startswith("/")):
            (tree / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), tree / lib.lstrip("/"))


def _httpd(tree: Path) -> None:
    """busybox's httpd where Apache's image keeps its pages, started as that image starts Apache."""
    docs = tree / "usr/local/apache2/htdocs"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html><body><h1>It works!</h1></body></html>\n")
    script = tree / "usr/local/bin/httpd-foreground"
    script.parent.mkdir(parents=True)
    script.write_text(
        "#!/bin/sh\necho 'httpd: serving /usr/local/apache2/htdocs on port 80'\n"
        "exec httpd -f -v -p 80 -h /usr/local/apache2/htdocs\n"
    )
    script.chmod(0o755)


def _compiled(name: str, mode: int) -> Callable[[Path], None]:
    def build(tree: Path) -> None:
        out = tree / ("pause" if name == "pause" else f"usr/local/bin/{name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-static", "-Os", "-o", str(out), str(HERE / "images" / f"{name}.c")], check=True)
        out.chmod(mode)

    return build


def _predefined_group(tree: Path) -> None:
    """cri-tools' image-predefined-group: user 1000 in group 50000, which only the image defines."""
    (tree / "etc").mkdir()
    (tree / "etc/passwd").write_text(PASSWD + "default-user:x:1000:1000::/home/default-user:/bin/sh\n")
    (tree / "etc/group").write_text(GROUP + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n")
    (tree / "home/default-user").mkdir(parents=True)


def _nginx(tree: Path) -> None:
    """Debian's nginx, its libraries and its config, over the busybox userland the e2e nginx image
    (Alpine's) has: commands run in it behave as busybox's do (``grep`` on /proc/1/cmdline too)."""
    debian = tree.with_name("nginx-debian")
    shutil.rmtree(debian, ignore_errors=True)
    mirrors = apt.mirror_lines(apt.host_sources(), "bookworm", ("bookworm-updates", "bookworm-security"), ("main",))
    subprocess.run(
        [
            *("mmdebstrap", "--variant=essential", "--mode=root", "--format=directory", "--include=nginx-light"),
            *("--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*"),
            *("--dpkgopt=path-exclude=/usr/share/locale/*", "bookworm", str(debian), *mirrors),
        ],
        check=True,
        timeout=1800,
    )
    ldd = subprocess.run(["chroot", str(debian), "ldd", "/usr/sbin/nginx"], capture_output=True, text=True, check=True)
    files = ["usr/sbin/nginx", "etc/nsswitch.conf"]
    for line in ldd.stdout.splitlines():
        words = line.replace("=>", " ").split()
        files += [w.lstrip("/") for w in words if w.startswith("/")]
    for rel in files:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(debian / rel), tree / rel)
    for rel in ("etc/nginx", "usr/share/nginx", "var/www/html"):
        shutil.copytree(debian / rel, tree / rel, symlinks=True)
    # nginx-light's dynamic modules would need more libraries: the e2e image loads none.
    for conf in (tree / "etc/nginx/modules-enabled").iterdir():
        conf.unlink()
    for rel in ("var/lib/nginx", "var/log/nginx", "run"):
        (tree / rel).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(debian)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "busybox": _busybox,
    "httpd": _httpd,
    "nnp": _compiled("nnp", 0o4755),
    "pause": _compiled("pause", 0o755),
    "predefined-group": _predefined_group,
}


def _build(name: str, work: Path) -> Layer:
    tree = work / name.replace(":", "-")
    shutil.rmtree(tree, ignore_errors=True)
    if name.startswith("marker:"):
        # ADD ${TEST} ${TEST}: an empty file at / named after the image, so each image differs.
        tree.mkdir(parents=True)
        (tree / name.partition(":")[2]).touch()
    else:
        tree.mkdir(parents=True)
        BUILDERS[name](tree)
    layer = make_layer(tree)
    shutil.rmtree(tree, ignore_errors=True)
    return layer


def _cached_nginx(work: Path, cache: Path) -> Layer:
    """The nginx layer is the slow one (a Debian bootstrap): kept in ``cache`` across runs."""
    blob, meta = cache / "nginx.layer", cache / "nginx.json"
    if meta.exists() and blob.exists():
        info = json.loads(meta.read_text())
        if info.get("recipe") == NGINX_RECIPE:
            return Layer(blob.read_bytes(), info["diff_id"], info["media_type"])
    tree = work / "nginx"
    shutil.rmtree(tree, ignore_errors=True)
    _nginx(tree)
    layer = make_layer(tree)
    shutil.rmtree(tree, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(layer.blob)
    meta.write_text(json.dumps({"recipe": NGINX_RECIPE, "diff_id": layer.diff_id, "media_type": layer.media_type}))
    return layer


def push_test_images(registry: Registry, work: Path, cache: Path, say: Callable[[str], None] = print) -> int:
    """Builds every layer once and pushes every image and tag; returns how many references."""
    layers: dict[str, Layer] = {}
    pushed = 0
    for image in IMAGES:
        for name in image.layers:
            if name not in layers:
                say(f"building layer {name}")
                layers[name] = _cached_nginx(work, cache) if name == "nginx" else _build(name, work)
        parts = [layers[n] for n in image.layers]
        config = image_config(parts, **{"Env": [f"PATH={PATH}"], **image.config})
        for tag in image.tags:
            push_image(registry, image.repository, tag, parts, config=config)
            pushed += 1
    return pushed
