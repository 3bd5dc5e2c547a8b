"""Task records as pandas DataFrames."""
from __future__ import annotations

from . import serialization

COLUMNS = ["id", "name", "state", "args", "kwargs", "result", "error", "retries", "queue", "created", "started", "finished", "runtime", "worker"]


def _decode(app, text):
    if text is None:
        return None
    try:
        return app.serializer.decode(serialization.loads(text))
    except Exception:  # a record written by a newer or pickle-enabled App: show the raw text
        return text


def records_frame(app, records: list[dict], extra: dict[str, list] | None = None):
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
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("created", "started", "finished"):
        frame[col] = pd.to_datetime(frame[col], unit="s", utc=True)
    frame["runtime"] = frame["runtime"].astype("float64")  # seconds
    frame["retries"] = frame["retries"].astype("int64")
    return frame
