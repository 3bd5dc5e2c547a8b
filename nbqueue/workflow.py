"""Workflows as data: the nodes a sent group, chain or chord becomes, and the one step that advances them.

At send time a workflow (canvas.py) becomes a tree of nodes with every task id assigned:
``TaskNode`` (one message), ``ChainNode`` (steps) and ``GroupNode`` (members, with an
optional concurrency limit). A chord is a chain of a group and its callback. Starting a
node publishes its first tasks and attaches *continuations* to the messages that finish it
(in the message's ``workflow`` field, ``{"then": [continuation, ...]}``):

- ``NextStep``: start step ``step`` of a chain with this result (the later steps are
  stored at send time under ``Keys.chain_step``, so a message carries one step, not the
  rest of the chain);
- ``MemberDone``: count a group member done (and, in a group with a concurrency limit,
  release the next held member); the member that completes the group stores the group's
  record (the list of member results, in order) and applies the continuations kept with
  the group.

Every key this module keeps in the backend's key-value store is named by ``Keys``.

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

import dataclasses
import logging
from typing import Any, Union

from . import payloads, serialization, states
from .canvas import Signature, chain, chord, group
from .context import _current, current_task, task_context  # noqa: F401  (the worker and pool set the task context here)
from .message import Message
from .result import AsyncResult, ChainResult, ChordResult, GroupResult
from .signature import new_id

log = logging.getLogger(__name__)



# -- key names ------------------------------------------------------------------------------------

class Keys:
    """Every key nbqueue keeps in the backend's key-value store: workflow state, cancel marks,
    schedules, the result cache and notebook provenance."""

    CHAIN = "nbq:chain:"
    HELD = "nbq:held:"
    LIMIT = "nbq:limit:"
    ADVANCED = "nbq:advanced:"
    REVOKE_KEEP = "nbq:revoke-keep:"
    SCHEDULE = "nbq:sched:"
    TICK = "nbq:tick:"
    UPKEEP = "nbq:upkeep:"
    CACHE = "nbqueue.cache:"
    CACHE_LEAD = "nbqueue.cache.lead:"
    CACHE_EPOCH = "nbqueue.cache.epoch"
    CACHE_STATS = "nbqueue.cache.stats:"
    SEEN = "nbqueue.seen:"

    @staticmethod
    def chain_step(chain_id: str, step: int) -> str:
        """A chain's step not started yet (its node's JSON); ``chain_id`` is the chain's terminal id."""
        return f"{Keys.CHAIN}{chain_id}:{step}"

    @staticmethod
    def held(group_id: str, index: int | None = None) -> str:
        """A group member held back by the group's concurrency limit (a ``HeldMember``'s JSON);
        without ``index``, the prefix of all of a group's held members."""
        return f"{Keys.HELD}{group_id}:" + ("" if index is None else str(index))

    @staticmethod
    def limit(group_id: str) -> str:
        """A group's concurrency limit, while members are held back."""
        return f"{Keys.LIMIT}{group_id}"

    @staticmethod
    def advanced(task_id: str) -> str:
        """Marks that a task's advance was published (brokers that cannot drop a repeat publish)."""
        return f"{Keys.ADVANCED}{task_id}"

    @staticmethod
    def revoke_keep(task_id: str) -> str:
        """Marks a running task revoked without ``terminate``: it runs on, its result is
        discarded (see nbqueue.control); the worker removes the mark."""
        return f"{Keys.REVOKE_KEEP}{task_id}"

    @staticmethod
    def schedule(name: str) -> str:
        """A schedule's saved state (JSON with its cursor); all of them are under ``SCHEDULE``."""
        return f"{Keys.SCHEDULE}{name}"

    @staticmethod
    def tick(name: str, due: Any) -> str:
        """``claim_once``: one beat fires schedule ``name`` at its due time ``due``."""
        return f"{Keys.TICK}{name}:{due}"

    @staticmethod
    def upkeep(bucket: int) -> str:
        """``claim_once``: one beat runs the store's upkeep in this time bucket."""
        return f"{Keys.UPKEEP}{bucket}"

    @staticmethod
    def cache(key: str) -> str:
        """A result cache entry (see nbqueue.cache); all of them are under ``CACHE``."""
        return f"{Keys.CACHE}{key}"

    @staticmethod
    def cache_lead(key: str, generation: str) -> str:
        """``claim_once``: one sender per generation of a cache key runs it."""
        return f"{Keys.CACHE_LEAD}{key}:{generation}"

    @staticmethod
    def cache_stats(process: str) -> str:
        """One process's cache counters; all of them are under ``CACHE_STATS``."""
        return f"{Keys.CACHE_STATS}{process}"

    @staticmethod
    def seen(notebook_key: str, kernel: str | None = None) -> str:
        """When ``kernel`` last saw its tasks of a notebook (see nbqueue.provenance); without
        ``kernel``, the prefix of all of the notebook's kernels."""
        return f"{Keys.SEEN}{notebook_key}:" + ("" if kernel is None else kernel)


# -- nodes ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskNode:
    """One task: its message, ready to publish (the input of a chain step is added when it starts)."""

    message: dict

    @property
    def id(self) -> str:
        return self.message["id"]

    def to_json(self) -> dict:
        return {"task": self.message}


@dataclasses.dataclass
class ChainNode:
    """Steps that run one after another."""

    steps: list[Node]

    def to_json(self) -> dict:
        return {"chain": [step.to_json() for step in self.steps]}


@dataclasses.dataclass
class GroupNode:
    """Members that run in parallel, at most ``concurrency`` at once (0: no limit)."""

    id: str
    members: list[Node]
    concurrency: int = 0

    @property
    def limit(self) -> int:
        """How many members start at once."""
        return self.concurrency or len(self.members)

    @property
    def limited(self) -> bool:
        return self.limit < len(self.members)

    def to_json(self) -> dict:
        return {"group": self.id, "members": [m.to_json() for m in self.members], "concurrency": self.concurrency}


Node = Union[TaskNode, ChainNode, GroupNode]


def node_from_json(data: dict) -> Node:
    """The node ``to_json`` wrote."""
    if "task" in data:
        return TaskNode(data["task"])
    if "chain" in data:
        return ChainNode([node_from_json(step) for step in data["chain"]])
    return GroupNode(data["group"], [node_from_json(m) for m in data["members"]], data.get("concurrency") or 0)


# -- continuations ------------------------------------------------------------------------------------

@dataclasses.dataclass
class NextStep:
    """Start step ``step`` of the chain whose terminal id is ``chain`` (of ``steps`` in all) with the
    finished task's value; after the last step, ``then`` runs."""

    chain: str
    step: int
    steps: int
    then: list[Continuation]

    def to_json(self) -> dict:
        return {"kind": "chain", "chain": self.chain, "step": self.step, "steps": self.steps,
                "then": [c.to_json() for c in self.then]}


@dataclasses.dataclass
class MemberDone:
    """Count member ``member`` (the id holding its result; position ``index``) of group ``group``
    done; ``limited``: the group has a concurrency limit, so a finish releases a held member."""

    group: str
    index: int
    member: str
    limited: bool = True

    def to_json(self) -> dict:
        return {"kind": "member", "group": self.group, "index": self.index, "member": self.member,
                "limited": self.limited}


Continuation = Union[NextStep, MemberDone]


def continuation_from_json(data: dict) -> Continuation:
    if data["kind"] == "chain":
        return NextStep(data["chain"], data["step"], data["steps"], continuations_from_json(data["then"]))
    return MemberDone(data["group"], data["index"], data["member"], data.get("limited", True))


def continuations_from_json(items: list | None) -> list[Continuation]:
    return [continuation_from_json(c) for c in items or []]


def _then(message: Message) -> list[Continuation]:
    """The continuations a message carries."""
    return continuations_from_json((message.workflow or {}).get("then"))


@dataclasses.dataclass
class HeldMember:
    """A group member to start later: the node, its position, and the input it starts with."""

    node: Node
    index: int
    input: Any = None
    has_input: bool = False
    limited: bool = True

    def to_json(self) -> dict:
        return {"node": self.node.to_json(), "index": self.index, "input": self.input, "has_input": self.has_input,
                "limited": self.limited}

    @classmethod
    def from_json(cls, data: dict) -> HeldMember:
        return cls(node_from_json(data["node"]), data["index"], data.get("input"), data.get("has_input", False),
                   data.get("limited", True))


# -- building nodes at send time -------------------------------------------------------------

class _Build:
    """Collects the PENDING records of a workflow while turning it into nodes."""

    def __init__(self, app, concurrency: int = 0):
        self.app = app
        self.concurrency = concurrency
        self.records: list[dict] = []

    def node(self, item: Any, *, group_id: str | None = None, parent_id: str | None = None) -> Node:
        if isinstance(item, Signature):
            message, record, _ = self.app.prepare(item, group_id=group_id, parent_id=parent_id)
            self.records.append(record)
            return TaskNode(message)
        if isinstance(item, chain):
            steps: list[Node] = []
            for i, step in enumerate(item.steps):
                last = i == len(item.steps) - 1
                # a later step's parent is the step before it (as Celery records a chain)
                parent = parent_id if i == 0 else terminal_id(steps[-1])
                steps.append(self.node(step, group_id=group_id if last else None, parent_id=parent))
            return ChainNode(steps)
        if isinstance(item, chord):
            return self.node(chain(item.header, item.callback), group_id=group_id, parent_id=parent_id)
        if isinstance(item, group):
            return self._group(item, group_id, parent_id)
        raise TypeError(type(item).__name__)

    def _group(self, item: group, group_id: str | None, parent_id: str | None) -> GroupNode:
        gid = item.id or new_id()
        concurrency, self.concurrency = int(self.concurrency), 0    # the limit applies to the outermost group only
        members = [self.node(m, group_id=gid, parent_id=gid) for m in item.items]
        self.records.append({"id": gid, "name": "nbqueue.group", "state": states.PENDING, "group_id": group_id,
                             "parent_id": parent_id, "created_at": self.app.clock.time(),
                             "meta": serialization.dumps({"size": len(members)})})
        return GroupNode(gid, members, concurrency)


def graph(node: Node, started: bool = True) -> Any:
    """A node's shape by ids, as the workflow's first record keeps it (``meta["workflow"]``):
    a task id, ``{"chain": [steps]}`` or ``{"group": id, "members": [...]}``. The members of
    a group started at send time (``started``) are left out when each is a single task: the
    group's bookkeeping lists them in order (a later chain step's group has none yet)."""
    if isinstance(node, TaskNode):
        return node.id
    if isinstance(node, ChainNode):
        return {"chain": [graph(step, started and i == 0) for i, step in enumerate(node.steps)]}
    if started and all(isinstance(m, TaskNode) for m in node.members):
        return {"group": node.id}
    return {"group": node.id, "members": [graph(m, started and not node.limited) for m in node.members]}


def root_id(node: Node) -> str:
    """The id of a node's first record: the one without a parent, which keeps its graph."""
    if isinstance(node, ChainNode):
        return root_id(node.steps[0])
    return node.id


def _keep_graph(records: list[dict], node: Node) -> None:
    """Write the workflow's graph into its first record's meta (see ``graph``)."""
    root = root_id(node)
    for record in records:
        if record["id"] == root:
            meta = serialization.loads(record["meta"]) if record.get("meta") else {}
            meta["workflow"] = graph(node)
            record["meta"] = serialization.dumps(meta)
            return


def terminal_id(node: Node) -> str:
    """The id whose record holds the node's result."""
    if isinstance(node, ChainNode):
        return terminal_id(node.steps[-1])
    return node.id


def task_ids(node: Node) -> list[str]:
    """Every task id inside a node (group ids included)."""
    if isinstance(node, TaskNode):
        return [node.id]
    if isinstance(node, ChainNode):
        return [i for step in node.steps for i in task_ids(step)]
    return [node.id] + [i for m in node.members for i in task_ids(m)]


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


def start(app, node: Node, conts: list[Continuation], pub: _Publisher, *, input_json: Any = None,
          has_input: bool = False) -> None:
    """Publish what starts ``node``; ``conts`` run with its result when it finishes."""
    if isinstance(node, TaskNode):
        message = _with_input(node.message, input_json, has_input)
        message["workflow"] = {"then": [c.to_json() for c in conts]} if conts else None
        pub.task(message)
    elif isinstance(node, ChainNode):
        inner = conts
        if len(node.steps) > 1:
            # the later steps are stored once, one key each, and the continuation refers to
            # them: a message carries one step, not the whole rest of the chain
            chain_id = terminal_id(node)
            app.backend.kv_set_many({Keys.chain_step(chain_id, i): serialization.dumps(step.to_json())
                                     for i, step in enumerate(node.steps) if i > 0})
            inner = [NextStep(chain_id, 1, len(node.steps), conts)]
        start(app, node.steps[0], inner, pub, input_json=input_json, has_input=has_input)
    else:
        _start_group(app, node, conts, pub, input_json, has_input)


def _start_group(app, node: GroupNode, conts: list[Continuation], pub: _Publisher, input_json: Any,
                 has_input: bool) -> None:
    gid, members, limit = node.id, node.members, node.limit
    if node.limited and not (pub.repeat and app.backend.group_info(gid) is not None):
        # held members and the limit are stored before the group exists, so a group that
        # exists has them all (a repeat start must not hold again members already released)
        for i in range(limit, len(members)):
            held = HeldMember(members[i], i, input_json, has_input, limited=True)
            app.backend.kv_set(Keys.held(gid, i), serialization.dumps(held.to_json()))
        app.backend.kv_set(Keys.limit(gid), str(limit))
    app.backend.init_group(gid, [terminal_id(m) for m in members], meta={"then": [c.to_json() for c in conts]})
    if not members:
        _group_complete(app, gid, pub)
        return
    for i, member in enumerate(members[:limit]):
        _start_member(app, gid, HeldMember(member, i, input_json, has_input, limited=node.limited), pub)


def _start_member(app, gid: str, member: HeldMember, pub: _Publisher) -> None:
    done = MemberDone(gid, member.index, terminal_id(member.node), member.limited)
    start(app, member.node, [done], pub, input_json=member.input, has_input=member.has_input)


# -- advancing when a task finishes ---------------------------------------------------------------

def on_success(app, message: Message, result_json_text: str, *, repeat: bool = False, send=None) -> None:
    """After a task's SUCCESS is stored: callbacks, the next chain step, group fan-in."""
    if not message.on_success and not message.workflow:
        return
    if repeat and _advanced(app, message.id):
        return
    pub = _Publisher(app, repeat=repeat, send=send)
    value = serialization.loads(result_json_text)
    callbacks = [_with_input(cb, value, True) for cb in message.on_success or []]
    _publish_callbacks(app, callbacks, message.id, pub)
    _apply(app, _then(message), value, pub)
    pub.flush()
    _mark_advanced(app, message.id, pub)


def on_failure(app, message: Message, exc_type: str, error: str, *, repeat: bool = False, send=None) -> None:
    """After a task's final FAILURE is stored: error callbacks and failure propagation.

    Always careful: two members of one group may both fail and both propagate the
    group's failure to the same continuation.
    """
    if repeat and _advanced(app, message.id):
        return
    pub = _Publisher(app, repeat=repeat, careful=True, send=send)
    _fire_error_callbacks(app, message.on_error, message.id, error, pub)
    _fail(app, _then(message), message.id, exc_type, error, pub)
    pub.flush()
    _mark_advanced(app, message.id, pub)


#: how long a "this task's advance was published" mark is kept (a redelivery comes sooner)
ADVANCED_TTL = 7 * 24 * 3600.0


def _advanced(app, task_id: str) -> bool:
    """Whether an earlier attempt published this task's advance (only tracked for brokers that do not dedupe)."""
    return not app.broker.capabilities.dedupes_publish and app.backend.kv_get(Keys.advanced(task_id)) is not None


def _mark_advanced(app, task_id: str, pub: _Publisher) -> None:
    """After publishing an advance on a broker that cannot drop a repeat publish, remember it.

    A broker that dedupes by message id (SQLite, Redis) drops a repeat of a message
    still waiting and the careful filter skips the rest, so nothing is needed there.
    On AMQP a repeat would be a second message: a redelivered task whose advance is
    marked does not publish it again. Only a crash between the publish and this mark
    leaves a window for a duplicate message (its execution is still fenced once final).
    """
    if pub.published and not app.broker.capabilities.dedupes_publish:
        app.backend.claim_once(Keys.advanced(task_id), ADVANCED_TTL)


def lone_member(message: Message) -> dict | None:
    """The group-member continuation of a task, as the message carries it (``MemberDone.to_json``:
    ``group`` and ``member`` ids), when it is all that follows its success (no callbacks, no
    concurrency limit to release): a worker may then count the member in the round trip that
    stores the result and finish the advance with ``member_counted``."""
    if message.on_success:
        return None
    conts = (message.workflow or {}).get("then") or []
    if len(conts) == 1 and conts[0]["kind"] == "member" and not conts[0].get("limited", True):
        return conts[0]
    return None


def member_counted(app, message: Message, cont: dict, done: int, total: int, *, send=None) -> None:
    """The rest of ``on_success`` for a ``lone_member`` task, once its member was counted
    (``done`` of ``total``): the last one completes the group."""
    if done < total:
        return
    pub = _Publisher(app, send=send)
    member = continuation_from_json(cont)
    assert isinstance(member, MemberDone)
    _member_finished(app, member, pub, counted=(done, total))
    pub.flush()
    _mark_advanced(app, message.id, pub)


def after_final(app, message: Message, record: dict, *, send=None) -> None:
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


def _fire_error_callbacks(app, on_error: list | None, parent_id: str, error: str, pub: _Publisher) -> None:
    """Publish error callbacks (envelopes as JSON objects), the error prepended to their arguments."""
    callbacks = [{**cb, "args": [error, *cb["args"]]} for cb in on_error or []]
    _publish_callbacks(app, callbacks, parent_id, pub)


def _apply(app, conts: list[Continuation], value: Any, pub: _Publisher) -> None:
    for cont in conts:
        if isinstance(cont, NextStep):
            _next_step(app, cont, value, pub)
        else:
            _member_finished(app, cont, pub)


def _next_step(app, cont: NextStep, value: Any, pub: _Publisher) -> None:
    """Start the chain's step ``cont.step`` with the previous step's value.

    A step's stored node is deleted once the step is published; a repeat advance that
    finds it gone knows the step was started already.
    """
    step_key = Keys.chain_step(cont.chain, cont.step)
    text = app.backend.kv_get(step_key)
    if text is None:
        return
    following = cont.step + 1
    inner: list[Continuation] = [dataclasses.replace(cont, step=following)] if following < cont.steps else cont.then
    start(app, node_from_json(serialization.loads(text)), inner, pub, input_json=value, has_input=True)
    pub.after.append(lambda: app.backend.kv_set(step_key, None))


def _chain_rest(app, cont: NextStep) -> list[Node]:
    """The stored steps of a chain from ``cont.step`` on (those not started yet)."""
    texts = [app.backend.kv_get(Keys.chain_step(cont.chain, i)) for i in range(cont.step, cont.steps)]
    return [node_from_json(serialization.loads(t)) for t in texts if t is not None]


def _member_finished(app, cont: MemberDone, pub: _Publisher, counted: tuple[int, int] | None = None) -> None:
    """Count a member as done (unless the caller did: ``counted`` is its (done, total))
    and start what that frees: the next held member, or what follows the group."""
    done, total = counted or app.backend.member_done(cont.group, cont.member)
    if cont.limited:
        _release_next(app, cont.group, done, total, pub)
    if done >= total:
        _group_complete(app, cont.group, pub)


def _release_next(app, gid: str, done: int, total: int, pub: _Publisher) -> None:
    """In a group with a concurrency limit, start the member that the ``done``-th finish frees.

    ``limit`` members start at once; the ``d``-th member to finish releases member
    ``limit + d - 1``, so at most ``limit`` are ever queued or running. A repeat advance
    releases every member due by now that is still held: the attempt it repeats may
    have died after counting its member and before publishing the release (another
    member's finish meanwhile released only *its* index). A held spec is deleted once
    its member is published.
    """
    limit = app.backend.kv_get(Keys.limit(gid))
    if limit is None:
        return
    due = int(limit) + done          # members 0 .. due-1 may have started by now
    if pub.repeat:
        prefix = Keys.held(gid)
        held = {int(key[len(prefix):]): text for key, text in app.backend.kv_items(prefix).items()}
        release = sorted((i, text) for i, text in held.items() if i < due)
    else:
        text = app.backend.kv_get(Keys.held(gid, due - 1)) if due - 1 < total else None
        release = [] if text is None else [(due - 1, text)]
    for index, text in release:
        _start_member(app, gid, HeldMember.from_json(serialization.loads(text)), pub)
        pub.after.append(lambda key=Keys.held(gid, index): app.backend.kv_set(key, None))
    if done >= total:
        pub.after.append(lambda: _forget_limit(app, gid))


def _forget_limit(app, gid: str) -> None:
    """Every member of a limited group is done: its limit and any held spec still there go
    (a spec's releaser deletes it after publishing its member, which may by now have run,
    so the group's record, stored after this, is never final while specs remain)."""
    app.backend.kv_set(Keys.limit(gid), None)
    for key in app.backend.kv_items(Keys.held(gid)):
        app.backend.kv_set(key, None)


def _group_then(info: dict) -> list[Continuation]:
    """The continuations kept with a group (``init_group``'s meta)."""
    return continuations_from_json(info["meta"].get("then"))


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
        _fail(app, _group_then(info), missing[0], "ResultExpired", error, pub)
        pub.after.append(lambda: app.backend.store_result(gid, states.FAILURE, exc_type="ResultExpired", error=error))
        return
    if any(r["state"] != states.SUCCESS for r in records):
        # a member failed for good: the group failed when it did (see _fail); nothing to run
        return
    values = [serialization.loads(r["result"]) for r in records]
    _apply(app, _group_then(info), values, pub)
    text = serialization.dumps(values)
    payloads.track(app, gid, text)      # the group's record holds its members' values, payloads too
    pub.after.append(lambda: app.backend.store_result(gid, states.SUCCESS, result=text))


def _fail(app, conts: list[Continuation], origin_id: str, exc_type: str, error: str, pub: _Publisher) -> None:
    for cont in conts:
        if isinstance(cont, NextStep):
            for node in _chain_rest(app, cont):
                _mark_not_run(app, node, origin_id, exc_type, error, pub)
            _fail(app, cont.then, origin_id, exc_type, error, pub)
        else:
            _member_failed(app, cont, origin_id, exc_type, error, pub)


def _member_failed(app, cont: MemberDone, origin_id: str, exc_type: str, error: str, pub: _Publisher) -> None:
    """The first member to fail fails the group and what follows it; the group's end is
    stored after that is published, so it marks it done: REVOKED (not run to its end) when
    the member was cancelled, else FAILURE."""
    gid = cont.group
    if app.backend.states_of([gid]).get(gid) not in states.READY_STATES:
        _fail(app, _group_then(app.backend.group_info(gid)), origin_id, exc_type, error, pub)
        end, why = (states.REVOKED, "was revoked") if exc_type == "TaskRevoked" else (states.FAILURE, "failed")
        pub.after.append(lambda: app.backend.store_result(
            gid, end, exc_type=exc_type, error=error, traceback=f"not complete: member {origin_id} {why}"))
    # the failed member still frees a slot in a concurrency-limited group
    done, total = app.backend.member_done(gid, cont.member)
    if cont.limited:
        _release_next(app, gid, done, total, pub)


def _mark_not_run(app, node: Node, origin_id: str, exc_type: str, error: str, pub: _Publisher) -> None:
    """Record every task of a node that will never run (REVOKED, the traceback saying
    ``not run: <id> failed`` or ``was revoked``); fire their error callbacks."""
    why = f"not run: {origin_id} " + ("was revoked" if exc_type == "TaskRevoked" else "failed")
    if isinstance(node, TaskNode):
        app.backend.store_result(node.id, states.REVOKED, exc_type=exc_type, error=error, traceback=why)
        _fire_error_callbacks(app, node.message.get("on_error"), node.id, error, pub)
    elif isinstance(node, ChainNode):
        for step in node.steps:
            _mark_not_run(app, step, origin_id, exc_type, error, pub)
    else:
        app.backend.store_result(node.id, states.REVOKED, exc_type=exc_type, error=error, traceback=why)
        for member in node.members:
            _mark_not_run(app, member, origin_id, exc_type, error, pub)


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


def result_for(app, item: Any, node: Node):
    """The result object of a sent canvas ``item`` whose node is ``node``."""
    if isinstance(item, Signature):
        return AsyncResult(terminal_id(node), app, name=item.name)
    if isinstance(item, group):
        assert isinstance(node, GroupNode)
        return GroupResult(node.id, [result_for(app, m, n) for m, n in zip(item.items, node.members)], app)
    assert isinstance(node, ChainNode)
    if isinstance(item, chord):
        header_node, callback_nodes = node.steps[0], node.steps[1:]
        header = result_for(app, item.header, header_node)
        callback_node = callback_nodes[0] if len(callback_nodes) == 1 else ChainNode(callback_nodes)
        return ChordResult(header, result_for(app, item.callback, callback_node), app)
    return ChainResult([result_for(app, step, n) for step, n in zip(item.steps, node.steps)], app)
