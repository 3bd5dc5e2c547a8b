"""What the dashboard shows, as JSON-ready dicts built from the public App API only.

Values are decoded with a serializer that never unpickles (a pickled argument or result
is shown as such, not run) and never reads a payload (a value stored out of band is shown
by the summary and first rows its reference carries); previews are short text, DataFrames
an HTML table of their first rows. Every function here only reads, except the ``act_*``
ones, which call one public App method each and report what really happened.
"""
from __future__ import annotations

import html
import reprlib
import time
from typing import Any

from .. import serialization, states
from ..errors import NbqueueError, UnsupportedOperation
from ..payloads import PayloadRef

TAG = serialization.TAG
#: the safe decoder: JSON and Arrow, never pickle
SAFE = serialization.Serializer(pickle=False)
ROW_PREVIEW = 160
STATES = [states.PENDING, states.RECEIVED, states.STARTED, states.RETRY, states.SUCCESS, states.FAILURE, states.REVOKED]

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 8, 8, 3


class NotFound(LookupError):
    """An unknown task id or queue: the page and the API answer 404 with this message."""


# -- previews ---------------------------------------------------------------------------------

def _json_preview(value: Any) -> Any:
    """A JSON value (as stored) with its binary parts replaced by a short label, without decoding them."""
    if isinstance(value, dict):
        if value.get(TAG) == "blob":
            v = value.get("v") or {}
            size = len(v.get("b64") or "") * 3 // 4
            return _Label(f"<{v.get('codec', 'binary')} value, {size:,} bytes>")
        if TAG in value:
            try:
                return SAFE.decode(value, lazy=True)        # out of band: its PayloadRef, repr the summary
            except Exception:
                return _Label(f"<{value.get(TAG)}>")
        return {k: _json_preview(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_preview(v) for v in value]
    return value


class _Label(str):
    def __repr__(self) -> str:
        return str(self)


def call_preview(args_text: str | None, kwargs_text: str | None, limit: int = ROW_PREVIEW) -> str:
    """``(1, 'a', key=...)`` from a record's JSON arguments, at most ``limit`` characters."""
    try:
        args = _json_preview(serialization.loads(args_text)) if args_text else []
        kwargs = _json_preview(serialization.loads(kwargs_text)) if kwargs_text else {}
    except Exception:
        return (args_text or "")[:limit]
    parts = [_repr.repr(a) for a in args] + [f"{k}={_repr.repr(v)}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def value_view(text: str | None) -> dict | None:
    """A stored value for the task page: ``{"kind": "frame", "html", "shape"}`` for a
    DataFrame or Series (its first 20 rows), else ``{"kind": "text", "text"}`` (a repr, cut at
    20,000 characters); pickled values are named, not decoded. A value stored out of band is
    not read: a DataFrame or Series shows the first rows its reference carries, with
    ``"summary"`` (``DataFrame 1,000,000×5, 44 MB``); other values show that summary."""
    if text is None:
        return None
    try:
        value = SAFE.decode(serialization.loads(text), lazy=True)
    except serialization.SerializationError as exc:
        return {"kind": "text", "text": f"<not shown: {exc}>"}
    except Exception as exc:
        return {"kind": "text", "text": f"<cannot be decoded here: {type(exc).__name__}: {exc}>"}
    try:
        import pandas as pd
    except ImportError:     # pragma: no cover - pandas is a dependency
        pd = None
    if isinstance(value, PayloadRef):
        head = value.head() if pd is not None else None
        if isinstance(head, (pd.DataFrame, pd.Series) if pd is not None else ()):
            return {**_frame_view(pd, head, list(value.shape)), "summary": value.summary}
        return {"kind": "text", "text": value.summary, "summary": value.summary}
    if pd is not None and isinstance(value, (pd.DataFrame, pd.Series)):
        return _frame_view(pd, value, list(value.shape))
    out = repr(value)
    return {"kind": "text", "text": out if len(out) <= 20000 else out[:20000] + "…"}


def _frame_view(pd, value, shape: list) -> dict:
    frame = value.to_frame() if isinstance(value, pd.Series) else value
    with pd.option_context("display.max_colwidth", 60):
        table = frame.head(20).iloc[:, :30].to_html(classes="frame", border=0)
    return {"kind": "frame", "html": table, "shape": shape}


def args_view(args_text: str | None, kwargs_text: str | None) -> dict:
    """The task page's arguments: each positional and keyword argument as a ``value_view``."""
    try:
        args = serialization.loads(args_text) if args_text else []
        kwargs = serialization.loads(kwargs_text) if kwargs_text else {}
    except Exception:
        return {"args": [{"kind": "text", "text": args_text or ""}], "kwargs": {}}
    return {
        "args": [value_view(serialization.dumps(a)) for a in args],
        "kwargs": {k: value_view(serialization.dumps(v)) for k, v in kwargs.items()},
    }


# -- rows, pages and the overview -----------------------------------------------------------------

def task_row(record: dict) -> dict:
    started, finished = record.get("started_at"), record.get("finished_at")
    error = f"{record.get('exc_type') or 'Error'}: {record['error']}" if record.get("error") else None
    return {
        "id": record["id"], "name": record.get("name"), "state": record.get("state"), "queue": record.get("queue"),
        "created_at": record.get("created_at"), "started_at": started, "finished_at": finished,
        "runtime": finished - started if started is not None and finished is not None else None,
        "retries": record.get("retries") or 0, "worker": record.get("worker"),
        "call": call_preview(record.get("args"), record.get("kwargs")),
        "error": error[:ROW_PREVIEW] if error else None,
    }


def filters_from(params: Any) -> dict:
    """The task table's filters from query parameters: state, name, queue (comma-separated
    lists), since/until (Unix seconds), q (text). Raises ValueError naming a bad one."""
    out: dict[str, Any] = {}
    for key in ("state", "name", "queue"):
        value = (params.get(key) or "").strip()
        if value:
            values = [v.strip() for v in value.split(",") if v.strip()]
            out[key] = values[0] if len(values) == 1 else values
    for key in ("since", "until"):
        value = (params.get(key) or "").strip()
        if value:
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"{key} must be a Unix time in seconds, not {value!r}") from None
    text = (params.get("q") or "").strip()
    if text:
        out["text"] = text
    return out


def state_counts(app, filters: dict) -> dict[str, int]:
    """How many tasks match the filters, by state (reads every matching record)."""
    by_state: dict[str, int] = {}
    for (state, _), n in app.count_tasks(**filters).items():
        by_state[state] = by_state.get(state, 0) + n
    return by_state


def task_page(app, filters: dict, page: int = 1, per_page: int = 50, counts: Any = True) -> dict:
    """One page of the task table (``more``: a later page exists), with the total and the
    counts by state for these filters (``counts``: True, or a function of the filters giving
    them, such as a cache of ``state_counts``) unless ``counts`` is False (they read every
    matching record; the page itself reads only its rows): then ``total`` is None."""
    page, per_page = max(1, int(page)), min(500, max(1, int(per_page)))
    try:
        records = app.find_tasks(**filters, offset=(page - 1) * per_page, limit=per_page + 1)
    except NotImplementedError as exc:      # a result backend that cannot list its records (AMQP)
        return {"tasks": [], "more": False, "total": None, "by_state": {}, "page": page, "per_page": per_page,
                "filters": dict(filters), "unsupported": f"{exc}; a task's page is still found by its id"}
    by_state: dict[str, int] = {}
    if counts:
        by_state = counts(filters) if callable(counts) else state_counts(app, filters)
    return {"tasks": [task_row(r) for r in records[:per_page]], "more": len(records) > per_page,
            "total": sum(by_state.values()) if counts else None, "by_state": by_state,
            "page": page, "per_page": per_page, "filters": {k: v for k, v in filters.items()}}


def overview(app) -> dict:
    """Queues (ready, delayed, in flight, dead) and live workers."""
    status = app.status()
    now = time.time()
    workers = []
    for w in status["workers"]:
        workers.append({
            "id": w.get("worker_id"), "host": w.get("host"), "pid": w.get("pid"), "pool": w.get("pool") or "threads",
            "concurrency": w.get("concurrency"), "running": w.get("running"), "processed": w.get("processed"),
            "queues": w.get("queues") or [], "tasks": w.get("tasks") or w.get("registered") or [],
            "last_seen": w.get("last_seen"), "age": now - float(w.get("last_seen") or now),
        })
    queues = [{k: q.get(k, 0) for k in ("queue", "ready", "delayed", "in_flight", "dead")} for q in status["queues"]]
    return {"queues": queues, "workers": workers, "now": now, "default_queue": app.default_queue,
            "lists": app.backend.lists_tasks}


def queue_view(app, queue: str) -> dict:
    """A queue's counts and its first dead letters; NotFound for a queue nobody knows: not
    one the broker holds messages in, the App's default, a registered task's or a live
    worker's."""
    status = app.status()
    rows = {q["queue"]: q for q in status["queues"]}
    known = set(rows) | {app.default_queue} | {q for w in status["workers"] for q in w.get("queues") or []}
    known |= {t.options["queue"] for t in app.registry.values() if t.options.get("queue")}
    if queue not in known:
        raise NotFound(f"no queue named {queue!r} (known: {', '.join(sorted(known))})")
    row = rows.get(queue) or {"queue": queue, "ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}
    letters = []
    for letter in app.broker.dead_letters(queue, limit=50):
        try:
            message = serialization.loads(letter.get("body") or "")
            name = message.get("name")
            call = call_preview(serialization.dumps(message.get("args", [])),
                                serialization.dumps(message.get("kwargs", {})))
        except Exception:
            name, call = None, (letter.get("body") or "")[:ROW_PREVIEW]
        letters.append({"id": letter["id"], "reason": letter.get("reason"), "name": name, "call": call})
    return {
        "queue": {k: row.get(k, 0) for k in ("queue", "ready", "delayed", "in_flight", "dead")},
        "dead_letters": letters,
    }


def task_detail(app, task_id: str) -> dict:
    """Everything the task page shows; NotFound for an unknown id."""
    record = app.result(task_id).info()
    if not record:
        raise NotFound(f"no task with id {task_id!r}")
    detail = task_row(record)
    meta = {}
    if record.get("meta"):
        try:
            meta = serialization.loads(record["meta"])
        except Exception:
            meta = {"raw": record["meta"]}
    detail.update(
        {
            "arguments": args_view(record.get("args"), record.get("kwargs")),
            "result": value_view(record.get("result")) if record.get("state") == states.SUCCESS else None,
            "error": f"{record.get('exc_type') or 'Error'}: {record['error']}" if record.get("error") else None,
            "exc_type": record.get("exc_type"),
            "traceback": record.get("traceback"),
            "output": record.get("output"),
            "progress": meta.get("progress") if isinstance(meta, dict) else None,
            "meta": {k: v for k, v in meta.items() if k != "workflow"} if isinstance(meta, dict) else meta,
            "group_id": record.get("group_id"),
            "parent_id": record.get("parent_id"),
            "token": record.get("token"),
            "queue_wait": (record["started_at"] - record["created_at"])
            if record.get("started_at") and record.get("created_at")
            else None,
            "final": record.get("state") in states.READY_STATES,
        }
    )
    try:
        detail["workflow"] = app.workflow(task_id)
    except (KeyError, NbqueueError, NotImplementedError):
        detail["workflow"] = None
    return detail


# -- actions: one public App call each, reporting the real outcome ------------------------------------

def act_cancel(app, task_id: str) -> dict:
    """``app.revoke``: a task that has not finished will not run (or its result is discarded).
    A task that finished meanwhile says so, with the state it ended in."""
    record = app.result(task_id).info()
    if not record:
        raise NotFound(f"no task with id {task_id!r}")
    revoked = app.revoke(task_id, "cancelled from the dashboard", terminate=True)
    state = app.result(task_id).info().get("state")
    if revoked:
        return {"ok": True, "state": state, "message": f"task {task_id} revoked"}
    return {
        "ok": False,
        "state": state,
        "message": f"task {task_id} had already finished ({state}); nothing was cancelled",
    }


def act_cancel_workflow(app, task_id: str) -> dict:
    """``app.revoke`` for every task of the workflow ``task_id`` belongs to that has not
    finished (its groups' records too); says how many were cancelled and how many had finished."""
    if not app.result(task_id).info():
        raise NotFound(f"no task with id {task_id!r}")
    tree = app.workflow(task_id, members=None)
    if tree is None:
        return act_cancel(app, task_id)
    nodes, ids = [tree], []
    while nodes:
        node = nodes.pop()
        if node["kind"] == "chain":
            nodes += node["steps"]
        else:
            ids.append(node["id"])
            nodes += node.get("members") or []
    revoked = sum(1 for i in ids if app.revoke(i, "workflow cancelled from the dashboard", terminate=True))
    state = app.result(task_id).info().get("state")
    return {
        "ok": revoked > 0,
        "state": state,
        "revoked": revoked,
        "message": f"{revoked} of the workflow's {len(ids)} task(s) revoked; {len(ids) - revoked} had already finished",
    }


def act_retry(app, task_id: str) -> dict:
    if not app.result(task_id).info():
        raise NotFound(f"no task with id {task_id!r}")
    try:
        new = app.retry_task(task_id)
    except ValueError as exc:
        return {"ok": False, "message": str(exc)}
    return {"ok": True, "id": new.id, "message": f"sent again as task {new.id}"}


def act_redrive(app, queue: str) -> dict:
    queue_view(app, queue)          # NotFound for an unknown queue
    try:
        out = app.redrive(queue)
    except UnsupportedOperation as exc:
        return {"ok": False, "message": str(exc)}
    kept = out["kept"]
    message = f"{len(out['sent'])} dead letter(s) sent again"
    if kept:
        message += f"; {len(kept)} kept (unreadable: {kept[0]['reason']})"
    return {"ok": True, "sent": [r.id for r in out["sent"]], "kept": kept, "message": message}


def act_purge(app, queue: str) -> dict:
    queue_view(app, queue)
    n = app.purge(queue)
    return {"ok": True, "purged": n, "message": f"purged {n} message(s) from {queue}"}


def escape(text: Any) -> str:
    return html.escape(str(text))
