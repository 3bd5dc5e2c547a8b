"""Workflows as data: group, chain and chord, and the one step that advances them.

At send time a workflow becomes a tree of *nodes* with every task id assigned:

- ``{"t": "task", "msg": envelope}``
- ``{"t": "chain", "steps": [node, ...]}``
- ``{"t": "group", "id": group_id, "members": [node, ...], "concurrency": n}``

A chord is a chain of a group and its callback. Starting a node publishes its first
tasks and attaches *continuations* to the messages that finish it:

- ``{"k": "chain", "key": k, "pos": i, "n": n, "then": [cont, ...]}``: start step
  ``i`` (stored under ``k:i`` in the backend's key-value store at send time, so a
  message carries one step, not the rest of the chain) with this result;
- ``{"k": "member", "group": group_id, "index": i, "member": id, "limited": bool}``: count a
  group member done (and, in a group with a concurrency limit, release the next); the
  member that completes the group stores the group's record (the list of member
  results, in order) and applies the continuations kept with the group.

Because every id is fixed up front, each of these steps may be repeated (a message
redelivered after a crash) without effect: ``member_done`` counts a member once, so
of members finishing together exactly one completes the group; a repeat advance
publishes only tasks whose records are still PENDING (a copy still waiting is dropped
by a broker that dedupes by id, and a task already final is not run again by the
worker's fencing); and a step's own "done" record (the group's SUCCESS or FAILURE, a
concurrency-held member's spec) is written only *after* what follows it is published,
so a worker that dies in between leaves the step to be redone by the redelivery, and
one that did not leaves nothing to redo. On AMQP, which cannot drop a repeat publish,
a task's advance is also marked once published. So a chord callback runs exactly
once, even when members finish together, run twice, or a worker dies between "last
member done" and "callback published".
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Iterator

from . import payloads, serialization, states
from .signature import Signature, new_id

log = logging.getLogger(__name__)

_current: contextvars.ContextVar = contextvars.ContextVar("nbqueue_current_task", default=None)


# -- user-facing constructors ----------------------------------------------------------------

def _spread(items: tuple) -> tuple:
    """``f(a, b)``, ``f([a, b])`` and ``f(x for x in ...)`` all mean the items a, b."""
    if len(items) == 1 and not isinstance(items[0], (Signature, group, chain, chord, str, bytes, dict)) and hasattr(items[0], "__iter__"):
        return tuple(items[0])
    return items


class group:
    """Tasks (or chains) that run in parallel: ``group(add.s(1, 1), add.s(2, 2))`` or ``group(add.s(i, i) for i in range(9))``."""

    def __init__(self, *items: Any):
        items = _spread(items)
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
        items = _spread(items)
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
            message, record, _ = self.app.prepare(item, group_id=group_id, parent_id=parent_id)
            self.records.append(record)
            return {"t": "task", "msg": message}
        if isinstance(item, chain):
            steps = []
            for i, step in enumerate(item.steps):
                last = i == len(item.steps) - 1
                # a later step's parent is the step before it (as Celery records a chain)
                parent = parent_id if i == 0 else terminal_id(steps[-1])
                steps.append(self.node(step, group_id=group_id if last else None, parent_id=parent))
            return {"t": "chain", "steps": steps}
        if isinstance(item, chord):
            return self.node(chain(item.header, item.callback), group_id=group_id, parent_id=parent_id)
        if isinstance(item, group):
            gid = item.id or new_id()
            concurrency, self.concurrency = int(self.concurrency), 0    # the limit applies to the outermost group only
            members = [self.node(m, group_id=gid, parent_id=gid) for m in item.items]
            self.records.append({"id": gid, "name": "nbqueue.group", "state": states.PENDING, "group_id": group_id,
                                 "parent_id": parent_id, "created_at": self.app.clock.time(), "meta": serialization.dumps({"size": len(members)})})
            return {"t": "group", "id": gid, "members": members, "concurrency": concurrency}
        raise TypeError(type(item).__name__)


def graph(node: dict, started: bool = True) -> Any:
    """A node's shape by ids, as the workflow's first record keeps it (``meta["workflow"]``):
    a task id, ``{"chain": [steps]}`` or ``{"group": id, "members": [...]}``. The members of
    a group started at send time (``started``) are left out when each is a single task: the
    group's bookkeeping lists them in order (a later chain step's group has none yet)."""
    if node["t"] == "task":
        return node["msg"]["id"]
    if node["t"] == "chain":
        return {"chain": [graph(step, started and i == 0) for i, step in enumerate(node["steps"])]}
    members = node["members"]
    if started and all(m["t"] == "task" for m in members):
        return {"group": node["id"]}
    held = bool(node.get("concurrency")) and node["concurrency"] < len(members)
    return {"group": node["id"], "members": [graph(m, started and not held) for m in members]}


def root_id(node: dict) -> str:
    """The id of a node's first record: the one without a parent, which keeps its graph."""
    if node["t"] == "task":
        return node["msg"]["id"]
    if node["t"] == "chain":
        return root_id(node["steps"][0])
    return node["id"]


def _keep_graph(records: list[dict], node: dict) -> None:
    """Write the workflow's graph into its first record's meta (see ``graph``)."""
    root = root_id(node)
    for record in records:
        if record["id"] == root:
            meta = serialization.loads(record["meta"]) if record.get("meta") else {}
            meta["workflow"] = graph(node)
            record["meta"] = serialization.dumps(meta)
            return


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
    """Batches the publishes one advance makes into one broker call.

    ``repeat``: this advance repeats one an earlier attempt may have made (a redelivered
    message whose task is already final). ``careful``: publish only the tasks whose
    records are still PENDING, since a task that already started, finished or was
    marked not run must not be queued again (a broker cannot drop a copy of a message
    it has already acknowledged, and two copies of a waiting message could run at once
    on a broker that cannot drop a repeat publish, such as AMQP). Repeats and failure
    propagation (two members of a group may both fail) are careful. ``after`` actions
    run once the publish succeeded; ``published`` counts the messages sent. ``send``:
    publishes the messages (a worker's, which runs some of them next: ``Engine.run_next``);
    ``app.engine.publish`` when None.
    """

    def __init__(self, app, *, repeat: bool = False, careful: bool | None = None, send=None):
        self.app = app
        self.send = send or app.engine.publish
        self.repeat = repeat
        self.careful = repeat if careful is None else careful
        self.outs: list = []
        self.after: list = []
        self.published = 0

    def task(self, message: dict) -> None:
        self.outs.append(self.app.outgoing(message))

    def flush(self) -> None:
        outs, self.outs = self.outs, []
        if outs and self.careful:
            found = self.app.backend.states_of([o.id for o in outs])
            outs = [o for o in outs if found.get(o.id, states.PENDING) == states.PENDING]
        if outs:
            self.send(outs)
            self.published += len(outs)
        after, self.after = self.after, []
        for action in after:
            action()


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
        inner = conts
        if len(steps) > 1:
            # the later steps are stored once, one key each, and the continuation refers to
            # them: a message carries one step, not the whole rest of the chain
            key = f"nbq:chain:{terminal_id(node)}"
            app.backend.kv_set_many({f"{key}:{i}": serialization.dumps(step) for i, step in enumerate(steps) if i > 0})
            inner = [{"k": "chain", "key": key, "pos": 1, "n": len(steps), "then": conts}]
        start(app, steps[0], inner, pub, input_json=input_json, has_input=has_input)
    else:
        _start_group(app, node, conts, pub, input_json, has_input)


def _start_group(app, node: dict, conts: list, pub: _Publisher, input_json: Any, has_input: bool) -> None:
    gid, members = node["id"], node["members"]
    limit = node.get("concurrency") or len(members)
    if limit < len(members) and not (pub.repeat and app.backend.group_info(gid) is not None):
        # held members and the limit are stored before the group exists, so a group that
        # exists has them all (a repeat start must not hold again members already released)
        for i in range(limit, len(members)):
            spec = {"node": members[i], "index": i, "input": input_json, "has_input": has_input, "limited": True}
            app.backend.kv_set(f"nbq:held:{gid}:{i}", serialization.dumps(spec))
        app.backend.kv_set(f"nbq:limit:{gid}", str(limit))
    app.backend.init_group(gid, [terminal_id(m) for m in members], meta={"then": conts})
    if not members:
        _group_complete(app, gid, pub)
        return
    for i, member in enumerate(members[:limit]):
        spec = {"node": member, "index": i, "input": input_json, "has_input": has_input, "limited": limit < len(members)}
        _start_member(app, gid, spec, pub)


def _start_member(app, gid: str, spec: dict, pub: _Publisher) -> None:
    cont = [{"k": "member", "group": gid, "index": spec["index"], "member": terminal_id(spec["node"]), "limited": spec.get("limited", True)}]
    start(app, spec["node"], cont, pub, input_json=spec["input"], has_input=spec["has_input"])


# -- advancing when a task finishes ---------------------------------------------------------------

def on_success(app, message: dict, result_json_text: str, *, repeat: bool = False, send=None) -> None:
    """After a task's SUCCESS is stored: callbacks, the next chain step, group fan-in
    (``send``: see _Publisher)."""
    if not message.get("on_success") and not message.get("workflow"):
        return
    if repeat and _advanced(app, message["id"]):
        return
    pub = _Publisher(app, repeat=repeat, send=send)
    value = serialization.loads(result_json_text)
    callbacks = [_with_input(cb, value, True) for cb in message.get("on_success") or []]
    _publish_callbacks(app, callbacks, message["id"], pub)
    _apply(app, (message.get("workflow") or {}).get("then") or [], value, pub)
    pub.flush()
    _mark_advanced(app, message["id"], pub)


def on_failure(app, message: dict, exc_type: str, error: str, *, repeat: bool = False, send=None) -> None:
    """After a task's final FAILURE is stored: error callbacks and failure propagation.

    Always careful: two members of one group may both fail and both propagate the
    group's failure to the same continuation.
    """
    if repeat and _advanced(app, message["id"]):
        return
    pub = _Publisher(app, repeat=repeat, careful=True, send=send)
    _fire_error_callbacks(app, message, error, pub)
    _fail(app, (message.get("workflow") or {}).get("then") or [], message["id"], exc_type, error, pub)
    pub.flush()
    _mark_advanced(app, message["id"], pub)


#: how long a "this task's advance was published" mark is kept (a redelivery comes sooner)
ADVANCED_TTL = 7 * 24 * 3600.0


def _advanced(app, task_id: str) -> bool:
    """Whether an earlier attempt published this task's advance (only tracked for brokers that do not dedupe)."""
    return not app.broker.capabilities.dedupes_publish and app.backend.kv_get(f"nbq:advanced:{task_id}") is not None


def _mark_advanced(app, task_id: str, pub: _Publisher) -> None:
    """After publishing an advance on a broker that cannot drop a repeat publish, remember it.

    A broker that dedupes by message id (SQLite, Redis) drops a repeat of a message
    still waiting and the careful filter skips the rest, so nothing is needed there.
    On AMQP a repeat would be a second message: a redelivered task whose advance is
    marked does not publish it again. Only a crash between the publish and this mark
    leaves a window for a duplicate message (its execution is still fenced once final).
    """
    if pub.published and not app.broker.capabilities.dedupes_publish:
        app.backend.claim_once(f"nbq:advanced:{task_id}", ADVANCED_TTL)


def lone_member(message: dict) -> dict | None:
    """The group-member continuation of a task when it is all that follows its success (no
    callbacks, no concurrency limit to release): a worker may then count the member in the
    round trip that stores the result and finish the advance with ``member_counted``."""
    if message.get("on_success"):
        return None
    conts = (message.get("workflow") or {}).get("then") or []
    if len(conts) == 1 and conts[0]["k"] == "member" and not conts[0].get("limited", True):
        return conts[0]
    return None


def member_counted(app, message: dict, cont: dict, done: int, total: int, *, send=None) -> None:
    """The rest of ``on_success`` for a ``lone_member`` task, once its member was counted
    (``done`` of ``total``): the last one completes the group."""
    if done < total:
        return
    pub = _Publisher(app, send=send)
    _member_finished(app, cont, pub, counted=(done, total))
    pub.flush()
    _mark_advanced(app, message["id"], pub)


def after_final(app, message: dict, record: dict, *, send=None) -> None:
    """A redelivered message whose task is already final: repeat the (idempotent) advance."""
    state = record.get("state")
    if state == states.SUCCESS and record.get("result") is not None:
        on_success(app, message, record["result"], repeat=True, send=send)
    elif state in (states.FAILURE, states.REVOKED):
        on_failure(app, message, record.get("exc_type") or "Error", record.get("error") or "", repeat=True, send=send)


def _publish_callbacks(app, messages: list[dict], parent_id: str, pub: _Publisher) -> None:
    if not messages:
        return
    now = app.clock.time()
    records = [{"id": m["id"], "name": m["name"], "state": states.PENDING, "args": serialization.dumps(m["args"]),
                "kwargs": serialization.dumps(m["kwargs"]), "queue": m.get("queue"), "parent_id": parent_id,
                "created_at": now}
               for m in messages]
    app.backend.create(records)
    for r in records:       # a callback's arguments (the parent's result among them) live with its record too
        payloads.track(app, r["id"], r["args"], r["kwargs"])
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
            _next_step(app, cont, value, pub)
        elif cont["k"] == "member":
            _member_finished(app, cont, pub)


def _next_step(app, cont: dict, value: Any, pub: _Publisher) -> None:
    """Start the chain's step ``pos`` with the previous step's value.

    A step's stored node is deleted once the step is published; a repeat advance that
    finds it gone knows the step was started already.
    """
    step_key = f"{cont['key']}:{cont['pos']}"
    text = app.backend.kv_get(step_key)
    if text is None:
        return
    pos, n = cont["pos"], cont["n"]
    inner = [{**cont, "pos": pos + 1}] if pos + 1 < n else cont["then"]
    start(app, serialization.loads(text), inner, pub, input_json=value, has_input=True)
    pub.after.append(lambda: app.backend.kv_set(step_key, None))


def _chain_rest(app, cont: dict) -> list[dict]:
    """The stored steps of a chain from ``pos`` on (those not started yet)."""
    texts = [app.backend.kv_get(f"{cont['key']}:{i}") for i in range(cont["pos"], cont["n"])]
    return [serialization.loads(t) for t in texts if t is not None]


def _member_finished(app, cont: dict, pub: _Publisher, counted: tuple[int, int] | None = None) -> None:
    """Count a member as done (unless the caller did: ``counted`` is its (done, total))
    and start what that frees: the next held member, or what follows the group."""
    gid = cont["group"]
    done, total = counted or app.backend.member_done(gid, cont["member"])
    if cont.get("limited", True):
        _release_next(app, gid, done, total, pub)
    if done >= total:
        _group_complete(app, gid, pub)


def _release_next(app, gid: str, done: int, total: int, pub: _Publisher) -> None:
    """In a group with a concurrency limit, start the member that the ``done``-th finish frees.

    ``limit`` members start at once; the ``d``-th member to finish releases member
    ``limit + d - 1``, so at most ``limit`` are ever queued or running. A repeat advance
    releases every member due by now that is still held: the attempt it repeats may
    have died after counting its member and before publishing the release (another
    member's finish meanwhile released only *its* index). A held spec is deleted once
    its member is published.
    """
    limit = app.backend.kv_get(f"nbq:limit:{gid}")
    if limit is None:
        return
    due = int(limit) + done          # members 0 .. due-1 may have started by now
    if pub.repeat:
        prefix = f"nbq:held:{gid}:"
        held = {int(key[len(prefix):]): text for key, text in app.backend.kv_items(prefix).items()}
        release = sorted((i, text) for i, text in held.items() if i < due)
    else:
        text = app.backend.kv_get(f"nbq:held:{gid}:{due - 1}") if due - 1 < total else None
        release = [] if text is None else [(due - 1, text)]
    for index, text in release:
        _start_member(app, gid, serialization.loads(text), pub)
        pub.after.append(lambda key=f"nbq:held:{gid}:{index}": app.backend.kv_set(key, None))
    if done >= total:
        pub.after.append(lambda: app.backend.kv_set(f"nbq:limit:{gid}", None))


def _group_complete(app, gid: str, pub: _Publisher) -> None:
    """Every member is done: store the group's values and start what follows it (a chord's callback).

    The group's SUCCESS is stored *after* its continuation is published, so it marks
    "published": a repeat that finds it stored publishes nothing, and one that does not
    (the earlier attempt died in between) publishes again, which is idempotent.
    """
    if app.backend.states_of([gid]).get(gid) in states.READY_STATES:
        return
    info = app.backend.group_info(gid)
    records = app.backend.get_many(info["members"])
    missing = [m for m, r in zip(info["members"], records) if r is None]
    if missing:
        # a member's result expired (results_expire_in) before the group finished
        error = f"the result of member {missing[0]} expired before the group finished"
        _fail(app, info["meta"].get("then") or [], missing[0], "ResultExpired", error, pub)
        pub.after.append(lambda: app.backend.store_result(gid, states.FAILURE, exc_type="ResultExpired", error=error))
        return
    if any(r["state"] != states.SUCCESS for r in records):
        # a member failed for good: the group failed when it did (see _fail); nothing to run
        return
    values = [serialization.loads(r["result"]) for r in records]
    _apply(app, info["meta"].get("then") or [], values, pub)
    text = serialization.dumps(values)
    payloads.track(app, gid, text)      # the group's record holds its members' values, payloads too
    pub.after.append(lambda: app.backend.store_result(gid, states.SUCCESS, result=text))


def _fail(app, conts: list, origin_id: str, exc_type: str, error: str, pub: _Publisher) -> None:
    for cont in conts:
        if cont["k"] == "chain":
            for node in _chain_rest(app, cont):
                _mark_not_run(app, node, origin_id, exc_type, error, pub)
            _fail(app, cont["then"], origin_id, exc_type, error, pub)
        elif cont["k"] == "member":
            gid = cont["group"]
            if app.backend.states_of([gid]).get(gid) not in states.READY_STATES:
                # the first member to fail fails the group and what follows it; the group's
                # FAILURE is stored after that is published, so it marks it done
                info = app.backend.group_info(gid)
                _fail(app, info["meta"].get("then") or [], origin_id, exc_type, error, pub)
                pub.after.append(lambda gid=gid: app.backend.store_result(
                    gid, states.FAILURE, exc_type=exc_type, error=error, traceback=f"not complete: member {origin_id} failed"))
            # the failed member still frees a slot in a concurrency-limited group
            done, total = app.backend.member_done(gid, cont["member"])
            if cont.get("limited", True):
                _release_next(app, gid, done, total, pub)


def _mark_not_run(app, node: dict, origin_id: str, exc_type: str, error: str, pub: _Publisher) -> None:
    """Record every task of a node that will never run (REVOKED, the traceback saying
    ``not run: <id> failed`` or ``was revoked``); fire their error callbacks."""
    why = f"not run: {origin_id} " + ("was revoked" if exc_type == "TaskRevoked" else "failed")
    if node["t"] == "task":
        message = node["msg"]
        app.backend.store_result(message["id"], states.REVOKED, exc_type=exc_type, error=error, traceback=why)
        _fire_error_callbacks(app, message, error, pub)
    elif node["t"] == "chain":
        for step in node["steps"]:
            _mark_not_run(app, step, origin_id, exc_type, error, pub)
    else:
        app.backend.store_result(node["id"], states.REVOKED, exc_type=exc_type, error=error, traceback=why)
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
    with payloads.sending(app):         # an object sent to many tasks is packed and stored once
        node = build.node(item)
    _keep_graph(build.records, node)
    with app.transaction():
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
