"""Live progress views of results, updated by ONE background thread.

Displaying an AsyncResult, GroupResult, ChainResult or ChordResult (or calling
``nbqueue.progress(result)``) returns at once with a view; a single module-level
*updater* thread refreshes every open view about ten times a second from the result's
``snapshot()`` (one store query or two per view: the counts and the terminal record),
then drops the views that are finished. Task threads never touch widgets, and neither does the
kernel's main thread once a view is shown, so widget state changes come from one
thread only (ipywidgets is not safe across threads; ``Output`` is fed with
``append_stdout``, never used as a context manager).

Which view you get (``mode``):

``widget``  an ipywidgets view: state, elapsed time, a progress bar for groups and
            chords (succeeded, failed, total), one row per step for chains, the task's
            output as it streams, then the value or the traceback;
``text``    a plain-text progress line, printed again when it changes (at most once a
            second) and once when done;
``both``    the widget, and the text lines.

It is chosen, first match wins, by: the ``mode=`` argument of :func:`progress`; the
``NBQUEUE_PROGRESS`` environment variable (``widget``, ``text``, ``both`` or ``auto``);
else automatically: outside an IPython kernel (a terminal, a script) or without
ipywidgets, ``text``; in a kernel, ``widget`` when the running cell was sent by an
interactive frontend and ``both`` when it was sent by a headless runner. Interactive
frontends (JupyterLab, Notebook, VS Code) send execute requests with
``allow_stdin=True``; nbclient, nbconvert and papermill send ``allow_stdin=False``,
as they have no one to answer ``input()``. Headless runs get both so the executed
notebook keeps the final widget state (nbclient stores it in the notebook metadata)
and its text outputs say how the run went.

Recording the final state under nbclient: a runner only keeps messages that belong
to the cell being executed, so after every cell (IPython's ``post_run_cell`` event)
the kernel asks the updater for one more refresh and waits for it (at most a second
or two). A view that finishes while a later cell runs, or during the cell that waits
for it, is therefore stored finished.

Where text goes: a view's text lines (and, in text mode, the task's output) go to the
cell that displayed the view, never to whichever cell happens to run when they are
printed. ipykernel sends a thread's output to the latest cell unless the thread says
otherwise, so the updater writes each view's lines under the view's own cell
(``set_thread_parent`` of ipykernel's streams, per write), and anything else the
updater thread writes goes nowhere. A cell that has finished keeps what arrives for it
in JupyterLab; nbclient and papermill drop it (they only record the running cell), so
there a line printed after its cell ended is not kept anywhere: the view's final state
is in the widget state, and in the cell when the task finishes while its cell runs.
The worker's capture (nbqueue.capture) routes a task's echoed output the same way.
"""
from __future__ import annotations

import html
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

from .. import capture, states
from . import display as _d

log = logging.getLogger(__name__)

MODES = ("widget", "text", "both")
INTERVAL = 0.1              # seconds between refreshes: about 10 per second
TEXT_INTERVAL = 1.0         # a changed text line is printed at most this often
SETTLE = 10.0               # seconds a finished workflow's view keeps counting stragglers


# -- which frontend ------------------------------------------------------------------------------

def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _kernel():
    return getattr(_shell(), "kernel", None)


NOWHERE = capture.NOWHERE


def current_parent() -> dict | None:
    """The request (cell) this thread's output belongs to in an ipykernel; None outside one."""
    kernel = _kernel()
    if kernel is None:
        return None
    try:
        return kernel.get_parent() or None
    except Exception:
        return None


def _widgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def detect_mode(mode: str | None = None) -> str:
    """``widget``, ``text`` or ``both``; see the module docstring for the rules."""
    chosen = (mode or os.environ.get("NBQUEUE_PROGRESS") or "auto").strip().lower()
    if chosen not in MODES + ("auto",):
        raise ValueError(f"progress mode must be one of widget, text, both or auto, not {chosen!r}")
    kernel = _kernel()
    if chosen != "auto":
        if chosen != "text" and (kernel is None or not _widgets_available()):
            return "text"                      # no comm to talk to a frontend: widgets could not show
        return chosen
    if kernel is None or not _widgets_available():
        return "text"
    try:
        parent = kernel.get_parent() or {}
    except Exception:
        parent = {}
    allow_stdin = (parent.get("content") or {}).get("allow_stdin")
    return "widget" if allow_stdin else "both"


# -- the updater thread ------------------------------------------------------------------------------

class _Watch:
    def __init__(self, app, ids: list[str], callback: Callable[[dict], None]):
        self.app, self.ids, self.callback = app, list(ids), callback
        self.cancelled = False


class Updater:
    """The one thread that refreshes views and fires watches, about ten times a second."""

    def __init__(self, interval: float = INTERVAL):
        self.interval = interval
        self._cond = threading.Condition()
        self._views: list[View] = []
        self._watches: list[_Watch] = []
        self._thread: threading.Thread | None = None
        self._ticks = 0
        self._busy = False

    # registration (any thread)
    def add_view(self, view: "View") -> None:
        with self._cond:
            self._views.append(view)
            self._ensure_thread()
            self._cond.notify_all()

    def watch(self, app, ids: list[str], callback: Callable[[dict], None]) -> _Watch:
        """Call ``callback(states)`` in the updater thread once every id is final."""
        w = _Watch(app, ids, callback)
        with self._cond:
            self._watches.append(w)
            self._ensure_thread()
            self._cond.notify_all()
        return w

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._views) + len(self._watches)

    def views(self) -> list["View"]:
        with self._cond:
            return list(self._views)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="nbqueue-view-updater", daemon=True)
            self._thread.start()

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until a refresh that started after this call has completed (False on timeout).

        Refreshes keep their pace (one per ``interval``): a flush waits for the next one.
        """
        if threading.current_thread() is self._thread:
            return False
        with self._cond:
            if not self._views and not self._watches:
                return True
            target = self._ticks + (2 if self._busy else 1)
            return self._cond.wait_for(lambda: self._ticks >= target, timeout)

    def _run(self) -> None:
        capture.route_thread(NOWHERE)      # in a kernel: stray output of this thread is not a later cell's
        last = 0.0
        while True:
            with self._cond:
                while not self._views and not self._watches:
                    self._cond.wait()
            pause = last + self.interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)                  # at most one refresh per interval, whoever asks
            with self._cond:
                views, watches = list(self._views), list(self._watches)
                self._busy = True
            last = time.monotonic()
            finished_views, finished_watches = self._tick(views, watches)
            with self._cond:
                self._busy = False
                self._views = [v for v in self._views if v not in finished_views]
                self._watches = [w for w in self._watches if w not in finished_watches and not w.cancelled]
                self._ticks += 1
                self._cond.notify_all()

    def _tick(self, views: list["View"], watches: list[_Watch]) -> tuple[list, list]:
        finished_views = []
        for view in views:
            try:
                if view.refresh():
                    finished_views.append(view)
                view.errors = 0
            except Exception:
                view.errors += 1
                log.debug("refreshing %r failed", view, exc_info=True)
                if view.errors >= 20:       # the App was closed, or the store is gone
                    finished_views.append(view)
        finished_watches = [w for w in watches if w.cancelled]
        by_app: dict[int, list[_Watch]] = {}
        for w in watches:
            if not w.cancelled:
                by_app.setdefault(id(w.app), []).append(w)
        for group in by_app.values():
            ids = sorted({i for w in group for i in w.ids})
            try:
                found = group[0].app.states_of(ids)
            except Exception:
                log.debug("watch query failed", exc_info=True)
                continue
            for w in group:
                if all(found.get(i) in states.READY_STATES for i in w.ids):
                    finished_watches.append(w)
                    try:
                        w.callback({i: found[i] for i in w.ids})
                    except Exception:
                        log.exception("nbqueue: a watch callback failed")
        return finished_views, finished_watches


UPDATER = Updater()
_hooked_shells: set[int] = set()
_hook_lock = threading.Lock()


def _after_cell(*_args) -> None:
    """post_run_cell: one more refresh while the cell is still the kernel's current one."""
    UPDATER.flush(timeout=2.0)


def install_hooks(shell=None) -> None:
    """Register the post-cell refresh on this IPython shell (once)."""
    shell = shell or _shell()
    if shell is None:
        return
    with _hook_lock:
        if id(shell) in _hooked_shells:
            return
        _hooked_shells.add(id(shell))
    shell.events.register("post_run_cell", _after_cell)


def uninstall_hooks(shell) -> None:
    with _hook_lock:
        if id(shell) not in _hooked_shells:
            return
        _hooked_shells.discard(id(shell))
    try:
        shell.events.unregister("post_run_cell", _after_cell)
    except ValueError:
        pass


def _emit(text: str, parent: dict | None = None) -> None:
    """Print a line; in an ipykernel, as output of the cell ``parent`` (see the module docstring)."""
    try:
        with capture.routed(parent):
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
    except Exception:  # a closed stream must not kill the updater
        log.debug("could not print a progress line", exc_info=True)


# -- views -----------------------------------------------------------------------------------------

class View:
    """One displayed result. ``snapshot()`` reads the store; ``render()`` and ``text()`` present it."""

    kind = "task"

    def __init__(self, result, mode: str):
        self.result = result
        self.app = result.app
        self.mode = mode
        self.errors = 0
        self.widget = None
        self.finished = False
        self._final_at: float | None = None
        self._last_text: str | None = None
        self._last_text_at = 0.0
        self._snap: dict | None = None
        self._displayed = False
        self.parent = current_parent()        # the cell that displays this view: where its text goes

    # the three hooks of a view
    def snapshot(self) -> dict:
        raise NotImplementedError

    def build(self, snap: dict) -> Any:
        raise NotImplementedError

    def render(self, snap: dict) -> None:
        raise NotImplementedError

    def text(self, snap: dict) -> str:
        raise NotImplementedError

    # shared
    def start(self) -> dict:
        """First snapshot and (in widget modes) the widget; runs in the displaying thread."""
        snap = self.snapshot()
        self._snap = snap
        if self.mode in ("widget", "both"):
            self.widget = self.build(snap)
            self.render(snap)
        self._last_text = self.text(snap)
        self._last_text_at = time.monotonic()
        self.finished = snap["final"]
        return snap

    def refresh(self) -> bool:
        """Update from the store (updater thread only); True when this view is finished."""
        if self.finished:
            return True
        snap = self.snapshot()
        self._snap = snap
        if self.widget is not None:
            self.render(snap)
        if self.mode in ("text", "both"):
            self._print(snap)
        self.finished = snap["final"]
        return self.finished

    def _print(self, snap: dict) -> None:
        if self.kind == "task":
            delta = snap.get("output_delta")
            if delta:
                _emit(delta.rstrip("\n"), self.parent)
        line = self.text(snap)
        now = time.monotonic()
        if line == self._last_text:
            return
        if not snap["final"] and now - self._last_text_at < TEXT_INTERVAL:
            return
        self._last_text, self._last_text_at = line, now
        _emit(line, self.parent)

    def bundle(self) -> dict:
        """The display data: the widget (widget modes), the static HTML (where widgets do not
        render: GitHub, nbconvert) and the text line."""
        data: dict = {}
        if self.widget is not None:
            data.update(self.widget._repr_mimebundle_())
        try:
            data["text/html"] = _d.html(self.result)
        except Exception:  # a view must not raise
            log.debug("no static HTML for %r", self.result, exc_info=True)
        data["text/plain"] = self._last_text or repr(self.result)
        return data

    def _ipython_display_(self) -> None:
        """Shown once: ``nbqueue.progress(r)`` as a cell's last expression does not show it twice."""
        if not self._displayed:
            from IPython.display import display

            self._displayed = True
            display(self.bundle(), raw=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.result!r} mode={self.mode}>"


def _header(kind: str, label: str, ident: str, state: str, elapsed: str, note: str = "") -> str:
    parts = [f"<b>{html.escape(label)}</b>", f"<code>{html.escape(ident[:8])}</code>", _d.badge(state)]
    if elapsed:
        parts.append(f'<span class="nbqueue-elapsed">{html.escape(elapsed)}</span>')
    if note:
        parts.append(f"<i>{html.escape(note)}</i>")
    return f'<div class="nbqueue-header nbqueue-{kind}">' + " · ".join(parts) + "</div>"


def _elapsed_text(took: float | None, final: bool) -> str:
    """Elapsed seconds as a view shows them: readable units once final, whole seconds before."""
    if took is None:
        return ""
    return _d.seconds(took) if final else f"{int(took)}s"


def _value_html(snap: dict) -> str:
    """The value, or the error and its traceback, of a snapshot's outcome keys."""
    if snap["value"] is not None or snap["value_error"] is not None:
        return f'<div class="nbqueue-value">→ {_d.value_html(snap)}</div>'
    if snap["error"]:
        out = f'<div class="nbqueue-error" style="color:#dc3545">{html.escape(snap["error"])}</div>'
        if snap["traceback"]:
            out += ('<details><summary>traceback</summary>'
                    f'<pre style="font-size:85%">{html.escape(snap["traceback"])}</pre></details>')
        return out
    return ""


def _value_text(snap: dict, limit: int = 200) -> str:
    if snap["value"] is not None:
        return " → " + _d.clip(snap["value"], limit)
    if snap["value_error"] is not None:
        return f" → (cannot decode: {snap['value_error']})"
    if snap["error"]:
        return ": " + _d.clip(snap["error"], limit)
    return ""


class TaskView(View):
    """One task: state, elapsed time, its output as it streams, then the value or the traceback."""

    kind = "task"

    def __init__(self, result, mode):
        super().__init__(result, mode)
        self._shown_output = ""           # task output the widget shows
        self._printed_output = ""         # task output printed as text (text and both modes)

    def snapshot(self) -> dict:
        snap = self.result.snapshot()
        output, printed = snap["output"], self._printed_output
        delta = None
        if output != printed:
            delta = output[len(printed):] if output.startswith(printed) else output
        snap["output_delta"] = delta
        return snap

    def build(self, snap):
        import ipywidgets as w

        self._header = w.HTML()
        self._output = w.Output(layout=w.Layout(max_height="16em", overflow="auto"))
        self._value = w.HTML()
        box = w.VBox([self._header, self._output, self._value])
        box.add_class("nbqueue-view")
        box.add_class("nbqueue-task-view")
        return box

    def render(self, snap):
        state = snap["state"]
        header = _header("task", snap["label"], snap["id"], state, _elapsed_text(snap["elapsed"], snap["final"]),
                         snap["note"])
        if self._header.value != header:
            self._header.value = header
        output = snap["output"]
        if output != self._shown_output:
            if output.startswith(self._shown_output):
                self._output.append_stdout(output[len(self._shown_output):])
            else:                                  # a retry starts a new capture
                self._output.outputs = ()
                self._output.append_stdout(output)
            self._shown_output = output
        value = _value_html(snap) if state in states.READY_STATES or state == states.RETRY else ""
        if self._value.value != value:
            self._value.value = value

    def refresh(self) -> bool:
        done = super().refresh()
        if self._snap is not None and self.mode in ("text", "both"):
            self._printed_output = self._snap["output"]     # printed by refresh (output so far at the first one)
        if done and capture._routes.get(self.result.id) is self.parent:
            capture.route(self.result.id, None)
        return done

    def start(self):
        if self.parent is not None:
            capture.route(self.result.id, self.parent)     # echoed output of the task: this view's cell
        snap = super().start()
        if self.finished:
            capture.route(self.result.id, None)
        return snap

    def text(self, snap) -> str:
        state = snap["state"]
        line = f"[nbqueue] {snap['label']} {snap['id'][:8]}: {state}"
        took = _elapsed_text(snap["elapsed"], snap["final"])
        if took:
            line += (" in " if snap["final"] else " ") + took
        if snap["note"] and not snap["final"]:
            line += f" ({snap['note']})"
        if snap["final"] or state == states.RETRY:
            line += _value_text(snap)
        return line


class WorkflowView(View):
    """A group, chord or chain: a progress bar, counts, and the value when done."""

    def __init__(self, result, mode):
        super().__init__(result, mode)
        self.kind = result.kind
        self._note, self._noted_at = "", float("-inf")

    def snapshot(self) -> dict:
        """The result's snapshot, with what the view adds: the waiting note checked at most every
        2 s, ``final`` held back up to SETTLE seconds while tasks inside still run, and ``bar``."""
        now = time.monotonic()
        due = now - self._noted_at >= 2.0            # the note reads the tasks inside: not at every refresh
        snap = self.result.snapshot(diagnose=due)
        if snap["state"] != states.PENDING or snap["final"]:
            snap["note"] = ""
        elif due:
            self._noted_at, self._note = now, snap["note"]
        else:
            snap["note"] = self._note
        counts = snap["counts"]
        if snap["final"] and self._final_at is None:
            self._final_at = now
        unsettled = counts["pending"] + counts["running"] + counts["retrying"]
        snap["final"] = snap["final"] and (unsettled == 0 or now - (self._final_at or now) > SETTLE)
        if self.kind == "chain":
            steps = snap["steps"]
            snap["bar"] = (sum(1 for s in steps if s["state"] in states.READY_STATES), max(len(steps), 1))
        else:
            snap["bar"] = (counts["done"], max(counts["total"], 1))
        return snap

    def _elapsed_of(self, snap) -> str:
        start = snap["created_at"]
        if start is None:
            return ""
        end = snap["finished_at"] if snap["final"] else None
        return _elapsed_text(max(0.0, (end if end is not None else time.time()) - start), snap["final"])

    def build(self, snap):
        import ipywidgets as w

        self._header = w.HTML()
        self._bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="60%"))
        self._bar.add_class("nbqueue-progress")
        self._counts = w.HTML()
        self._steps = w.HTML()
        self._value = w.HTML()
        children = [self._header, w.HBox([self._bar, self._counts])]
        if self.kind == "chain":
            children.append(self._steps)
        children.append(self._value)
        box = w.VBox(children)
        box.add_class("nbqueue-view")
        box.add_class(f"nbqueue-{self.kind}-view")
        return box

    def render(self, snap):
        counts = snap["counts"]
        header = _header(self.kind, snap["label"], snap["id"], snap["state"], self._elapsed_of(snap), snap["note"])
        if self._header.value != header:
            self._header.value = header
        value, maximum = snap["bar"]
        if self._bar.max != maximum:
            self._bar.max = maximum
        if self._bar.value != value:
            self._bar.value = value
        style = "info"
        if counts["failed"] or snap["state"] == states.FAILURE:
            style = "danger"
        elif snap["final"] and snap["state"] == states.SUCCESS:
            style = "success"
        if self._bar.bar_style != style:
            self._bar.bar_style = style
        line = html.escape(_d.counts_line(counts))
        if snap["callback_state"]:
            line += " · callback " + _d.badge(snap["callback_state"])
        line = f'<span class="nbqueue-counts">{line}</span>'
        if self._counts.value != line:
            self._counts.value = line
        if self.kind == "chain":
            pad = 'style="padding:1px 12px 1px 0;text-align:left"'
            rows = "".join(
                f"<tr><td {pad}>{s['index']}</td><td {pad}>{html.escape(s['name'])}</td>"
                f"<td {pad}>{_d.badge(s['state'])}</td>"
                f"<td {pad}>{html.escape(_d.seconds(s['runtime']))}</td>"
                f"<td {pad}><code>{html.escape(_step_value(s))}</code></td></tr>"
                for s in snap["steps"])
            head = "".join(f"<th {pad}>{h}</th>" for h in ("#", "step", "state", "time", "result"))
            table = f'<table class="nbqueue-steps"><tr>{head}</tr>{rows}</table>'
            if self._steps.value != table:
                self._steps.value = table
        value_html = _value_html(snap) if snap["final"] or snap["state"] == states.FAILURE else ""
        if self._value.value != value_html:
            self._value.value = value_html

    def text(self, snap) -> str:
        counts = snap["counts"]
        pct = int(100 * snap["bar"][0] / snap["bar"][1])
        line = f"[nbqueue] {snap['label']} {snap['state']} {pct}%"
        if self.kind == "chain":
            done = snap["bar"][0]
            line += f" ({done}/{snap['bar'][1]} steps)"
        else:
            line += f" ({_d.counts_line(counts)})"
        if snap["callback_state"]:
            line += f", callback {snap['callback_state']}"
        took = self._elapsed_of(snap)
        if took:
            line += (" in " if snap["final"] else " ") + took
        if snap.get("note"):
            line += f" ({snap['note']})"
        if snap["final"] or snap["state"] == states.FAILURE:
            line += _value_text(snap)
        return line


def _step_value(step: dict) -> str:
    if step["value"] is not None:
        return _d.clip(step["value"], 80)
    if step["value_error"] is not None:
        return "?"
    return _d.clip(step["error"], 80) if step["error"] else ""


# -- entry points ----------------------------------------------------------------------------------

def make_view(result, mode: str | None = None) -> View:
    from ..result import AsyncResult

    mode = detect_mode(mode)
    return TaskView(result, mode) if isinstance(result, AsyncResult) else WorkflowView(result, mode)


def show(result, mode: str | None = None) -> View:
    """Create a view, take its first snapshot and hand it to the updater; returns the view."""
    view = make_view(result, mode)
    view.start()
    install_hooks()
    if not view.finished:
        UPDATER.add_view(view)
    return view


def mimebundle(result, include=None, exclude=None, mode: str | None = None) -> dict:
    """The display data of a result (what nbqueue registers with IPython): the live view's."""
    return show(result, mode).bundle()


def progress(result, mode: str | None = None) -> View:
    """Show a live view of ``result`` now (also mid-cell); returns the view."""
    view = show(result, mode)
    if _shell() is not None:
        view._ipython_display_()
    else:
        view._displayed = True
        _emit(view._last_text or repr(result), view.parent)
    return view
