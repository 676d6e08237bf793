"""A client of the OCI distribution API (Docker registry v2) over the standard library's HTTP:
manifests and blobs of one repository on one endpoint, with basic auth and the bearer-token dance,
redirects that never carry credentials to another host, and a timeout on every request."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import IO, Any

from kvmsandbox.config import RegistryConfig
from kvmsandbox.errors import ContentError, InvalidArgument, KvmSandboxError, NotFound, RegistryAuthError, Unavailable
from kvmsandbox.image.reference import Reference

log = logging.getLogger(__name__)

# Manifests and configs are small; a registry sending more is broken or hostile (containerd's limit too).
MAX_MANIFEST_BYTES = 4 << 20
MAX_REDIRECTS = 5
CHUNK = 1 << 20
USER_AGENT = "kvmsandbox/0.1"


@dataclass(frozen=True)
class Auth:
    """Credentials as the CRI's AuthConfig carries them: a username and password, or ``auth``
    (base64 of ``user:password``), or an identity (refresh) token, or a ready registry token."""

    username: str = ""
    password: str = ""
    auth: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def credentials(self) -> tuple[str, str] | None:
        """The username and password, from the fields or decoded from ``auth``; None if neither.

        Raises:
            InvalidArgument: ``auth`` is not base64 of ``user:password``.
        """
        if self.username or self.password:
            return self.username, self.password
        if not self.auth:
            return None
        try:
            user, sep, password = base64.b64decode(self.auth, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # not base64 (or not ASCII), or not UTF-8 inside
            sep = ""
        if not sep:
            raise InvalidArgument("the auth string must be base64 of 'username:password'")
        return user, password


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses, with or without a port (``[::1]:5000`` too)."""
    name = urllib.parse.urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_http_allowed(host: str, config: RegistryConfig) -> bool:
    """Plain HTTP is allowed only to loopback and to the hosts the config lists as insecure."""
    bare = urllib.parse.urlsplit(f"//{host}").hostname or host
    return is_loopback(host) or host in config.insecure or bare in config.insecure


@dataclass(frozen=True)
class Endpoint:
    """Where to send a repository's API requests: ``base`` is ``scheme://host[:port][/path]``."""

    base: str
    mirror: bool = False

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.base).netloc


def endpoints_for(ref: Reference, config: RegistryConfig) -> list[Endpoint]:
    """The configured mirrors of the reference's registry in order, then the registry itself."""
    endpoints = []
    for url in config.mirrors.get(ref.registry, []):
        if "://" not in url:
            url = ("http://" if plain_http_allowed(url, config) else "https://") + url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "http" and not plain_http_allowed(parts.netloc, config):
            log.warning("image %s: skipping mirror %s: plain HTTP needs its host in registry.insecure", ref, url)
            continue
        if parts.scheme not in ("http", "https"):
            log.warning("image %s: skipping mirror %s: not an http(s) URL", ref, url)
            continue
        endpoints.append(Endpoint(url.rstrip("/"), mirror=True))
    scheme = "http" if plain_http_allowed(ref.registry, config) else "https"
    endpoints.append(Endpoint(f"{scheme}://{ref.api_host}"))
    return endpoints


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {"realm": ..., "service": ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def registry_error_words(body: bytes) -> str:
    """The messages of a registry's ``{"errors": [...]}`` body, or the start of the body."""
    try:
        errors = json.loads(body).get("errors") or []
        words = [str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError):
        words = []
    if words:
        return "; ".join(words)
    return body[:200].decode(errors="replace").strip() or "no details"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Redirects are followed by RegistryClient, which drops credentials when the host changes.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class RegistryClient:
    """Requests for one repository on one endpoint, authenticating as the registry asks.

    ``what`` in the errors is the reference being pulled, so every message names the image.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        ref: Reference,
        config: RegistryConfig,
        auth: Auth | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.endpoint = endpoint
        self.ref = ref
        self.config = config
        self.auth = auth
        self.timeout = timeout
        self._authorization = ""
        self._opener = urllib.request.build_opener(
            _NoRedirect, urllib.request.HTTPSHandler(context=ssl.create_default_context())
        )
        base = endpoint.base[: -len("/v2")] if endpoint.base.endswith("/v2") else endpoint.base
        self._repo_url = f"{base}/v2/{ref.repository}"
        # Mirrors serving several upstreams tell them apart by ``ns`` (containerd sends it too).
        self._query = f"?ns={urllib.parse.quote(ref.registry)}" if endpoint.mirror else ""

    def get_manifest(self, reference: str, accept: list[str]) -> tuple[bytes, str]:
        """The manifest (or index) ``reference`` (a tag or digest) as bytes and its media type.

        Raises:
            NotFound: the registry has no such manifest (its words in the message).
            RegistryAuthError, Unavailable, ContentError: see the class docstrings.
        """
        url = f"{self._repo_url}/manifests/{reference}{self._query}"
        with self._open(url, {"Accept": ", ".join(accept)}) as resp:
            data = _read(resp, MAX_MANIFEST_BYTES + 1, self.ref)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if len(data) > MAX_MANIFEST_BYTES:
            raise ContentError(f"{self.ref}: manifest {reference} is larger than {MAX_MANIFEST_BYTES} bytes")
        return data, media_type

    def get_blob_bytes(self, digest: str, size: int) -> bytes:
        """A small blob (an image config), verified against ``digest`` and ``size``.

        Raises:
            ContentError: too large, wrong size or wrong digest. Others as get_manifest.
        """
        if size > MAX_MANIFEST_BYTES:
            raise ContentError(f"{self.ref}: blob {digest} is {size} bytes, more than {MAX_MANIFEST_BYTES} allowed")
        with self._open(f"{self._repo_url}/blobs/{digest}{self._query}", {}) as resp:
            data = _read(resp, size + 1, self.ref)
        verify_content(self.ref, digest, size, len(data), hashlib.sha256(data).hexdigest())
        return data

    def download_blob(self, digest: str, size: int, dest: Path) -> None:
        """Streams a blob into ``dest`` and verifies its size and digest; ``dest`` is deleted on failure.

        Raises:
            ContentError: wrong size or digest. Others as get_manifest.
        """
        h = hashlib.sha256()
        written = 0
        try:
            with self._open(f"{self._repo_url}/blobs/{digest}{self._query}", {}) as resp, dest.open("wb") as f:
                while chunk := _read(resp, CHUNK, self.ref):
                    written += len(chunk)
                    if written > size:
                        break
                    h.update(chunk)
                    f.write(chunk)
            verify_content(self.ref, digest, size, written, h.hexdigest())
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def _open(self, url: str, headers: dict[str, str]) -> HTTPResponse:
        authenticated = False
        for _ in range(MAX_REDIRECTS + 1):
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
            same_origin = _origin(url) == _origin(self.endpoint.base)
            if self._authorization and same_origin:
                request.add_header("Authorization", self._authorization)
            try:
                resp: HTTPResponse = self._opener.open(request, timeout=self.timeout)
                return resp
            except urllib.error.HTTPError as e:
                with e:
                    if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                        url = self._redirect_target(url, e.headers["Location"])
                        continue
                    body = e.read(64 << 10)
                    if e.code == 401 and same_origin and not authenticated:
                        self._authenticate(e.headers.get("WWW-Authenticate", ""), body)
                        authenticated = True
                        continue
                    if e.code == 401 and authenticated:
                        raise RegistryAuthError(
                            f"{self.ref}: registry {self.endpoint.base} refused the credentials: "
                            + registry_error_words(body)
                        ) from None
                    raise self._http_error(url, e.code, body) from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise Unavailable(f"{self.ref}: registry {self.endpoint.base} is unreachable: {reason}") from None
        raise Unavailable(f"{self.ref}: registry {self.endpoint.base} redirected more than {MAX_REDIRECTS} times")

    def _redirect_target(self, url: str, location: str) -> str:
        target = urllib.parse.urljoin(url, location)
        parts = urllib.parse.urlsplit(target)
        if parts.scheme == "https" or (parts.scheme == "http" and plain_http_allowed(parts.netloc, self.config)):
            return target
        raise Unavailable(f"{self.ref}: registry {self.endpoint.base} redirected to {target}, which is not HTTPS")

    def _http_error(self, url: str, code: int, body: bytes) -> KvmSandboxError:
        words = registry_error_words(body)
        what = (
            f"{self.ref}: registry {self.endpoint.base} answered {code} for {urllib.parse.urlsplit(url).path}: {words}"
        )
        if code == 404:
            return NotFound(what)
        if code in (401, 403):
            return RegistryAuthError(what)
        if code == 400:
            return InvalidArgument(what)
        return Unavailable(what)

    def _authenticate(self, challenge: str, body: bytes) -> None:
        scheme, params = parse_challenge(challenge)
        creds = self.auth.credentials() if self.auth else None
        if scheme == "basic":
            if creds is None:
                raise RegistryAuthError(
                    f"{self.ref}: registry {self.endpoint.base} needs credentials (basic auth) and none were given"
                )
            self._authorization = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        elif scheme == "bearer":
            if self.auth and self.auth.registry_token:
                self._authorization = f"Bearer {self.auth.registry_token}"
            else:
                self._authorization = f"Bearer {self._fetch_token(params, creds)}"
        else:
            raise RegistryAuthError(
                f"{self.ref}: registry {self.endpoint.base} refused the request: {registry_error_words(body)}"
                + (f" (unsupported challenge {challenge!r})" if challenge else "")
            )
        log.info("image %s: authenticating to %s with %s", self.ref, self.endpoint.host, scheme)

    def _fetch_token(self, params: dict[str, str], creds: tuple[str, str] | None) -> str:
        realm = params.get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        if not (parts.scheme == "https" or (parts.scheme == "http" and plain_http_allowed(parts.netloc, self.config))):
            raise RegistryAuthError(
                f"{self.ref}: registry {self.endpoint.base} names a token realm {realm!r} that is not HTTPS"
            )
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"User-Agent": USER_AGENT}
        data = None
        if self.auth and self.auth.identity_token:
            form = {**query, "grant_type": "refresh_token", "refresh_token": self.auth.identity_token}
            data = urllib.parse.urlencode({**form, "client_id": "kvmsandbox"}).encode()
            url = realm
        else:
            url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
            if creds is not None:
                headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        try:
            with self._opener.open(
                urllib.request.Request(url, data=data, headers=headers), timeout=self.timeout
            ) as resp:
                answer = json.loads(resp.read(MAX_MANIFEST_BYTES))
        except urllib.error.HTTPError as e:
            with e:
                words = registry_error_words(e.read(64 << 10))
            if e.code in (400, 401, 403):
                given = "the credentials" if creds or data else "an anonymous token"
                raise RegistryAuthError(
                    f"{self.ref}: token server {realm} refused {given} ({e.code}): {words}"
                ) from None
            raise Unavailable(f"{self.ref}: token server {realm} answered {e.code}: {words}") from None
        except (urllib.error.URLError, OSError) as e:
            raise Unavailable(f"{self.ref}: token server {realm} is unreachable: {getattr(e, 'reason', e)}") from None
        except ValueError:
            raise RegistryAuthError(f"{self.ref}: token server {realm} did not answer JSON") from None
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{self.ref}: token server {realm} answered without a token")
        return token


def verify_content(ref: Reference, digest: str, size: int, got_size: int, got_hex: str) -> None:
    """Raises ContentError unless the content had the size and sha256 its descriptor promised."""
    if got_size != size:
        sent = f"more than {size}" if got_size > size else str(got_size)
        raise ContentError(f"{ref}: blob {digest} should be {size} bytes, the registry sent {sent}")
    if f"sha256:{got_hex}" != digest:
        raise ContentError(
            f"{ref}: digest mismatch for blob {digest}: the registry sent content whose sha256 is {got_hex}"
        )


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


def _read(stream: IO[bytes], n: int, ref: Reference) -> bytes:
    try:
        return stream.read(n)
    except (OSError, HTTPException) as e:
        raise Unavailable(f"{ref}: the download broke off: {e}") from None
