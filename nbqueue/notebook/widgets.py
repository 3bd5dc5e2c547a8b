"""Live progress views of results, updated by ONE background thread.

Displaying an AsyncResult, GroupResult, ChainResult or ChordResult (or calling
``nbqueue.progress(result)``) returns at once with a view; a single module-level
*updater* thread refreshes every open view about ten times a second (one backend
query or two per view: ``progress()`` counts and the terminal record), then drops
the views that are finished. Task threads never touch widgets, and neither does the
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
from ..backend import counts_from_states
from ..result import NOTICE_AFTER, waiting_problem
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
                found = group[0].app.backend.states_of(ids)
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
            data["text/html"] = self.result._repr_html_()
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

    def _elapsed(self, record: dict | None, final: bool) -> str:
        if not record:
            return ""
        took = _d.elapsed(record)
        if took is None:
            return ""
        return _d.seconds(took) if final else f"{int(took)}s"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.result!r} mode={self.mode}>"


def _header(kind: str, label: str, ident: str, state: str, elapsed: str, note: str = "") -> str:
    parts = [f"<b>{html.escape(label)}</b>", f"<code>{html.escape(ident[:8])}</code>", _d.badge(state)]
    if elapsed:
        parts.append(f'<span class="nbqueue-elapsed">{html.escape(elapsed)}</span>')
    if note:
        parts.append(f"<i>{html.escape(note)}</i>")
    return f'<div class="nbqueue-header nbqueue-{kind}">' + " · ".join(parts) + "</div>"


def _value_html(app, record: dict | None) -> str:
    if not record:
        return ""
    state = record.get("state")
    if state == states.SUCCESS:
        try:
            value = _d.value_html(_d.record_value(app, record), 400)     # a DataFrame: its first rows and shape
        except Exception as exc:
            value = f"<code>{html.escape(f'(cannot decode the result: {exc})')}</code>"
        return f'<div class="nbqueue-value">→ {value}</div>'
    if state in (states.FAILURE, states.REVOKED) or (state == states.RETRY and record.get("error")):
        error = f"{record.get('exc_type') or 'Error'}: {record.get('error') or ''}"
        out = f'<div class="nbqueue-error" style="color:#dc3545">{html.escape(error)}</div>'
        if record.get("traceback"):
            out += f'<details><summary>traceback</summary><pre style="font-size:85%">{html.escape(record["traceback"])}</pre></details>'
        return out
    return ""


def _value_text(app, record: dict | None) -> str:
    if not record:
        return ""
    if record.get("state") == states.SUCCESS:
        try:
            return " → " + _d.short(_d.record_value(app, record), 200)
        except Exception as exc:
            return f" → (cannot decode: {exc})"
    if record.get("error"):
        return f": {record.get('exc_type') or 'Error'}: {_d.clip(record['error'], 200)}"
    return ""


class TaskView(View):
    """One task: state, elapsed time, its output as it streams, then the value or the traceback."""

    kind = "task"

    def __init__(self, result, mode):
        super().__init__(result, mode)
        self._shown_output = ""           # task output the widget shows
        self._printed_output = ""         # task output printed as text (text and both modes)

    def snapshot(self) -> dict:
        record = self.app.backend.get(self.result.id) or {}
        state = record.get("state") or states.PENDING
        final = state in states.READY_STATES
        output = record.get("output") or ""
        if not final:
            live = capture.peek(self.result.id)     # a worker thread of this process: output as it is written
            if live is not None and len(live) >= len(output):
                output = live
        delta = None
        if output != self._printed_output:
            delta = output[len(self._printed_output):] if output.startswith(self._printed_output) else output
        note = ""
        note_fn = getattr(self.result, "view_note", None)
        if callable(note_fn):
            note = note_fn(state) or ""
        if not note and state == states.PENDING and _waited(self.app, record):
            note = waiting_problem(self.app, record) or ""      # e.g. "no live worker serves queue 'q'"
        return {"record": record, "state": state, "final": final, "output": output, "output_delta": delta, "note": note}

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
        record, state = snap["record"], snap["state"]
        header = _header("task", _d.label_of(self.result), self.result.id, state, self._elapsed(record, snap["final"]), snap["note"])
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
        value = _value_html(self.app, record) if state in states.READY_STATES or state == states.RETRY else ""
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
        record, state = snap["record"], snap["state"]
        line = f"[nbqueue] {_d.label_of(self.result)} {self.result.id[:8]}: {state}"
        took = self._elapsed(record, snap["final"])
        if took:
            line += (" in " if snap["final"] else " ") + took
        if snap["note"] and not snap["final"]:
            line += f" ({snap['note']})"
        if snap["final"] or state == states.RETRY:
            line += _value_text(self.app, record)
        return line


class WorkflowView(View):
    """A group, chord or chain: a progress bar, counts, and the value when done."""

    def __init__(self, result, mode):
        super().__init__(result, mode)
        self.kind = _d.kind_of(result)
        self._note, self._noted_at = "", float("-inf")

    def _steps(self, records: dict) -> list[dict]:
        return []

    def snapshot(self) -> dict:
        from ..result import AsyncResult, ChainResult, ChordResult

        result = self.result
        backend = self.app.backend
        terminal = backend.get(result.terminal_id) or {}
        steps: list[dict] = []
        callback_state = None
        if isinstance(result, ChainResult):
            leaves = result.leaves()
            records = dict(zip([r.id for r in leaves], backend.get_many([r.id for r in leaves])))
            counts = counts_from_states([((rec or {}).get("state"), 1) for rec in records.values()], len(leaves))
            for i, step in enumerate(result.results):
                step_leaves = [step] if isinstance(step, AsyncResult) else step.leaves()
                recs = [records.get(r.id) or {} for r in step_leaves]
                step_counts = counts_from_states([(r.get("state"), 1) for r in recs], len(recs))
                if isinstance(step, AsyncResult):
                    rec = recs[0]
                    state = rec.get("state") or states.PENDING
                    name = step._name or rec.get("name") or "task"
                else:
                    rec = backend.get(step.terminal_id) or {}
                    state = rec.get("state") or states.PENDING
                    name = f"{_d.kind_of(step)} of {step_counts['total']}"
                steps.append({"index": i + 1, "name": name, "state": state, "record": rec, "counts": step_counts})
            bar_value, bar_max = sum(1 for s in steps if s["state"] in states.READY_STATES), len(steps)
        elif isinstance(result, ChordResult):
            counts = result.header.progress()
            callback_state = terminal.get("state") or states.PENDING
            bar_value, bar_max = counts["done"], counts["total"]
        else:  # GroupResult
            counts = result.progress()
            bar_value, bar_max = counts["done"], counts["total"]
        state = terminal.get("state") or states.PENDING
        if state == states.PENDING and counts["done"] + counts["running"] + counts["retrying"] > 0:
            state = states.STARTED                # a workflow's record is written when it finishes
        terminal_final = (terminal.get("state") or states.PENDING) in states.READY_STATES
        unsettled = counts["pending"] + counts["running"] + counts["retrying"]
        now = time.monotonic()
        if terminal_final and self._final_at is None:
            self._final_at = now
        final = terminal_final and (unsettled == 0 or now - (self._final_at or now) > SETTLE)
        start = self._created_at(terminal, steps)
        note = ""
        if state == states.PENDING and not final and _waited(self.app, {"created_at": start}):
            if now - self._noted_at >= 2.0:           # reads the tasks inside: not at every refresh
                self._noted_at, self._note = now, self.result.diagnose() or ""
            note = self._note
        return {"terminal": terminal, "state": state, "counts": counts, "steps": steps, "final": final,
                "bar": (bar_value, max(bar_max, 1)), "callback_state": callback_state, "started_at": start, "note": note}

    def _created_at(self, terminal: dict, steps: list[dict]) -> float | None:
        times = [t for t in [terminal.get("created_at")] + [s["record"].get("created_at") for s in steps] if t is not None]
        return min(times) if times else None

    def _elapsed_of(self, snap) -> str:
        start = snap["started_at"]
        if start is None:
            return ""
        end = snap["terminal"].get("finished_at") if snap["final"] else None
        took = max(0.0, (end if end is not None else time.time()) - start)
        return _d.seconds(took) if snap["final"] else f"{int(took)}s"

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
        header = _header(self.kind, self._label(), self.result.terminal_id if self.kind != "group" else self.result.id,
                         snap["state"], self._elapsed_of(snap), snap.get("note", ""))
        if self._header.value != header:
            self._header.value = header
        value, maximum = snap["bar"]
        if self._bar.max != maximum:
            self._bar.max = maximum
        if self._bar.value != value:
            self._bar.value = value
        style = "danger" if counts["failed"] or snap["state"] == states.FAILURE else ("success" if snap["final"] and snap["state"] == states.SUCCESS else "info")
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
                f"<tr><td {pad}>{s['index']}</td><td {pad}>{html.escape(s['name'])}</td><td {pad}>{_d.badge(s['state'])}</td>"
                f"<td {pad}>{html.escape(_d.seconds(_runtime(s['record'])))}</td>"
                f"<td {pad}><code>{html.escape(_step_value(self.app, s['record']))}</code></td></tr>"
                for s in snap["steps"])
            head = "".join(f"<th {pad}>{h}</th>" for h in ("#", "step", "state", "time", "result"))
            table = f'<table class="nbqueue-steps"><tr>{head}</tr>{rows}</table>'
            if self._steps.value != table:
                self._steps.value = table
        value_html = _value_html(self.app, snap["terminal"]) if snap["final"] or snap["state"] == states.FAILURE else ""
        if self._value.value != value_html:
            self._value.value = value_html

    def _label(self) -> str:
        label = getattr(self.result, "label", None)
        if label:
            return str(label)
        if self.kind == "chain":
            return f"chain of {len(self.result.results)} steps"
        if self.kind == "chord":
            return f"chord of {len(self.result.header)}"
        return f"group of {len(self.result)}"

    def text(self, snap) -> str:
        counts = snap["counts"]
        pct = int(100 * snap["bar"][0] / snap["bar"][1])
        line = f"[nbqueue] {self._label()} {snap['state']} {pct}%"
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
            line += _value_text(self.app, snap["terminal"])
        return line


def _waited(app, record: dict) -> bool:
    """Whether a task (or workflow) sent at ``record["created_at"]`` has waited long enough
    to check that some live worker can run it (``result.NOTICE_AFTER``)."""
    created = record.get("created_at")
    return created is not None and app.clock.time() - created >= NOTICE_AFTER


def _runtime(record: dict) -> float | None:
    if record.get("started_at") is not None and record.get("finished_at") is not None:
        return max(0.0, record["finished_at"] - record["started_at"])
    return None


def _step_value(app, record: dict) -> str:
    if record.get("state") == states.SUCCESS:
        try:
            return _d.short(_d.record_value(app, record), 80)
        except Exception:
            return "?"
    if record.get("error"):
        return _d.clip(f"{record.get('exc_type') or 'Error'}: {record['error']}", 80)
    return ""


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
    """``_repr_mimebundle_`` of results: the live view's display data."""
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
