import base64
import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kvmsandbox.config import RegistryConfig
from kvmsandbox.errors import InvalidArgument, NotFound, Unavailable
from kvmsandbox.image import Auth, ContentError, parse_reference
from kvmsandbox.image.manifest import Index, Manifest, choose_platform, parse_manifest
from kvmsandbox.image.registry import (
    Endpoint,
    RegistryClient,
    endpoints_for,
    is_loopback,
    parse_challenge,
    registry_error_words,
)

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def bases(ref: str, config: RegistryConfig) -> list[str]:
    return [e.base for e in endpoints_for(parse_reference(ref), config)]


def test_registries_are_reached_over_https_unless_loopback_or_insecure() -> None:
    none = RegistryConfig()
    assert bases("busybox", none) == ["https://registry-1.docker.io"]
    assert bases("quay.io/a/b", none) == ["https://quay.io"]
    assert bases("127.0.0.1:5000/a", none) == ["http://127.0.0.1:5000"]
    assert bases("localhost:5000/a", none) == ["http://localhost:5000"]
    assert bases("[::1]:5000/a", none) == ["http://[::1]:5000"]
    assert bases("10.0.0.1:5000/a", RegistryConfig(insecure=["10.0.0.1:5000"])) == ["http://10.0.0.1:5000"]
    assert bases("reg.lan/a", RegistryConfig(insecure=["reg.lan"])) == ["http://reg.lan"]
    assert bases("10.0.0.1:5000/a", RegistryConfig(insecure=["10.0.0.1:6000"])) == ["https://10.0.0.1:5000"]
    assert is_loopback("127.1.2.3:80") and not is_loopback("128.0.0.1")


def test_mirrors_come_first_and_plain_http_mirrors_must_be_allowed() -> None:
    config = RegistryConfig(
        mirrors={
            "registry.k8s.io": ["http://127.0.0.1:5000/", "mirror.lan", "http://10.1.1.1:5000", "ftp://x"],
            "docker.io": ["https://hub-mirror.lan/v2"],
        }
    )
    assert bases("registry.k8s.io/pause:3.10", config) == [
        "http://127.0.0.1:5000",
        "https://mirror.lan",
        "https://registry.k8s.io",
    ]
    assert bases("busybox", config) == ["https://hub-mirror.lan/v2", "https://registry-1.docker.io"]


def test_bearer_and_basic_challenges_are_parsed() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull,push",
    }
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_challenge("") == ("", {})


def test_auth_gives_credentials_from_fields_or_the_base64_string() -> None:
    assert Auth(username="u", password="p").credentials() == ("u", "p")
    assert Auth(auth=base64.b64encode(b"u:p:with:colons").decode()).credentials() == ("u", "p:with:colons")
    assert Auth(identity_token="t").credentials() is None
    with pytest.raises(InvalidArgument, match="base64"):
        Auth(auth=base64.b64encode(b"no-colon").decode()).credentials()
    for bad in ("%%%", "ünïcode", base64.b64encode(b"\xff\xfe:x").decode()):  # not base64, not ASCII, not UTF-8
        with pytest.raises(InvalidArgument, match="base64"):
            Auth(auth=bad).credentials()


def test_registry_error_bodies_give_their_messages() -> None:
    body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}'
    assert registry_error_words(body) == "manifest unknown"
    assert registry_error_words(b'{"errors":[{"code":"DENIED"}]}') == "DENIED"
    assert registry_error_words(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert registry_error_words(b"") == "no details"


def descriptor(digest: str, **extra: object) -> dict[str, object]:
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 10, **extra}


def test_indexes_and_manifests_are_told_apart_by_media_type_or_shape() -> None:
    index = {"schemaVersion": 2, "manifests": [descriptor(D1, platform={"os": "linux", "architecture": "amd64"})]}
    manifest = {"schemaVersion": 2, "config": descriptor(D1), "layers": [descriptor(D2)]}
    parsed = parse_manifest(json.dumps(index).encode(), "", "x")
    assert isinstance(parsed, Index) and parsed.manifests[0].digest == D1
    parsed_manifest = parse_manifest(json.dumps(manifest).encode(), "application/octet-stream", "x")
    assert isinstance(parsed_manifest, Manifest) and parsed_manifest.layers[0].digest == D2


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (b"not json", "not JSON"),
        (b'{"schemaVersion": 1, "fsLayers": []}', "schema 1"),
        (b'{"mediaType": "application/x-helm", "schemaVersion": 2}', "unsupported manifest media type"),
        (json.dumps({"config": descriptor("md5:00"), "layers": []}).encode(), "only sha256"),
        (json.dumps({"config": descriptor(D1, size=-1), "layers": []}).encode(), "invalid size"),
    ],
)
def test_unusable_manifests_are_refused_with_a_reason(doc: bytes, words: str) -> None:
    with pytest.raises(ContentError, match=words):
        parse_manifest(doc, "", "x")


def test_the_platform_is_chosen_from_an_index() -> None:
    index = Index(
        [
            parse_manifest(json.dumps({"manifests": [descriptor(d, platform=p)]}).encode(), "", "x").manifests[0]  # type: ignore[union-attr]
            for d, p in (
                (D1, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
                (D2, {"os": "linux", "architecture": "amd64"}),
            )
        ]
    )
    assert choose_platform(index, "linux", "amd64", "x").digest == D2
    with pytest.raises(NotFound, match=r"no linux/s390x variant \(it has: linux/arm64/v8, linux/amd64\)"):
        choose_platform(index, "linux", "s390x", "x")


class _Server:
    """A loopback HTTP server answering with ``handle(path, headers) -> (status, headers, body)``."""

    def __init__(self, handle: Callable[[str, Message], tuple[int, dict[str, str], bytes]]) -> None:
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append((self.path, self.headers.get("Authorization")))
                status, headers, body = handle(self.path, self.headers)
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers() -> Iterator[list[_Server]]:
    made: list[_Server] = []
    yield made
    for s in made:
        s.close()


def test_redirected_blob_downloads_never_carry_credentials_to_another_host(
    servers: list[_Server], tmp_path: Path
) -> None:
    blob = b"layer bytes"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    cdn = _Server(lambda path, headers: (200, {}, blob))
    servers.append(cdn)
    expected = "Basic " + base64.b64encode(b"u:p").decode()

    def registry(path: str, headers: Message) -> tuple[int, dict[str, str], bytes]:
        if headers.get("Authorization") != expected:
            return 401, {"WWW-Authenticate": 'Basic realm="r"'}, b'{"errors":[{"message":"authentication required"}]}'
        if path.endswith("/far"):
            return 307, {"Location": "http://10.0.0.1/blob"}, b""
        return 307, {"Location": f"{cdn.url}/blob/{digest}"}, b""

    origin = _Server(registry)
    servers.append(origin)
    ref = parse_reference(f"{origin.url.removeprefix('http://')}/r:1")
    client = RegistryClient(Endpoint(origin.url), ref, RegistryConfig(), Auth(username="u", password="p"), timeout=5)

    client.download_blob(digest, len(blob), tmp_path / "blob")

    assert (tmp_path / "blob").read_bytes() == blob
    assert [auth for _, auth in origin.seen] == [None, expected]
    assert cdn.seen == [(f"/blob/{digest}", None)]
    with pytest.raises(Unavailable, match=re.escape("redirected to http://10.0.0.1/blob, which is not HTTPS")):
        client.get_blob_bytes(digest + "/far", len(blob))
    assert len(cdn.seen) == 1


def test_a_registry_that_never_answers_times_out_as_unavailable(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        client = RegistryClient(
            Endpoint(f"http://{host}"), parse_reference(f"{host}/r:1"), RegistryConfig(), timeout=0.3
        )
        with pytest.raises(Unavailable, match="timed out"):
            client.get_manifest("1", ["application/json"])
