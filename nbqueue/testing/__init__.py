"""Test support shipped with nbqueue: the broker and backend contract suites."""

import time as _time
from typing import Any, Callable


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; raise
    AssertionError after ``timeout`` seconds. For tests that wait on workers."""
    deadline = _time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if _time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout}s")
        _time.sleep(interval)
