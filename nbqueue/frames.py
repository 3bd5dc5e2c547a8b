"""Task records as pandas DataFrames.

Column types do not depend on the rows (nor on the pandas version's string inference):
``id``, ``name``, ``state``, ``args``, ``kwargs``, ``result``, ``error``, ``queue`` and
``worker`` are ``object`` columns holding the values as they are (a result of 42 is the
int 42 whatever the other rows hold) with ``None`` where there is none; ``retries`` is
int64; ``created``, ``started`` and ``finished`` are datetime64[ns, UTC] (NaT when not
yet); ``runtime`` is float64 seconds (NaN when not finished). Values stored out of band
(payloads.py) are not read: they show as their ``PayloadRef`` (``DataFrame 1,000,000×5, 44 MB``).
"""
from __future__ import annotations

from . import serialization

COLUMNS = ["id", "name", "state", "args", "kwargs", "result", "error", "retries", "queue", "created", "started",
           "finished", "runtime", "worker"]
OBJECT_COLUMNS = ("id", "name", "state", "args", "kwargs", "result", "error", "queue", "worker")


def _decode(app, text):
    if text is None:
        return None
    try:
        return app.serializer.decode(serialization.loads(text), lazy=True)
    except Exception:  # a record written by a newer or pickle-enabled App: show the raw text
        return text


def records_frame(app, records: list[dict]):
    """One row per record (None entries skipped), in the columns and types the module docstring gives."""
    import pandas as pd

    rows = []
    for rec in records:
        if rec is None:
            continue
        started, finished = rec.get("started_at"), rec.get("finished_at")
        rows.append({
            "id": rec["id"],
            "name": rec.get("name"),
            "state": rec.get("state"),
            "args": _decode(app, rec.get("args")),
            "kwargs": _decode(app, rec.get("kwargs")),
            "result": _decode(app, rec.get("result")),
            "error": f"{rec.get('exc_type') or 'Error'}: {rec['error']}" if rec.get("error") else None,
            "retries": rec.get("retries") or 0,
            "queue": rec.get("queue"),
            "created": rec.get("created_at"),
            "started": started,
            "finished": finished,
            "runtime": (finished - started) if started is not None and finished is not None else None,
            "worker": rec.get("worker"),
        })
    import numpy as np

    columns = {}
    for col in COLUMNS:
        values = [row[col] for row in rows]
        if col in OBJECT_COLUMNS:
            column = np.empty(len(values), dtype=object)    # element by element: a list or an array stays one value
            for i, value in enumerate(values):
                column[i] = value
            columns[col] = pd.Series(column, dtype=object)
        elif col == "retries":
            columns[col] = pd.Series(values, dtype="int64")
        elif col == "runtime":
            columns[col] = pd.Series([np.nan if v is None else v for v in values], dtype="float64")  # seconds
        else:
            seconds = pd.Series([np.nan if v is None else v for v in values], dtype="float64")
            columns[col] = pd.to_datetime(seconds, unit="s", utc=True).astype("datetime64[ns, UTC]")
    return pd.DataFrame(columns, columns=COLUMNS)
