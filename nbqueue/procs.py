"""Processes of this host, asked by pid (below the worker and the drivers, which both ask)."""
from __future__ import annotations

import os


def process_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this host is running (a zombie has ended); None where this
    cannot be asked (not POSIX: there ``os.kill`` would end the process)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
