"""Workflows as data: group, chain and chord, and the one step that advances them.

At send time a workflow becomes a tree of *nodes* with every task id assigned:

- ``{"t": "task", "msg": envelope}``
- ``{"t": "chain", "steps": [node, ...]}``
- ``{"t": "group", "id": group_id, "members": [node, ...], "concurrency": n}``

A chord is a chain of a group and its callback. Starting a node publishes its first
tasks and attaches *continuations* to the messages that finish it:

- ``{"k": "chain", "rest": [node, ...], "then": [cont, ...]}``: start the next step
  with this result;
- ``{"k": "member", "group": group_id, "index": i}``: count a group member done; the
  member that completes the group stores the group's record (the list of member
  results, in order) and applies the continuations kept with the group.

Because every id is fixed up front, each of these steps may be repeated (a message
redelivered after a crash) without effect: a repeat publish is dropped by the broker
or, if the task already finished, by the worker's fencing. So a chord callback runs
exactly once, even when members finish together, run twice, or a worker dies between
"last member done" and "callback published".
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Iterator, Sequence

from . import serialization, states
from .signature import Signature, new_id

log = logging.getLogger(__name__)

_current: contextvars.ContextVar = contextvars.ContextVar("nbqueue_current_task", default=None)


# -- user-facing constructors ----------------------------------------------------------------

class group:
    """Tasks (or chains) that run in parallel: ``group(add.s(1, 1), add.s(2, 2))``."""

    def __init__(self, *items: Any):
        if len(items) == 1 and isinstance(items[0], (list, tuple)):
            items = tuple(items[0])
        self.items = [_check_item(i) for i in items]
        self.id: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __or__(self, other: Any) -> "chain":
        return chain(self, other)

    def __repr__(self) -> str:
        return f"group({', '.join(map(_short, self.items))})"


class chain:
    """Steps that run one after another; each result is appended to the next step's args."""

    def __init__(self, *items: Any):
        if len(items) == 1 and isinstance(items[0], (list, tuple)):
            items = tuple(items[0])
        steps: list = []
        for item in items:
            item = _check_item(item)
            steps.extend(item.steps if isinstance(item, chain) else [item])
        if not steps:
            raise ValueError("a chain needs at least one step")
        self.steps = steps

    def __or__(self, other: Any) -> "chain":
        return chain(self, other)

    def __repr__(self) -> str:
        return " | ".join(map(_short, self.steps))


class chord:
    """A group whose member results, in order, go to a callback: ``chord(group(...), total.s())``."""

    def __init__(self, header: Any, callback: Any):
        self.header = header if isinstance(header, group) else group(*header)
        self.callback = _check_item(callback)
        if isinstance(self.callback, group):
            raise TypeError("a chord's callback must be a signature or a chain, not a group")

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {_short(self.callback)})"


def _check_item(item: Any) -> Any:
    if isinstance(item, (Signature, group, chain, chord)):
        return item
    raise TypeError(f"workflows are built from signatures, groups, chains and chords, not {type(item).__name__}")


def _short(item: Any) -> str:
    return f"{item.name}(...)" if isinstance(item, Signature) else repr(item)


# -- building nodes at send time -------------------------------------------------------------

class _Build:
    """Collects the PENDING records of a workflow while turning it into nodes."""

    def __init__(self, app, concurrency: int = 0):
        self.app = app
        self.concurrency = concurrency
        self.records: list[dict] = []

    def node(self, item: Any, *, group_id: str | None = None, parent_id: str | None = None) -> dict:
        if isinstance(item, Signature):
            message, record, _ = self.app.prepare(item.replace(), group_id=group_id, parent_id=parent_id)
            self.records.append(record)
            return {"t": "task", "msg": message}
        if isinstance(item, chain):
            steps = []
            for i, step in enumerate(item.steps):
                last = i == len(item.steps) - 1
                steps.append(self.node(step, group_id=group_id if last else None, parent_id=parent_id))
            return {"t": "chain", "steps": steps}
        if isinstance(item, chord):
            return self.node(chain(item.header, item.callback), group_id=group_id, parent_id=parent_id)
        if isinstance(item, group):
            gid = item.id or new_id()
            members = [self.node(m, group_id=gid, parent_id=gid) for m in item.items]
            self.records.append({"id": gid, "name": "nbqueue.group", "state": states.PENDING, "group_id": group_id,
                                 "parent_id": parent_id, "created_at": self.app.clock.time(), "meta": serialization.dumps({"size": len(members)})})
            node = {"t": "group", "id": gid, "members": members, "concurrency": int(self.concurrency)}
            self.concurrency = 0          # the limit applies to the outermost group only
            return node
        raise TypeError(type(item).__name__)


def terminal_id(node: dict) -> str:
    """The id whose record holds the node's result."""
    if node["t"] == "task":
        return node["msg"]["id"]
    if node["t"] == "chain":
        return terminal_id(node["steps"][-1])
    return node["id"]


def task_ids(node: dict) -> list[str]:
    """Every task id inside a node (group ids included)."""
    if node["t"] == "task":
        return [node["msg"]["id"]]
    if node["t"] == "chain":
        return [i for step in node["steps"] for i in task_ids(step)]
    return [node["id"]] + [i for m in node["members"] for i in task_ids(m)]


# -- starting nodes -----------------------------------------------------------------------------

class _Publisher:
    """Batches the publishes one advance makes into one broker call."""

    def __init__(self, app):
        self.app = app
        self.outs: list = []

    def task(self, message: dict) -> None:
        self.outs.append(self.app.outgoing(message))

    def flush(self) -> None:
        if self.outs:
            self.app.broker.publish_many(self.outs)
            self.outs = []


def _with_input(message: dict, input_json: Any, has_input: bool) -> dict:
    message = dict(message)
    if has_input and not message.get("immutable"):
        message["args"] = list(message["args"]) + [input_json]
    return message


def start(app, node: dict, conts: list, pub: _Publisher, *, input_json: Any = None, has_input: bool = False) -> None:
    """Publish what starts ``node``; ``conts`` run with its result when it finishes."""
    kind = node["t"]
    if kind == "task":
        message = _with_input(node["msg"], input_json, has_input)
        message["workflow"] = {"then": conts} if conts else None
        pub.task(message)
    elif kind == "chain":
        steps = node["steps"]
        inner = [{"k": "chain", "rest": steps[1:], "then": conts}] if len(steps) > 1 else conts
        start(app, steps[0], inner, pub, input_json=input_json, has_input=has_input)
    else:
        _start_group(app, node, conts, pub, input_json, has_input)


def _start_group(app, node: dict, conts: list, pub: _Publisher, input_json: Any, has_input: bool) -> None:
    gid, members = node["id"], node["members"]
    app.backend.init_group(gid, [terminal_id(m) for m in members], meta={"then": conts})
    if not members:
        _group_complete(app, gid, pub)
        return
    limit = node.get("concurrency") or len(members)
    for i, member in enumerate(members):
        spec = {"node": member, "index": i, "input": input_json, "has_input": has_input}
        if i < limit:
            _start_member(app, gid, spec, pub)
        else:
            app.backend.kv_set(f"nbq:held:{gid}:{i}", serialization.dumps(spec))
    if limit < len(members):
        app.backend.kv_set(f"nbq:limit:{gid}", str(limit))


def _start_member(app, gid: str, spec: dict, pub: _Publisher) -> None:
    cont = [{"k": "member", "group": gid, "index": spec["index"], "member": terminal_id(spec["node"])}]
    start(app, spec["node"], cont, pub, input_json=spec["input"], has_input=spec["has_input"])


# -- advancing when a task finishes ---------------------------------------------------------------

def on_success(app, message: dict, result_json_text: str) -> None:
    """After a task's SUCCESS is stored: callbacks, the next chain step, group fan-in."""
    pub = _Publisher(app)
    value = serialization.loads(result_json_text)
    callbacks = [_with_input(cb, value, True) for cb in message.get("on_success") or []]
    _publish_callbacks(app, callbacks, message["id"], pub)
    _apply(app, (message.get("workflow") or {}).get("then") or [], value, pub)
    pub.flush()


def on_failure(app, message: dict, exc_type: str, error: str) -> None:
    """After a task's final FAILURE is stored: error callbacks and failure propagation."""
    pub = _Publisher(app)
    _fire_error_callbacks(app, message, error, pub)
    _fail(app, (message.get("workflow") or {}).get("then") or [], message["id"], exc_type, error, pub)
    pub.flush()


def after_final(app, message: dict, record: dict) -> None:
    """A redelivered message whose task is already final: repeat the (idempotent) advance."""
    state = record.get("state")
    if state == states.SUCCESS and record.get("result") is not None:
        on_success(app, message, record["result"])
    elif state in (states.FAILURE, states.REVOKED):
        on_failure(app, message, record.get("exc_type") or "Error", record.get("error") or "")


def _publish_callbacks(app, messages: list[dict], parent_id: str, pub: _Publisher) -> None:
    if not messages:
        return
    now = app.clock.time()
    app.backend.create([{"id": m["id"], "name": m["name"], "state": states.PENDING, "args": serialization.dumps(m["args"]),
                         "kwargs": serialization.dumps(m["kwargs"]), "queue": m.get("queue"), "parent_id": parent_id, "created_at": now}
                        for m in messages])
    for m in messages:
        pub.task(m)


def _fire_error_callbacks(app, message: dict, error: str, pub: _Publisher) -> None:
    callbacks = []
    for cb in message.get("on_error") or []:
        cb = dict(cb)
        cb["args"] = [error] + list(cb["args"])
        callbacks.append(cb)
    _publish_callbacks(app, callbacks, message["id"], pub)


def _apply(app, conts: list, value: Any, pub: _Publisher) -> None:
    for cont in conts:
        if cont["k"] == "chain":
            rest = cont["rest"]
            inner = [{"k": "chain", "rest": rest[1:], "then": cont["then"]}] if len(rest) > 1 else cont["then"]
            start(app, rest[0], inner, pub, input_json=value, has_input=True)
        elif cont["k"] == "member":
            _member_finished(app, cont, pub)


def _member_finished(app, cont: dict, pub: _Publisher) -> None:
    gid = cont["group"]
    done, total = app.backend.member_done(gid, cont["member"])
    _release_next(app, gid, done, total, pub)
    if done >= total:
        _group_complete(app, gid, pub)


def _release_next(app, gid: str, done: int, total: int, pub: _Publisher) -> None:
    limit = app.backend.kv_get(f"nbq:limit:{gid}")
    if limit is None:
        return
    index = int(limit) + done - 1
    if index >= total:
        return
    text = app.backend.kv_get(f"nbq:held:{gid}:{index}")
    if text is not None:
        _start_member(app, gid, serialization.loads(text), pub)


def _group_complete(app, gid: str, pub: _Publisher) -> None:
    info = app.backend.group_info(gid)
    records = app.backend.get_many(info["members"])
    failed = next((r for r in records if r is None or r["state"] != states.SUCCESS), None)
    conts = info["meta"].get("then") or []
    if failed is not None:
        # a member failed for good: the group failed when it did (see _fail); nothing to run
        return
    values = [serialization.loads(r["result"]) for r in records]
    app.backend.store_result(gid, states.SUCCESS, result=serialization.dumps(values))
    _apply(app, conts, values, pub)


def _fail(app, conts: list, origin_id: str, exc_type: str, error: str, pub: _Publisher) -> None:
    for cont in conts:
        if cont["k"] == "chain":
            for node in cont["rest"]:
                _mark_not_run(app, node, origin_id, exc_type, error, pub)
            _fail(app, cont["then"], origin_id, exc_type, error, pub)
        elif cont["k"] == "member":
            gid = cont["group"]
            info = app.backend.group_info(gid)
            app.backend.store_result(gid, states.FAILURE, exc_type=exc_type, error=error, traceback=f"not complete: member {origin_id} failed")
            _fail(app, info["meta"].get("then") or [], origin_id, exc_type, error, pub)
            # the failed member still frees a slot in a concurrency-limited group
            done, total = app.backend.member_done(gid, cont["member"])
            _release_next(app, gid, done, total, pub)


def _mark_not_run(app, node: dict, origin_id: str, exc_type: str, error: str, pub: _Publisher) -> None:
    """Record every task of a node that will never run; fire their error callbacks."""
    if node["t"] == "task":
        message = node["msg"]
        app.backend.store_result(message["id"], states.REVOKED, exc_type=exc_type, error=error, traceback=f"not run: {origin_id} failed")
        _fire_error_callbacks(app, message, error, pub)
    elif node["t"] == "chain":
        for step in node["steps"]:
            _mark_not_run(app, step, origin_id, exc_type, error, pub)
    else:
        app.backend.store_result(node["id"], states.REVOKED, exc_type=exc_type, error=error, traceback=f"not run: {origin_id} failed")
        for member in node["members"]:
            _mark_not_run(app, member, origin_id, exc_type, error, pub)


@contextlib.contextmanager
def task_context(app, message: dict, token: int, worker) -> Iterator[None]:
    reset = _current.set({"id": message["id"], "name": message["name"], "app": app, "token": token, "worker": worker})
    try:
        yield
    finally:
        _current.reset(reset)


def current_task() -> dict | None:
    """Inside a task: its id, name and App; None elsewhere."""
    return _current.get()


# -- sending ----------------------------------------------------------------------------------------

def send(app, item: Any, *, concurrency: int = 0):
    """Send a group, chain or chord (or a signature); returns the matching result object."""
    if isinstance(item, Signature):
        return app.send_task(item)
    if not isinstance(item, (group, chain, chord)):
        raise TypeError(f"cannot send a {type(item).__name__}: expected a Signature, group, chain or chord")
    build = _Build(app, concurrency=concurrency)
    node = build.node(item)
    app.backend.create(build.records)
    pub = _Publisher(app)
    start(app, node, [], pub)
    pub.flush()
    return result_for(app, item, node)


def send_group(app, g: Any, concurrency: int = 0):
    if not isinstance(g, group):
        g = group(*g)
    return send(app, g, concurrency=concurrency)


def send_chord(app, c: Any, concurrency: int = 0):
    if not isinstance(c, chord):
        raise TypeError(f"send_chord takes a chord, not {type(c).__name__}")
    return send(app, c, concurrency=concurrency)


def result_for(app, item: Any, node: dict):
    from .result import AsyncResult, ChainResult, ChordResult, GroupResult

    if isinstance(item, Signature):
        return AsyncResult(node["msg"]["id"], app, name=item.name)
    if isinstance(item, group):
        return GroupResult(node["id"], [result_for(app, m, n) for m, n in zip(item.items, node["members"])], app)
    if isinstance(item, chord):
        header_node, callback_node = node["steps"][0], node["steps"][1:]
        header = result_for(app, item.header, header_node)
        callback = result_for(app, item.callback, callback_node[0] if len(callback_node) == 1 else {"t": "chain", "steps": callback_node})
        return ChordResult(header, callback, app)
    steps, i = [], 0
    for step in item.steps:
        steps.append(result_for(app, step, node["steps"][i]))
        i += 1
    return ChainResult(steps, app)
