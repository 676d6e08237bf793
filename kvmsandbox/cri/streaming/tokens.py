"""Single-use tokens for streaming URLs (``/exec/{token}``): what an Exec, Attach or PortForward call
asked for, kept until a client redeems the URL once or it expires (as containerd and CRI-O: one
minute, a bound on how many are outstanding)."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvmsandbox.errors import ResourceExhausted

TOKEN_TTL = 60.0
MAX_OUTSTANDING = 1000
# 32 random bytes, URL-safe: what a client must present; nothing else names the request.
TOKEN_BYTES = 32

T = TypeVar("T")


@dataclass(frozen=True)
class _Entry(Generic[T]):
    request: T
    expires: float


class TokenStore(Generic[T]):
    """Thread-safe; every method is O(1) amortised (expired tokens are dropped oldest first)."""

    def __init__(
        self, ttl: float = TOKEN_TTL, limit: int = MAX_OUTSTANDING, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl, self._limit, self._clock = ttl, limit, clock
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, request: T) -> str:
        """A new token for ``request``.

        Raises:
            ResourceExhausted: ``limit`` tokens are outstanding (none redeemed or expired yet).
        """
        with self._lock:
            self._expire()
            if len(self._entries) >= self._limit:
                raise ResourceExhausted(
                    f"{self._limit} streaming requests are waiting for their client; try again in a minute"
                )
            token = secrets.token_urlsafe(TOKEN_BYTES)
            self._entries[token] = _Entry(request, self._clock() + self._ttl)
            return token

    def redeem(self, token: str) -> T | None:
        """The request of ``token``, once; None when it is unknown, used or expired."""
        with self._lock:
            self._expire()
            entry = self._entries.pop(token, None)
        return None if entry is None else entry.request

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            token, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                return
            del self._entries[token]
