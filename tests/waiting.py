"""The one way a test waits: poll for exactly what it is about to assert, bounded in time.

`wait_for` is the only place in `tests/` allowed to call `time.sleep` (ruff's banned-api
rule TID251 enforces it; `tests/test_lint.py` runs it in `make test`). A test never sleeps
and then reads a result once: on a loaded machine the result may not be there yet, and on
a fast one the moment it meant to catch may be over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: polling interval: short enough not to slow tests, long enough not to load the machine
INTERVAL_S = 0.25


class WaitTimeout(AssertionError):
    """The condition did not hold in time; the message names what was awaited."""


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    *,
    interval: float = INTERVAL_S,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `condition()` until it returns something truthy, and return that value.

    After `timeout` seconds raise `WaitTimeout` naming `what` (a string, or a callable
    evaluated then, to say e.g. which figures are still missing) and the last value seen.
    Exceptions listed in `ignore` count as "not yet" (a server still starting refuses
    connections); any other exception, e.g. an AssertionError raised because a process
    died, ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = condition()
        except ignore as e:
            last = e
        else:
            if last:
                return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            raise WaitTimeout(
                f"timed out after {timeout:g} s waiting for {said}; last: {last!r:.500}"
            )
        time.sleep(interval)


def pause(seconds: float) -> None:
    """Pace a simulated workload (a writer logging a step every 50 ms). Not a way to wait
    for a result: use `wait_for` for that."""
    time.sleep(seconds)
