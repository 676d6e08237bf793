"""One way for tests to wait for something that happens on its own time: poll a predicate until it
holds, and fail with a sentence naming what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The predicate never held within the timeout; callers that add context (a server's log) catch
    this rather than any AssertionError."""


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Calls ``predicate`` until it returns a truthy value and returns that value (a predicate that
    answers "not yet" with None types as returning its value).

    The predicate is called at least once, then every ``interval`` seconds, and once more at the
    deadline. An exception of a type in ``ignore`` counts as "not yet"; any other propagates at once.

    Raises:
        WaitTimeout: after ``timeout`` seconds, as "timed out after {timeout}s waiting for {what}",
            with the last ignored exception appended and chained if the predicate raised one.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as e:
            last_error = e
        else:
            if value:
                return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    message = f"timed out after {timeout}s waiting for {what}"
    if last_error is not None:
        message += f" (last error: {last_error!r})"
    raise WaitTimeout(message) from last_error
