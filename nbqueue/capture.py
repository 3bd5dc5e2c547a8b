"""Per-task capture of stdout/stderr.

``redirect_stdout`` swaps the process-wide stream, so two tasks (or a task and the
notebook) would steal each other's output. Instead sys.stdout/sys.stderr are wrapped
once by a proxy that sends writes from a thread running a task to that task's buffer
and everything else to the original stream.

In an ipykernel (7 or later: its streams have ``set_thread_parent``), output written
by a thread goes to the latest cell unless the thread names its cell. A task's output
echoed to the stream (``echo``) goes to the cell that sent or shows the task, when the
notebook layer registered it with :func:`route`, and nowhere otherwise; :func:`routed`
and :func:`route_thread` let other threads (the live views' updater) do the same.
Outside a kernel routing does nothing.
"""
from __future__ import annotations

import contextlib
import io
import sys
import threading

_local = threading.local()
_install_lock = threading.Lock()
_buffers: dict[str, io.StringIO] = {}     # task id -> buffer, for live reads by the heartbeat
_routes: dict[str, dict] = {}             # task id -> the request (cell) its echoed output belongs to
#: the parent header of output that belongs to no cell (ipykernel): frontends show it nowhere
NOWHERE: dict = {}


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
            parent = _routes.get(getattr(_local, "task_id", None) or "")
            if parent is None and hasattr(self._original, "set_thread_parent"):
                parent = NOWHERE                  # a kernel: not the cell that happens to run now
            with _routed_stream(self._original, parent):
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



# -- where output goes in an ipykernel --------------------------------------------------------------

def route(task_id: str, parent: dict | None) -> None:
    """Echoed output of task ``task_id`` belongs to the cell of request ``parent`` (None: forget)."""
    if parent is None:
        _routes.pop(task_id, None)
    else:
        _routes[task_id] = parent


def _underlying(stream):
    return stream._original if isinstance(stream, _TaskStream) else stream


@contextlib.contextmanager
def _routed_stream(stream, parent: dict | None):
    setter = getattr(stream, "set_thread_parent", None) if parent is not None else None
    token = setter(parent) if setter is not None else None
    try:
        yield
    finally:
        if token is not None:
            stream.reset_thread_parent(token)


@contextlib.contextmanager
def routed(parent: dict | None):
    """Within the block, this thread's stdout and stderr belong to the cell of request
    ``parent`` (ipykernel); ``None`` leaves them as they are."""
    with contextlib.ExitStack() as stack:
        for stream in {id(s): s for s in map(_underlying, (sys.stdout, sys.stderr)) if s is not None}.values():
            stack.enter_context(_routed_stream(stream, parent))
        yield


def route_thread(parent: dict) -> None:
    """From now on this thread's stdout and stderr belong to the cell of ``parent`` (ipykernel)."""
    for stream in (sys.stdout, sys.stderr):
        setter = getattr(_underlying(stream), "set_thread_parent", None)
        if setter is not None:
            setter(parent)
