"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1, with no
auth, htpasswd basic auth, or token (Bearer) auth backed by a small token server in this process;
and images built here from directory trees and pushed over the registry HTTP API.

Nothing here uses the code under test: layers, configs and manifests are made and pushed by hand.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import gzip
import hashlib
import io
import json
import re
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from tests.waiting import WaitTimeout, wait_until

DOCKER_REGISTRY = Path("/usr/bin/docker-registry")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
TOKEN_SERVICE = "kvmsandbox-test-registry"
TOKEN_ISSUER = "kvmsandbox-test-issuer"

AuthMode = Literal["none", "htpasswd", "token"]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for an htpasswd file, from the system's libcrypt (libxcrypt has bcrypt):
    no apache2-utils and no python bcrypt needed."""
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)
    hashed = lib.crypt(password.encode(), salt)
    if not salt or not hashed or not hashed.startswith(b"$2b$"):
        raise RuntimeError("libcrypt cannot make bcrypt hashes here")
    return str(hashed.decode())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Signs registry tokens (RS256 JWTs with the certificate in x5c) with a key made by openssl."""

    def __init__(self, workdir: Path) -> None:
        self.key = workdir / "token.key"
        self.cert = workdir / "token.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2"),
                *("-subj", "/CN=kvmsandbox-test-token", "-keyout", str(self.key), "-out", str(self.cert)),
            ],
            check=True,
            capture_output=True,
        )
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self._x5c = base64.b64encode(der).decode()

    def token(self, subject: str, scopes: Iterable[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": hashlib.sha256(f"{now}{time.monotonic_ns()}".encode()).hexdigest()[:16],
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"


class TokenServer:
    """The token endpoint a token-auth registry sends clients to: basic credentials in, JWT out."""

    def __init__(self, issuer: TokenIssuer, username: str, password: str) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                token = issuer.token(username, query.get("scope", []))
                self._answer(200, {"token": token, "access_token": token, "expires_in": 600})

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Registry:
    """A running docker-registry; ``host`` is what image references name (``127.0.0.1:PORT``)."""

    workdir: Path
    port: int
    auth: AuthMode
    username: str
    password: str
    process: subprocess.Popen[bytes]
    issuer: TokenIssuer | None = None
    token_server: TokenServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        return self.workdir / "data"

    @property
    def log(self) -> Path:
        return self.workdir / "registry.log"

    def headers(self, repository: str) -> dict[str, str]:
        """Credentials for pushing to ``repository``, as this registry wants them."""
        if self.auth == "htpasswd":
            return {"Authorization": "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()}
        if self.auth == "token":
            assert self.issuer is not None
            return {
                "Authorization": "Bearer " + self.issuer.token(self.username, [f"repository:{repository}:pull,push"])
            }
        return {}

    def count_requests(self, method: str, path_part: str, timeout: float = 10) -> int:
        """How many ``method`` requests whose path contains ``path_part`` the access log shows.

        The registry writes an access line only once it has answered, so the log may lag the requests
        the caller made: a request of our own, made now and awaited in the log, brings it up to date.
        """
        marker = f"/v2/?caught-up={uuid.uuid4().hex}"
        with contextlib.suppress(urllib.error.HTTPError):  # a 401 under auth is logged all the same
            urllib.request.urlopen(self.url + marker, timeout=timeout).close()
        line = f'"GET {marker} HTTP/1.1"'
        wait_until(
            lambda: line in self.log.read_text(errors="replace"), timeout, f"{line} in {self.log}", interval=0.02
        )
        pattern = re.compile(rf'"{method} (\S+) HTTP/1\.1" \d+')
        return sum(1 for m in pattern.finditer(self.log.read_text(errors="replace")) if path_part in m.group(1))

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (tests corrupt them there)."""
        hex_ = digest.partition(":")[2]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_server is not None:
            self.token_server.stop()


def start_registry(
    workdir: Path, auth: AuthMode = "none", username: str = "alice", password: str = "s3cret", timeout: float = 20.0
) -> Registry:
    """Starts docker-registry on a free loopback port with its storage in ``workdir`` and waits
    until ``/v2/`` answers (401 counts: the registry is up, it wants credentials)."""
    if not DOCKER_REGISTRY.exists():
        raise RuntimeError(f"{DOCKER_REGISTRY} is missing: apt-get install docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    issuer = token_server = None
    auth_config: dict[str, Any] = {}
    if auth == "htpasswd":
        (workdir / "htpasswd").write_text(f"{username}:{bcrypt_hash(password)}\n")
        auth_config = {"htpasswd": {"realm": "kvmsandbox-test", "path": str(workdir / "htpasswd")}}
    elif auth == "token":
        issuer = TokenIssuer(workdir)
        token_server = TokenServer(issuer, username, password)
        auth_config = {
            "token": {
                "realm": token_server.realm,
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(issuer.cert),
            }
        }
    for _ in range(5):
        port = free_port()
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": "kvmsandbox-test"},
        }
        if auth_config:
            config["auth"] = auth_config
        (workdir / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        log = (workdir / "registry.log").open("ab")
        process = subprocess.Popen(
            [str(DOCKER_REGISTRY), "serve", str(workdir / "config.yml")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        registry = Registry(workdir, port, auth, username, password, process, issuer, token_server)
        up = functools.partial(answers_or_exited, registry)
        with contextlib.suppress(WaitTimeout):  # one that never answers is stopped and reported below
            if wait_until(up, timeout, f"docker-registry on {registry.url}", interval=0.05) == "answers":
                return registry
        registry.stop()
        if "address already in use" not in registry.log.read_text(errors="replace"):
            break
    if token_server is not None:
        token_server.stop()
    raise RuntimeError(f"docker-registry did not start; its log:\n{(workdir / 'registry.log').read_text()[-2000:]}")


def answers_or_exited(registry: Registry) -> Literal["answers", "exited"] | None:
    """Whether the registry answers on ``/v2/`` (401 counts: it is up and wants credentials) or has exited."""
    if registry.process.poll() is not None:
        return "exited"
    try:
        with urllib.request.urlopen(f"{registry.url}/v2/", timeout=2):
            return "answers"
    except urllib.error.HTTPError as e:
        return "answers" if e.code == 401 else None
    except OSError:
        return None


@contextlib.contextmanager
def running_registry(workdir: Path, auth: AuthMode = "none") -> Iterator[Registry]:
    registry = start_registry(workdir, auth)
    try:
        yield registry
    finally:
        registry.stop()


# -- images --


@dataclass
class Layer:
    blob: bytes
    diff_id: str
    media_type: str

    @property
    def digest(self) -> str:
        return sha256(self.blob)


@dataclass
class PushedImage:
    repository: str
    manifest_digest: str
    config_digest: str
    layers: list[Layer] = field(default_factory=list)


def make_layer(
    tree: Path | None = None,
    whiteouts: Iterable[str] = (),
    opaque_dirs: Iterable[str] = (),
    extra: Iterable[tarfile.TarInfo] = (),
    compression: Literal["gzip", "zstd", "none"] = "gzip",
) -> Layer:
    """A layer from the tree below ``tree`` (owners, modes, symlinks, hard links, devices as
    tarfile records them), plus OCI whiteouts: ``.wh.NAME`` files for the paths in ``whiteouts``
    and ``DIR/.wh..wh..opq`` for ``opaque_dirs``, plus ``extra`` entries (regular ones are empty)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if tree is not None:
            for path in sorted(tree.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
        for name in whiteouts:
            parent, _, base = name.rpartition("/")
            info = tarfile.TarInfo(f"{parent}/.wh.{base}" if parent else f".wh.{base}")
            tar.addfile(info)
        for d in opaque_dirs:
            tar.addfile(tarfile.TarInfo(f"{d}/.wh..wh..opq"))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"\0" * info.size) if info.isfile() else None)
    raw = buf.getvalue()
    if compression == "gzip":
        blob = gzip.compress(raw, mtime=0)
    elif compression == "zstd":
        blob = subprocess.run(["zstd", "-q", "-c"], input=raw, check=True, capture_output=True).stdout
    else:
        blob = raw
    return Layer(blob, sha256(raw), LAYER_MEDIA_TYPES[compression])


def image_config(layers: list[Layer], architecture: str = "amd64", **config: Any) -> bytes:
    doc = {
        "architecture": architecture,
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], **config},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    return json.dumps(doc).encode()


def _request(
    registry: Registry,
    method: str,
    url: str,
    repository: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=data, method=method, headers={**registry.headers(repository), **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()
            return resp.status, resp.headers
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: {e.code} {e.read()[:500]!r}") from None


def push_blob(registry: Registry, repository: str, data: bytes) -> str:
    """Monolithic upload: POST an upload session, then PUT the bytes with ``?digest=``."""
    digest = sha256(data)
    _, headers = _request(registry, "POST", f"{registry.url}/v2/{repository}/blobs/uploads/", repository, b"")
    location = urllib.parse.urljoin(registry.url, headers["Location"])
    sep = "&" if "?" in location else "?"
    _request(
        registry,
        "PUT",
        f"{location}{sep}digest={digest}",
        repository,
        data,
        {"Content-Type": "application/octet-stream"},
    )
    return digest


def push_manifest(registry: Registry, repository: str, reference: str, manifest: bytes, media_type: str) -> str:
    _request(
        registry,
        "PUT",
        f"{registry.url}/v2/{repository}/manifests/{reference}",
        repository,
        manifest,
        {"Content-Type": media_type},
    )
    return sha256(manifest)


def push_image(
    registry: Registry,
    repository: str,
    tag: str | None,
    layers: list[Layer],
    config: bytes | None = None,
    docker_media_types: bool = False,
) -> PushedImage:
    """Pushes the layers, the config (made from the layers if not given) and a manifest; tags it
    ``tag`` (or pushes it by digest only when ``tag`` is None)."""
    config = config if config is not None else image_config(layers)
    for layer in layers:
        push_blob(registry, repository, layer.blob)
    config_digest = push_blob(registry, repository, config)
    media_type = DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker_media_types else OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"
                    if docker_media_types
                    else layer.media_type,
                    "digest": layer.digest,
                    "size": len(layer.blob),
                }
                for layer in layers
            ],
        }
    ).encode()
    digest = push_manifest(registry, repository, tag or sha256(manifest), manifest, media_type)
    return PushedImage(repository, digest, config_digest, layers)


def push_index(
    registry: Registry,
    repository: str,
    tag: str,
    images: list[tuple[str, PushedImage]],
    docker_media_types: bool = False,
) -> str:
    """Pushes an index (manifest list) of already pushed images, each with its ``os/arch`` platform."""
    entries = []
    for platform, image in images:
        os_, _, arch = platform.partition("/")
        data = urllib.request.urlopen(
            urllib.request.Request(
                f"{registry.url}/v2/{repository}/manifests/{image.manifest_digest}",
                headers={**registry.headers(repository), "Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
            ),
            timeout=30,
        ).read()
        entries.append(
            {
                "mediaType": json.loads(data)["mediaType"],
                "digest": image.manifest_digest,
                "size": len(data),
                "platform": {"os": os_, "architecture": arch},
            }
        )
    media_type = DOCKER_LIST if docker_media_types else OCI_INDEX
    index = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()
    return push_manifest(registry, repository, tag, index, media_type)
