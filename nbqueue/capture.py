"""Per-task capture of stdout/stderr.

``redirect_stdout`` swaps the process-wide stream, so two tasks (or a task and the
notebook) would steal each other's output. Instead sys.stdout/sys.stderr are wrapped
once by a proxy that sends writes from a thread running a task to that task's buffer
and everything else to the original stream.
"""
from __future__ import annotations

import io
import sys
import threading

_local = threading.local()
_install_lock = threading.Lock()
_buffers: dict[str, io.StringIO] = {}     # task id -> buffer, for live reads by the heartbeat


class _TaskStream:
    def __init__(self, original, echo_flag: list):
        self._original = original
        self._echo = echo_flag

    def write(self, text):
        buf = getattr(_local, "buffer", None)
        if buf is None:
            return self._original.write(text)
        buf.write(text)
        if self._echo[0]:
            self._original.write(text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if getattr(_local, "buffer", None) is None or self._echo[0]:
            self._original.flush()

    def __getattr__(self, name):
        return getattr(self._original, name)


_echo = [False]


def install(echo: bool = False) -> None:
    """Wrap sys.stdout and sys.stderr (idempotent). ``echo`` also passes task output through."""
    with _install_lock:
        _echo[0] = _echo[0] or echo
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _TaskStream) and stream is not None:
                setattr(sys, name, _TaskStream(stream, _echo))


def begin(task_id: str) -> None:
    buf = io.StringIO()
    _local.buffer = buf
    _local.task_id = task_id
    _buffers[task_id] = buf


def end() -> str:
    buf = getattr(_local, "buffer", None)
    _local.buffer = None
    task_id = getattr(_local, "task_id", None)
    if task_id is not None:
        _buffers.pop(task_id, None)
    return buf.getvalue() if buf is not None else ""


def peek(task_id: str) -> str | None:
    buf = _buffers.get(task_id)
    return None if buf is None else buf.getvalue()

