"""Where a task came from, and reattaching a notebook to what it sent before a restart.

While the notebook extension is loaded (``%load_ext nbqueue`` registers a provider with
:func:`enable`), every task sent on its own (``delay``, ``apply_async``, ``send_task``,
``%%task``) records in its ``meta["provenance"]``:

``notebook``  the notebook's file (as the front end tells the kernel), else the kernel's
              working directory followed by ``/<unsaved notebook>``;
``cell``      the execution count of the cell that sent it;
``kernel``    the sending process (``builtin.PROCESS_TOKEN``);
``code``      a short hash of the task's code (its function's bytecode; a cell's source);
``label``     for ``%%task`` cells, the cell's name.

``App.tasks()`` shows them as the columns ``notebook``, ``cell``, ``code_hash`` (and a
cell task's label as its ``name``); ``cached_from`` says which task a cache hit took its
result from.

:func:`reattach` (``app.reattach()``, ``%nbqueue reattach``) finds what other kernels of
the same notebook sent that is still running, or finished since it was last seen (a
reattach, or the sending kernel after its cells, marks it seen: ``nbqueue.seen:<notebook
hash>:<kernel>`` in the backend's key-value store), and returns their results, which a
notebook displays as live views. Workflows (groups, chains, chords) are not stamped.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Callable

from . import serialization, states
from .workflow import Keys

#: seconds between two "seen" marks a kernel writes after its cells (0: after every cell, one small write)
MARK_EVERY = 0.0

_provider: Callable[[], dict] | None = None
_marks: dict[tuple[int, str], float] = {}
_adopted: set[str] = set()          # ids this process reattached: its views show them from then on
_lock = threading.Lock()


def enable(provider: Callable[[], dict]) -> None:
    """Stamp sends with ``provider()``: ``{"notebook", "cell"}`` (the notebook layer calls this)."""
    global _provider
    _provider = provider


def disable(provider: Callable[[], dict] | None = None) -> None:
    global _provider
    if provider is None or _provider == provider:
        _provider = None


def notebook_of(shell) -> str:
    """The notebook's identity for a shell: its file when the front end tells the kernel
    (``__vsc_ipynb_file__``, ``__session__``, ``JPY_SESSION_NAME``), else the working
    directory followed by ``/<unsaved notebook>``."""
    namespace = getattr(shell, "user_ns", None) or {}
    told = (namespace.get("__vsc_ipynb_file__"), namespace.get("__session__"), os.environ.get("JPY_SESSION_NAME"))
    for candidate in told:
        if isinstance(candidate, str) and candidate.endswith(".ipynb"):
            return os.path.abspath(candidate)
    return os.path.join(os.getcwd(), "<unsaved notebook>")


def _code_id(sig, task) -> tuple[str | None, str | None]:
    """(short code hash, cell label) of a send."""
    if sig.name == "nbqueue.cell":
        source = (sig.kwargs or {}).get("source")
        digest = hashlib.sha256(source.encode()).hexdigest()[:16] if isinstance(source, str) else None
        return digest, (sig.kwargs or {}).get("label")
    code = getattr(getattr(task, "fn", None), "__code__", None)
    if code is None:
        return None, None
    from .cache import _code_digest

    return _code_digest(code).hex()[:16], None


def stamp(sig, task, record: dict) -> None:
    """Add ``meta["provenance"]`` to a record about to be sent (nothing without a provider)."""
    provider = _provider
    if provider is None:
        return
    try:
        where = dict(provider())
    except Exception:
        return
    from .builtin import PROCESS_TOKEN

    code, label = _code_id(sig, task)
    where.update(kernel=PROCESS_TOKEN, code=code)
    if label:
        where["label"] = label
    meta = serialization.loads(record["meta"]) if record.get("meta") else {}
    meta["provenance"] = where
    record["meta"] = serialization.dumps(meta)


def _meta(record: dict) -> dict:
    try:
        return (serialization.loads(record["meta"]) or {}) if record.get("meta") else {}
    except ValueError:
        return {}


def add_columns(frame, records: list[dict]):
    """``App.tasks()``'s provenance columns: notebook, cell, code_hash, cached_from; a
    ``%%task`` cell's label as its name."""
    import pandas as pd

    metas = [_meta(r) for r in records if r is not None]
    where = [m.get("provenance") or {} for m in metas]
    labels = [w.get("label") for w in where]
    if any(labels):
        frame["name"] = [label or name for label, name in zip(labels, frame["name"])]
    frame["notebook"] = pd.Series([w.get("notebook") for w in where], dtype=object, index=frame.index)
    frame["cell"] = pd.Series([w.get("cell") for w in where], dtype="Int64", index=frame.index)
    frame["code_hash"] = pd.Series([w.get("code") for w in where], dtype=object, index=frame.index)
    cached_from = [(m.get("cache") or {}).get("from") for m in metas]
    frame["cached_from"] = pd.Series(cached_from, dtype=object, index=frame.index)
    return frame


# -- seen marks and reattaching ------------------------------------------------------------------------

def _notebook_key(notebook: str) -> str:
    return hashlib.sha256(notebook.encode()).hexdigest()[:16]


def mark_seen(app, notebook: str, kernel: str | None = None, *, every: float = 0.0) -> None:
    """Note that ``kernel`` (this process by default) has seen its tasks of ``notebook`` until now
    (at most once per ``every`` seconds)."""
    from .builtin import PROCESS_TOKEN

    kernel = kernel or PROCESS_TOKEN
    now = time.monotonic()
    with _lock:
        last = _marks.get((id(app), kernel))
        if every and last is not None and now - last < every:
            return
        _marks[(id(app), kernel)] = now
    app.backend.kv_set(Keys.seen(_notebook_key(notebook), kernel), repr(app.clock.time()))


class Reattached(list):
    """The results ``reattach`` found; a notebook displays each as a live view."""

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if not self:
            print("nbqueue: nothing to reattach: no task of this notebook is running or finished unseen")
            return
        print(f"nbqueue: reattached {len(self)} task(s) of this notebook")
        for result in self:
            display(result)


def reattach(app, notebook: str | None = None, limit: int = 200) -> Reattached:
    """What other kernels of ``notebook`` (this one's by default) sent that is not final, or
    became final since that kernel last saw it, newest last, at most ``limit``; they are
    then marked seen (and this process's views show them from then on: a later reattach
    here leaves them out)."""
    from .builtin import PROCESS_TOKEN
    from .result import AsyncResult

    if notebook is None:
        notebook = _current_notebook()
    prefix = Keys.seen(_notebook_key(notebook))
    seen = {k[len(prefix):]: float(v) for k, v in app.backend.kv_items(prefix).items()}
    found = []
    for record in app.backend.list():
        where = _meta(record).get("provenance") or {}
        kernel = where.get("kernel")
        if where.get("notebook") != notebook or kernel == PROCESS_TOKEN or record["id"] in _adopted:
            continue
        final = record.get("state") in states.READY_STATES
        if not final or (record.get("finished_at") or 0.0) > seen.get(kernel, 0.0):
            found.append((record, where))
    found.sort(key=lambda pair: pair[0].get("created_at") or 0.0)
    found = found[-limit:]
    for kernel in {where.get("kernel") for _, where in found}:
        mark_seen(app, notebook, kernel)
    with _lock:
        _adopted.update(r["id"] for r, _ in found)
    return Reattached(AsyncResult(r["id"], app, name=where.get("label") or r.get("name")) for r, where in found)


def _current_notebook() -> str:
    shell = None
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        pass
    return notebook_of(shell)


__all__ = ["enable", "disable", "stamp", "add_columns", "reattach", "mark_seen", "notebook_of", "Reattached"]
