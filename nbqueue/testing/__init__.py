"""Test support shipped with nbqueue: the broker and backend contract suites."""

import functools as _functools
import time as _time
from typing import Any, Callable


def wait_for(
    condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, message: str = "condition"
) -> Any:
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


def dead_worker_name(label: str = "gone") -> str:
    """A worker name (``host:pid:label``) whose pid is a process of this host that has ended.

    For tests that simulate a worker dying in-process: a Worker so named that stops acting
    on its deliveries (no heartbeat runs for ``step``/``process``) is taken for dead once
    its lease lapses, and its task is run again; a worker named as this live process would
    be taken for a stalled one, whose attempt is waited for (see nbqueue.worker).
    """
    import socket

    return f"{socket.gethostname()}:{_ended_pid()}:{label}"


@_functools.lru_cache(maxsize=None)
def _ended_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
