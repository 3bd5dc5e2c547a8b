"""HTML and text renderings of results, shared by the static reprs and the live views.

``AsyncResult._repr_html_`` and the workflow results' ``_repr_html_`` call
:func:`async_result_html` and :func:`workflow_html` (a snapshot: what nbconvert and
GitHub show); their ``_repr_mimebundle_`` calls :func:`mimebundle`, which adds the live
view of widgets.py when a widget frontend is there.

A DataFrame or Series result shows as its first rows and its shape (:func:`value_html`);
one stored out of band (nbqueue.payloads) is not read for that: its reference carries
the first rows and the summary.
"""
from __future__ import annotations

import html
import math
import time
from typing import Any

from .. import states

STATE_COLORS = {
    states.PENDING: "#6c757d", states.RECEIVED: "#0d6efd", states.STARTED: "#0d6efd", states.RETRY: "#fd7e14",
    states.SUCCESS: "#198754", states.FAILURE: "#dc3545", states.REVOKED: "#6f42c1",
}


def short(value: Any, limit: int = 160) -> str:
    """A one-line repr, cut to ``limit`` characters (DataFrames by their shape)."""
    kind = type(value)
    if kind.__module__.startswith("pandas") and hasattr(value, "shape"):
        text = f"<{kind.__name__} {' x '.join(map(str, value.shape))}>"
    else:
        try:
            text = repr(value)
        except Exception as exc:  # a repr that fails must not break a view
            text = f"<{kind.__name__}: repr failed: {exc}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def elapsed(record: dict, now: float | None = None) -> float | None:
    """Seconds from creation to finish (or to now while not finished)."""
    start = record.get("created_at")
    if start is None:
        return None
    end = record.get("finished_at")
    if end is None:
        end = time.time() if now is None else now
    return max(0.0, end - start)


def badge(state: str | None) -> str:
    state = state or states.PENDING
    color = STATE_COLORS.get(state, "#6c757d")
    return (f'<span class="nbqueue-state" style="background:{color};color:white;border-radius:3px;'
            f'padding:0 5px;font-size:90%">{html.escape(state)}</span>')


def record_value(app, record: dict) -> Any:
    """A finished task's value for display; values stored out of band stay unread (a PayloadRef)."""
    from .. import serialization

    text = record.get("result")
    return None if text is None else app.serializer.decode(serialization.loads(text), lazy=True)


#: rows and columns of a DataFrame result a view shows
PREVIEW_ROWS, PREVIEW_COLUMNS = 5, 20


def _preview(value: Any) -> tuple[Any, str]:
    """(first rows as a DataFrame, caption) for a DataFrame or Series result, else (None, "")."""
    from ..payloads import PayloadRef

    if isinstance(value, PayloadRef):
        head = value.head() if value.type in ("DataFrame", "Series") else None
        return (None, "") if head is None else (head.to_frame() if head.ndim == 1 else head, value.summary)
    kind = type(value)
    if not kind.__module__.startswith("pandas") or kind.__name__ not in ("DataFrame", "Series"):
        return None, ""
    if value.ndim == 1:
        name = f" {value.name!r}" if value.name is not None else ""
        return value.iloc[:PREVIEW_ROWS].to_frame(), f"Series {len(value):,}{name}"
    rows, cols = value.shape
    return value.iloc[:PREVIEW_ROWS, :PREVIEW_COLUMNS], f"DataFrame {rows:,}×{cols:,}"


def value_html(value: Any, limit: int = 400) -> str:
    """A result as HTML: a DataFrame or Series as a small table of its first rows under its
    shape; anything else as a short repr (``limit`` characters)."""
    head, caption = _preview(value)
    if head is None:
        return f"<code>{html.escape(short(value, limit))}</code>"
    try:
        table = head.to_html(max_rows=PREVIEW_ROWS, max_cols=PREVIEW_COLUMNS, border=0, classes="nbqueue-preview-table")
    except Exception:  # a view must not raise
        return f"<code>{html.escape(caption)}</code>"
    return (f'<div class="nbqueue-preview"><div class="nbqueue-shape">{html.escape(caption)}</div>'
            f'<div style="max-height:14em;overflow:auto">{table}</div></div>')


def label_of(result) -> str:
    label = getattr(result, "label", None)
    if label:
        return str(label)
    return str(getattr(result, "_name", None) or result.info().get("name") or "task")


def async_result_html(result) -> str:
    """A small table: name, id, state, times, result or error, output."""
    record = result.info()
    state = record.get("state") or states.PENDING
    rows = [
        ("task", html.escape(label_of(result))),
        ("id", f"<code>{html.escape(result.id)}</code>"),
        ("state", badge(state) + (f" after {record.get('retries')} retries" if record.get("retries") else "")),
    ]
    took = elapsed(record) if state in states.READY_STATES else None
    if took is not None:
        rows.append(("time", seconds(took)))
    if record.get("worker"):
        rows.append(("worker", html.escape(str(record["worker"]))))
    if state == states.SUCCESS:
        try:
            rows.append(("result", value_html(record_value(result.app, record), 400)))
        except Exception as exc:
            rows.append(("result", html.escape(f"(cannot decode: {exc})")))
    if record.get("error"):
        rows.append(("error", html.escape(f"{record.get('exc_type') or 'Error'}: {record['error']}")))
    body = "".join(f'<tr><th style="text-align:left;padding-right:1em">{k}</th><td style="text-align:left">{v}</td></tr>' for k, v in rows)
    out = f'<table class="nbqueue-result">{body}</table>'
    if record.get("output"):
        out += f'<pre class="nbqueue-output" style="max-height:12em;overflow:auto">{html.escape(record["output"])}</pre>'
    if record.get("traceback") and state in (states.FAILURE, states.RETRY):
        out += f'<details><summary>traceback</summary><pre>{html.escape(record["traceback"])}</pre></details>'
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


def kind_of(result) -> str:
    return type(result).__name__.replace("Result", "").lower()


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
    from ..frames import records_frame

    counts = result.progress()
    state = result.state
    if state == states.PENDING and counts["done"] + counts["running"] + counts["retrying"] > 0:
        state = states.STARTED                # a workflow's record is written when it finishes
    head = f"<b>{kind_of(result)}</b> {badge(state)} {html.escape(counts_line(counts))}"
    try:
        leaves = result.leaves()
        first = [r for r in result.app.backend.get_many([x.id for x in leaves[:max_rows]]) if r is not None]
        table = frame_table(records_frame(result.app, first), max_rows)
        if len(leaves) > max_rows:
            table += f"<div>… {len(leaves) - max_rows} more rows: .to_frame()</div>"
    except Exception as exc:  # a view must not raise
        table = html.escape(f"(no table: {exc})")
    return f'<div class="nbqueue-workflow">{head}{table}</div>'


def mimebundle(result, include=None, exclude=None) -> dict:
    """The display data of a result: a live widget view where widgets render, text otherwise."""
    from . import widgets

    return widgets.mimebundle(result, include=include, exclude=exclude)
