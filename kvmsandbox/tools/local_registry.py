"""A registry on loopback for demos: Debian's docker-registry with its storage in a temp dir, and a
push of a directory tree as a one-layer OCI image over the registry HTTP API."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kvmsandbox.errors import FailedPrecondition, Unavailable

DOCKER_REGISTRY = Path("/usr/bin/docker-registry")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LocalRegistry:
    """A running docker-registry on 127.0.0.1; ``host`` is what image references name."""

    def __init__(self) -> None:
        if not DOCKER_REGISTRY.exists():
            raise FailedPrecondition(f"{DOCKER_REGISTRY} is missing: install the docker-registry package")
        self._dir = Path(tempfile.mkdtemp(prefix="kvmsandbox-registry-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        config = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self._dir / "data")}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }
        (self._dir / "config.yml").write_text(json.dumps(config))
        log = open(self._dir / "registry.log", "wb")  # noqa: SIM115 - the child holds it
        self._process = subprocess.Popen(
            [str(DOCKER_REGISTRY), "serve", str(self._dir / "config.yml")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2):
                    return
            except OSError as e:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable(f"docker-registry did not start: {e}") from None
                time.sleep(0.05)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _send(self, method: str, url: str, data: bytes | None, content_type: str) -> Any:
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.headers
        except urllib.error.HTTPError as e:
            raise Unavailable(f"{method} {url}: {e.code} {e.read()[:300]!r}") from None

    def _push_blob(self, repository: str, data: bytes) -> str:
        digest = _digest(data)
        headers = self._send("POST", f"{self.url}/v2/{repository}/blobs/uploads/", b"", "application/octet-stream")
        location = urllib.parse.urljoin(self.url, headers["Location"])
        sep = "&" if "?" in location else "?"
        self._send("PUT", f"{location}{sep}digest={digest}", data, "application/octet-stream")
        return digest

    def push_tree(self, repository: str, tag: str, tree: Path, image_config: dict[str, Any]) -> str:
        """Pushes ``tree`` as a one-layer image with ``image_config`` (Cmd, Env, ...); returns its
        reference."""
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            for path in sorted(tree.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
        layer = gzip.compress(raw.getvalue(), mtime=0)
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": image_config,
                "rootfs": {"type": "layers", "diff_ids": [_digest(raw.getvalue())]},
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": self._push_blob(repository, config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": self._push_blob(repository, layer),
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        self._send(
            "PUT", f"{self.url}/v2/{repository}/manifests/{tag}", manifest, "application/vnd.oci.image.manifest.v1+json"
        )
        return f"{self.host}/{repository}:{tag}"

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
