"""The tests' polling helper: what it returns, how it fails, what it retries and how often."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.waiting import WaitTimeout, wait_until


def counter(ready_at: int, value: object = "ready") -> tuple[list[int], Callable[[], object]]:
    calls: list[int] = []

    def predicate() -> object:
        calls.append(1)
        return value if len(calls) >= ready_at else None

    return calls, predicate


def test_returns_the_first_truthy_value_of_the_predicate() -> None:
    calls, predicate = counter(ready_at=3, value={"ip": "10.0.0.2"})

    assert wait_until(predicate, 5, "the pod's address", interval=0.01) == {"ip": "10.0.0.2"}
    assert len(calls) == 3


def test_a_predicate_that_holds_at_once_is_called_once_without_sleeping() -> None:
    start = time.monotonic()

    assert wait_until(lambda: 42, 5, "the answer", interval=10) == 42
    assert time.monotonic() - start < 1


def test_times_out_with_an_assertion_error_naming_what_it_waited_for() -> None:
    start = time.monotonic()

    with pytest.raises(AssertionError, match=r"^timed out after 0\.3s waiting for the socket to appear$") as e:
        wait_until(lambda: False, 0.3, "the socket to appear", interval=0.05)

    assert isinstance(e.value, WaitTimeout)
    assert 0.3 <= time.monotonic() - start < 2


def test_an_ignored_exception_means_not_yet_and_the_last_one_is_reported() -> None:
    def refused() -> str:
        raise ConnectionRefusedError("nobody listens on 10.0.0.2:80")

    with pytest.raises(WaitTimeout, match=r"waiting for http://10\.0\.0\.2/.*nobody listens") as e:
        wait_until(refused, 0.2, "http://10.0.0.2/", interval=0.05, ignore=(OSError,))

    assert isinstance(e.value.__cause__, ConnectionRefusedError)


def test_an_ignored_exception_before_success_does_not_fail_the_wait() -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise FileNotFoundError("not yet")
        return "there"

    assert wait_until(flaky, 5, "the file", interval=0.01, ignore=(FileNotFoundError,)) == "there"


def test_an_exception_not_ignored_propagates_at_once() -> None:
    calls: list[int] = []

    def broken() -> bool:
        calls.append(1)
        raise ValueError("bad state")

    with pytest.raises(ValueError, match="bad state"):
        wait_until(broken, 5, "anything", interval=0.01, ignore=(OSError,))
    assert len(calls) == 1


def test_the_interval_spaces_the_calls() -> None:
    calls, predicate = counter(ready_at=10**9)

    with pytest.raises(WaitTimeout):
        wait_until(predicate, 0.5, "never", interval=0.1)

    # About one call per interval plus the one at the deadline; far from a busy loop.
    assert 4 <= len(calls) <= 8


def test_the_last_call_happens_at_the_deadline_even_with_a_long_interval() -> None:
    calls, predicate = counter(ready_at=2)
    start = time.monotonic()

    assert wait_until(predicate, 0.2, "the second call", interval=30) == "ready"
    assert len(calls) == 2
    assert time.monotonic() - start < 2
