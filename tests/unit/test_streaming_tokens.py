"""Streaming URL tokens: single use, expiring, bounded, unguessable."""

from __future__ import annotations

import pytest

from kvmsandbox.cri.streaming.tokens import TokenStore
from kvmsandbox.errors import ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_is_redeemed_once() -> None:
    store: TokenStore[str] = TokenStore()
    token = store.issue("exec c1 sh")
    assert len(token) >= 40 and "/" not in token and "+" not in token
    assert store.redeem(token) == "exec c1 sh"
    assert store.redeem(token) is None
    assert store.redeem("not-a-token") is None


def test_a_token_expires_after_its_time() -> None:
    clock = Clock()
    store: TokenStore[int] = TokenStore(ttl=60, clock=clock)
    early, late = store.issue(1), None
    clock.now += 30
    late = store.issue(2)
    clock.now += 31
    assert store.redeem(early) is None and store.redeem(late) == 2


def test_outstanding_tokens_are_bounded_and_expiry_frees_room() -> None:
    clock = Clock()
    store: TokenStore[int] = TokenStore(ttl=60, limit=3, clock=clock)
    tokens = [store.issue(i) for i in range(3)]
    with pytest.raises(ResourceExhausted, match="3 streaming requests are waiting"):
        store.issue(4)
    store.redeem(tokens[0])
    store.issue(5)
    clock.now += 61
    assert len(store) == 0
    store.issue(6)
