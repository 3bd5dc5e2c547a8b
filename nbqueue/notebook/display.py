"""HTML and text renderings of results from their snapshots (``result.snapshot()``), shared
by the static display data and the live views.

:func:`html` is the static rendering of any result (what nbconvert and GitHub show): a
task's table, or a workflow's counts and the first rows of its tasks. The display data
IPython gets for a result (``nbqueue`` registers it with IPython's display formatters) is
``widgets.mimebundle``: the live view, with this static HTML and a text line.

A DataFrame or Series result shows as its first rows and its shape (:func:`value_html`); one
stored out of band (nbqueue.payloads) is not read for that: its reference carries the first rows.
"""
from __future__ import annotations

import html as _html
import math
from typing import Any

from .. import states
from ..result import PREVIEW_COLUMNS, PREVIEW_ROWS, AsyncResult, preview

STATE_COLORS = {
    states.PENDING: "#6c757d", states.RECEIVED: "#0d6efd", states.STARTED: "#0d6efd", states.RETRY: "#fd7e14",
    states.SUCCESS: "#198754", states.FAILURE: "#dc3545", states.REVOKED: "#6f42c1",
}


def short(value: Any, limit: int = 160) -> str:
    """A one-line repr, cut to ``limit`` characters (DataFrames by their shape)."""
    return preview(value, limit)


def clip(text: str, limit: int = 160) -> str:
    """Text on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 10:
        return f"{value:.2f}s"
    if value < 600:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    return f"{minutes}m{secs:02d}s"


def badge(state: str | None) -> str:
    state = state or states.PENDING
    color = STATE_COLORS.get(state, "#6c757d")
    return (f'<span class="nbqueue-state" style="background:{color};color:white;border-radius:3px;'
            f'padding:0 5px;font-size:90%">{_html.escape(state)}</span>')


def value_html(snap: dict) -> str:
    """A snapshot's value as HTML: a DataFrame or Series as a small table of its first rows under
    its shape; anything else as its one-line preview."""
    if snap.get("value_error") is not None:
        return f"<code>{_html.escape('(cannot decode the result: ' + str(snap['value_error']) + ')')}</code>"
    table = snap.get("table")
    if table is None:
        return f"<code>{_html.escape(snap.get('value') or '')}</code>"
    head, caption = table
    try:
        rendered = head.to_html(max_rows=PREVIEW_ROWS, max_cols=PREVIEW_COLUMNS, border=0,
                                classes="nbqueue-preview-table")
    except Exception:  # a view must not raise
        return f"<code>{_html.escape(caption)}</code>"
    return (f'<div class="nbqueue-preview"><div class="nbqueue-shape">{_html.escape(caption)}</div>'
            f'<div style="max-height:14em;overflow:auto">{rendered}</div></div>')


def task_html(snap: dict) -> str:
    """A small table of a task's snapshot: name, id, state, times, result or error, output."""
    state = snap["state"]
    rows = [
        ("task", _html.escape(snap["label"])),
        ("id", f"<code>{_html.escape(snap['id'])}</code>"),
        ("state", badge(state) + (f" after {snap['retries']} retries" if snap["retries"] else "")),
    ]
    if snap["final"] and snap["elapsed"] is not None:
        rows.append(("time", seconds(snap["elapsed"])))
    if snap["worker"]:
        rows.append(("worker", _html.escape(str(snap["worker"]))))
    if state == states.SUCCESS:
        rows.append(("result", value_html(snap)))
    if snap["error"]:
        rows.append(("error", _html.escape(snap["error"])))
    th, td = '<th style="text-align:left;padding-right:1em">', '<td style="text-align:left">'
    body = "".join(f"<tr>{th}{k}</th>{td}{v}</td></tr>" for k, v in rows)
    out = f'<table class="nbqueue-result">{body}</table>'
    if snap["output"]:
        out += f'<pre class="nbqueue-output" style="max-height:12em;overflow:auto">{_html.escape(snap["output"])}</pre>'
    if snap["traceback"] and state in (states.FAILURE, states.RETRY):
        out += f'<details><summary>traceback</summary><pre>{_html.escape(snap["traceback"])}</pre></details>'
    return out


def counts_line(counts: dict) -> str:
    parts = [f"{counts['succeeded']} succeeded"]
    if counts.get("failed"):
        parts.append(f"{counts['failed']} failed")
    if counts.get("revoked"):
        parts.append(f"{counts['revoked']} not run")
    if counts.get("running"):
        parts.append(f"{counts['running']} running")
    if counts.get("retrying"):
        parts.append(f"{counts['retrying']} retrying")
    if counts.get("pending"):
        parts.append(f"{counts['pending']} pending")
    return f"{counts['done']}/{counts['total']} done: " + ", ".join(parts)


#: columns of the static table of a workflow, and how wide a cell may be (characters)
TABLE_COLUMNS = ("name", "state", "args", "result", "error", "runtime")
CELL_WIDTH = 60


def frame_table(frame, max_rows: int = 20) -> str:
    """An HTML table of the first ``max_rows`` rows of a records frame (frames.py):
    values as short one-line reprs, errors clipped, runtimes in readable units."""
    cols = [c for c in TABLE_COLUMNS if c in frame.columns]
    shown = frame[cols].head(max_rows).copy()
    for col in cols:
        shown[col] = [_cell(col, v) for v in shown[col]]
    table = shown.to_html(index=False, escape=True, classes="nbqueue-table")
    more = f"<div>… {len(frame) - max_rows} more rows</div>" if len(frame) > max_rows else ""
    return table + more


def _cell(column: str, value: Any) -> str:
    if value is None or (column == "runtime" and math.isnan(value)):
        return ""
    if column == "runtime":
        return seconds(value)
    if column in ("args", "result"):
        return short(value, CELL_WIDTH)
    return clip(value, CELL_WIDTH)


def workflow_html(result, max_rows: int = 20) -> str:
    """Counts by state and the first ``max_rows`` rows of ``to_frame()`` (only those are read)."""
    snap = result.snapshot(diagnose=False)
    head = f"<b>{snap['kind']}</b> {badge(snap['state'])} {_html.escape(counts_line(snap['counts']))}"
    try:
        table = frame_table(result.to_frame(limit=max_rows), max_rows)
        total = len(result.leaves())
        if total > max_rows:
            table += f"<div>… {total - max_rows} more rows: .to_frame()</div>"
    except Exception as exc:  # a view must not raise
        table = _html.escape(f"(no table: {exc})")
    return f'<div class="nbqueue-workflow">{head}{table}</div>'


def html(result) -> str:
    """The static HTML of any result: a task's table, or a workflow's counts and first rows."""
    if isinstance(result, AsyncResult):
        return task_html(result.snapshot(diagnose=False))
    return workflow_html(result)
