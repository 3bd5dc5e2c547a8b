"""App: configuration, the task registry, sending, and the worker factory.

The only object a user must hold::

    app = nbqueue.App()                          # ./.nbqueue/nbqueue.db, nothing to start
    app = nbqueue.App("redis://localhost:6379/0")

    @app.task
    def add(x, y):
        return x + y

    app.start_worker()
    add.delay(1, 2).get(timeout=10)
"""
from __future__ import annotations

import functools
import logging
import os
import pickle
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterable, Mapping

from . import batching, cache, callpath, payloads, provenance, serialization, shipping, states, tracing
from . import config as _config
from .broker import Outgoing
from .clock import SYSTEM
from .drivers import (
    DEFAULT_URL,
    backend_from_url,
    broker_from_url,
    driver_for,
    engine_for,
    holds_payloads,
    local_to_process,
    payload_store,
)
from .errors import ConfigurationError
from .result import AsyncResult
from .signature import Signature, check_queue_name, encode_body, to_message
from .task import Task, task_name
from .urls import redact

log = logging.getLogger(__name__)


#: how long start_worker waits for the stores' first answer (a refused login comes at once)
STORE_CHECK_WAIT_S = 5.0


def _log_store_problem(found: Future) -> None:
    """What a store check that outlived its wait found, in the log."""
    exc = found.exception()
    if isinstance(exc, ConfigurationError):
        log.error("the worker cannot use its stores: %s", exc)
    elif exc is not None:
        log.warning("cannot reach the store yet (%s); the worker retries", exc)


def _default_backend(broker_url: str | None) -> str | None:
    """Results live beside the broker when its driver can hold them; else in the default store."""
    if broker_url is None:
        return None
    if driver_for(broker_url, "broker").results_beside:
        return broker_url
    scheme = broker_url.split(":", 1)[0].lower()
    log.warning(
        "broker %s keeps no results; recording them in the default store %s (pass backend= for shared results)",
        scheme,
        DEFAULT_URL,
    )
    return None


def _open_app(spec: dict) -> "App":
    """An App made from ``App.process_opener``'s spec; relative SQLite paths read from the
    directory the original App was made in."""
    cwd = spec.get("cwd")
    here = os.getcwd() if cwd else None
    try:
        if cwd:
            os.chdir(cwd)
        return App(spec["broker"], spec["backend"], default_queue=spec["default_queue"], **spec["options"])
    finally:
        if here:
            os.chdir(here)


class App:
    """``inline=True``: every task runs in the caller at send time, through the store and
    a worker's code path (inline.py), for unit tests without a worker."""

    def __init__(
        self, broker: str | None = None, backend: str | None = None, *, default_queue: str = "nbqueue", **options: Any
    ):
        _config.check_options(options)
        check_queue_name(default_queue, "default_queue")
        self.config = _config.Config(broker=broker, backend=backend, default_queue=default_queue, options=options)
        self.default_queue = default_queue
        self.clock = options.get("clock") or SYSTEM
        if options.get("inline"):     # inline.py: tasks run in the caller at send; its runner steps this clock
            from .inline import InlineClock

            self.clock = InlineClock(self.clock)
        self.serializer = serialization.Serializer(pickle=self.config.option("serializer") == "pickle")
        self.visibility_timeout = float(self.config.option("visibility_timeout"))
        self.registry: dict[str, Task] = {}
        try:
            self._cwd: str | None = os.getcwd()      # where relative SQLite paths were read (process_opener)
        except OSError:
            self._cwd = None
        self.broker_url = broker or DEFAULT_URL
        self.backend_url = backend or _default_backend(broker) or DEFAULT_URL
        store_options = {k: v for k, v in options.items() if k not in ("clock", "inline")}
        #: the broker and result backend, and how they work together (see nbqueue.engine)
        self.engine = engine_for(broker_from_url(self.broker_url, clock=self.clock, options=store_options),
                                 backend_from_url(self.backend_url, clock=self.clock, options=store_options))
        payloads.attach(self, resolve=payload_store, holds=holds_payloads)   # large values out of band (payloads.py)
        self._workers: list = []
        self._schedules = None
        self._lock = threading.Lock()
        self._live_workers: tuple[float, list] | None = None     # (when read, heartbeats): see live_workers()
        # -- built-in tasks: "nbqueue.cell" runs %%task cells, only on allow_cells workers ----------
        from . import builtin

        builtin.register(self)
        self._inline = None
        if options.get("inline"):
            from .inline import Inline

            self._inline = Inline(self)

    @property
    def broker(self):
        """The engine's broker."""
        return self.engine.broker

    @property
    def backend(self):
        """The engine's result backend."""
        return self.engine.backend

    # -- construction from files and the environment ----------------------------------
    @classmethod
    def from_config(cls, cfg: _config.Config) -> "App":
        return cls(cfg.broker, cfg.backend, default_queue=cfg.default_queue, **cfg.options)

    @classmethod
    def from_yaml(cls, path: str) -> "App":
        """A machinery-style config.yml: broker, default_queue, result_backend, results_expire_in, ..."""
        return cls.from_config(_config.from_yaml(path))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "App":
        """NBQUEUE_BROKER, NBQUEUE_BACKEND, NBQUEUE_DEFAULT_QUEUE (and NBQUEUE_RESULTS_EXPIRE_IN, NBQUEUE_SECRET)."""
        return cls.from_config(_config.from_env(environ))

    def process_opener(self) -> tuple[Callable[[], "App"] | None, str | None]:
        """How another process of this machine opens an App on the same stores (a child of a
        process pool, for the tasks it sends: ``context.process_app``): ``(opener, None)``,
        ``opener`` a picklable callable; ``(None, why not)`` for a store that lives in this
        process alone (``memory://``) or options that cannot be pickled."""
        payloads_url = self.config.option("payloads")
        for url in (self.broker_url, self.backend_url, payloads_url if isinstance(payloads_url, str) else None):
            if url is not None and local_to_process(url):
                return None, f"the worker's App is on {redact(url)}, a store that lives in the worker's process alone"
        options = {k: v for k, v in self.config.options.items() if k not in ("clock", "inline")}
        spec = {"broker": self.broker_url, "backend": self.backend_url, "default_queue": self.default_queue,
                "options": options, "cwd": self._cwd}
        try:
            pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            return None, f"the options of the worker's App cannot be sent to another process ({exc})"
        return functools.partial(_open_app, spec), None

    # -- registration -------------------------------------------------------------------
    def task(self, fn: Callable | None = None, *, name: str | None = None, **options: Any):
        """``@app.task`` or ``@app.task(name=..., retry_count=..., retry_timeout=..., queue=...)``."""

        def register(f: Callable) -> Task:
            return self.register_task(name or task_name(f), f, **options)

        return register(fn) if fn is not None else register

    def register_task(self, name: str, fn: Callable, **options: Any) -> Task:
        """Register (or replace: re-running a notebook cell just works) a task under ``name``."""
        if not callable(fn):
            raise TypeError(f"task {name!r} must be callable, not {type(fn).__name__}")
        if isinstance(fn, Task):
            fn = fn.fn
        task = Task(self, name, fn, **options)
        self.registry[name] = task
        if shipping.defined_in_notebook(fn):   # sent to code queues (shipping.py): this process's workers read them too
            for worker in list(self._workers):
                worker.serve_code_queues()
        # running workers of this process say at once that they know it (their heartbeats list
        # their task names): a worker elsewhere that lacks it then leaves its messages to them
        for worker in self.workers:
            worker.announce()
        return task

    def register_tasks(self, tasks: Mapping[str, Callable]) -> dict[str, Task]:
        return {name: self.register_task(name, fn) for name, fn in tasks.items()}

    def signature(self, name: str, args=(), kwargs=None, **options) -> Signature:
        task = self.registry.get(name)
        merged = {**(task.options if task else {}), **options}
        return Signature(name, args=args, kwargs=kwargs, app=self, **merged)

    # -- sending ------------------------------------------------------------------------
    def prepare(
        self, sig: Signature, *, group_id: str | None = None, parent_id: str | None = None, meta: dict | None = None
    ) -> tuple[dict, dict, Outgoing]:
        """Encode a signature: (message, PENDING record, Outgoing). Raises SerializationError."""
        with payloads.sending(self):        # values out of band: packed once, held until linked to the task
            return self._prepare(sig, group_id=group_id, parent_id=parent_id, meta=meta)

    def _prepare(self, sig: Signature, *, group_id: str | None, parent_id: str | None,
                 meta: dict | None) -> tuple[dict, dict, Outgoing]:
        task = self.registry.get(sig.name)
        now = self.clock.time()
        message = to_message(
            sig, self.serializer, default_queue=self.default_queue, fn=task.fn if task else None, now=now
        )
        shipping.attach(self, sig, message)   # made from a notebook's function: carries its code, to a code queue
        if group_id is not None:
            message["group_id"] = group_id
        record, out = self._recorded(message, parent_id, meta)
        if provenance._provider is not None:     # in a notebook: where it was sent from (provenance.py)
            provenance.stamp(sig, task, record)
        return message, record, out

    def _recorded(self, message: dict, parent_id: str | None, meta: dict | None) -> tuple[dict, Outgoing]:
        """The trace context injected, then the PENDING record and the Outgoing of ``message``."""
        tracing.inject(message)
        record = {
            "id": message["id"], "name": message["name"], "state": states.PENDING,
            "args": serialization.dumps(message["args"]), "kwargs": serialization.dumps(message["kwargs"]),
            "queue": message["queue"], "group_id": message.get("group_id"), "parent_id": parent_id,
            "created_at": message["created_at"], "meta": serialization.dumps(meta) if meta else None,
        }
        out = self.outgoing(message)
        payloads.track(self, message["id"], out.body)      # the payloads the message references live with its record
        return record, out

    @staticmethod
    def outgoing(message: dict) -> Outgoing:
        return Outgoing(
            id=message["id"],
            body=encode_body(message),
            queue=message["queue"],
            eta=message.get("eta"),
            priority=message.get("priority", 0),
            message=message,
        )

    def publish(self, records: list[dict], outs: list[Outgoing]) -> None:
        """Record as PENDING first, then publish, so a fast worker's result is never overwritten
        (in one transaction where broker and backend share a store)."""
        self.engine.send(records, outs)
        if self._inline is not None:    # inline mode: run them (and what they lead to) before the send returns
            self._inline.after_publish(outs)

    def transaction(self):
        """One transaction over broker and backend where the engine has one (see Engine.transaction)."""
        return self.engine.transaction()

    def send_task(self, sig: Signature) -> AsyncResult:
        """Send one signature; returns its AsyncResult at once (for a task registered with
        ``cache=``, a stored result of the same code and arguments: see cache.py)."""
        if not isinstance(sig, Signature):
            raise TypeError(f"send_task takes a Signature, not {type(sig).__name__}; use app.send() for workflows")
        task = self.registry.get(sig.name)
        if task is not None:
            task.check_arguments(sig.args, sig.kwargs)
        if task is not None and task.cache is not False and not sig.on_success and not sig.on_error:
            with tracing.sending(sig.name):
                return cache.send(self, sig, task.cache)
        with tracing.sending(sig.name):
            message, record, out = self.prepare(sig)
            return self._send_prepared(sig, message, record, out)

    def _send_prepared(self, sig: Signature, message: dict, record: dict, out: Outgoing) -> AsyncResult:
        """Publish what ``prepare`` made of ``sig`` (or hold it in an ``app.batch()`` block); its AsyncResult."""
        since = self.backend.wake_version()
        if not batching.hold(self, record, out):
            self.publish([record], [out])
        result = AsyncResult(out.id, self, name=sig.name)
        result._sent_at_version = since if self._inline is None else None    # inline: final already
        result.callbacks = [AsyncResult(m["id"], self, name=m["name"], absent_ok=True)   # recorded when fired
                            for m in message.get("on_success", []) + message.get("on_error", [])]
        return result

    def send_call(self, task: Task, args: tuple, kwargs: dict) -> AsyncResult:
        """``task.delay(*args, **kwargs)``: as ``send_task(task.s(*args, **kwargs))``, with the
        envelope built from the task's template (see nbqueue.callpath)."""
        if task.cache is not False:     # a cached task: its key and the stored result (cache.py)
            return self.send_task(task.s(*args, **kwargs))
        fewest, most = task._arity
        if kwargs or not fewest <= len(args) <= most:
            task.check_arguments(args, kwargs)
        if self._inline is None:
            result = callpath.send(self, task, args, kwargs)    # plain arguments, no tracing: the common case
            if result is not None:
                return result
        with tracing.sending(task.name):
            with payloads.sending(self):        # values out of band: packed once, held until linked to the task
                message = callpath.call_message(self, task, args, kwargs, self.clock.time())
                if message is None:          # an argument JSON cannot carry: the Signature path names it
                    return self.send_task(task.s(*args, **kwargs))
                shipping.attach(self, task, message)
                record, out = self._recorded(message, None, None)
            if provenance._provider is not None:     # in a notebook: where it was sent from (provenance.py)
                provenance.stamp(task.s(), task, record)
            since = self.backend.wake_version()
            if not batching.hold(self, record, out):
                self.publish([record], [out])
        result = AsyncResult(out.id, self, name=task.name)
        result._sent_at_version = since if self._inline is None else None    # inline: final already
        return result

    def batch(self) -> "batching.SendBatch":
        """``with app.batch():`` the single sends of this thread inside the block
        (``.delay()``, ``apply_async()``, ``send_task``) are written together when it ends,
        in one transaction or round trip (on RabbitMQ, confirms pipelined): durably queued
        once the block exits. If the block raises, none of them is sent. See nbqueue.batching."""
        return batching.SendBatch(self)

    def send_many(self, signatures: Iterable[Signature]) -> list[AsyncResult]:
        """Send many independent tasks in one write (faster than a loop of send_task)."""
        sigs = list(signatures)
        for sig in sigs:
            task = self.registry.get(sig.name)
            if task is not None:
                task.check_arguments(sig.args, sig.kwargs)
        with tracing.sending(sigs[0].name if len({s.name for s in sigs}) == 1 else "many", len(sigs)):
            with payloads.sending(self):        # an object sent to many tasks is packed and stored once
                prepared = [self.prepare(s) for s in sigs]
            self.publish([p[1] for p in prepared], [p[2] for p in prepared])
        return [AsyncResult(p[2].id, self, name=s.name) for s, p in zip(sigs, prepared)]

    def send(self, item: Any):
        """Send a Signature, group, chain or chord; returns the matching result object."""
        from . import workflow

        if isinstance(item, Signature):
            return self.send_task(item)
        with tracing.sending(type(item).__name__):
            return self._run_inline(workflow.send(self, item))

    def send_group(self, group, concurrency: int = 0):
        from . import workflow

        with tracing.sending("group"):
            return self._run_inline(workflow.send_group(self, group, concurrency=concurrency))

    def send_chain(self, chain):
        from . import workflow

        with tracing.sending("chain"):
            return self._run_inline(workflow.send(self, chain))

    def send_chord(self, chord, concurrency: int = 0):
        from . import workflow

        with tracing.sending("chord"):
            return self._run_inline(workflow.send_chord(self, chord, concurrency=concurrency))

    def _run_inline(self, result):
        """Inline mode: run what a workflow send published before returning its result."""
        if self._inline is not None:
            self._inline.after_publish([])
        return result

    # -- results ------------------------------------------------------------------------
    def result(self, task_id: str) -> AsyncResult:
        """The AsyncResult of any task id, also one sent before a kernel restart."""
        return AsyncResult(task_id, self)

    def states_of(self, ids: Iterable[str]) -> dict[str, str]:
        """The state of each of the task ids that has a record, from one query (ids without a record are left out)."""
        return self.backend.states_of(list(ids))

    def tasks(self, state: str | None = None, name: str | None = None, limit: int | None = None):
        """Every recorded task as a pandas DataFrame, newest first (``runtime`` in seconds), with
        where each came from: ``notebook``, ``cell``, ``code_hash``, ``cached_from`` (provenance.py)."""
        from .frames import records_frame

        records = self.backend.list(state=state, name=name, limit=None if limit is None else limit + 64)
        records = [r for r in records if r.get("name") != "nbqueue.group" or name == "nbqueue.group"]
        records = records[:limit] if limit is not None else records
        return provenance.add_columns(records_frame(self, records), records)

    def reattach(self, notebook: str | None = None) -> list:
        """After a kernel restart: the results of what this notebook (its file, or ``notebook``)
        sent from earlier kernels that is still running or finished since it was last seen,
        shown as live views when a notebook displays the list (provenance.py)."""
        return provenance.reattach(self, notebook)

    # -- browsing and operating (what the dashboard uses; all public) ----------------------
    def find_tasks(self, *, state=None, name=None, queue=None, since: float | None = None, until: float | None = None,
                   text: str | None = None, offset: int = 0, limit: int = 50) -> list[dict]:
        """A page of task records (dicts with the fields of ``nbqueue.backend.FIELDS``;
        ``args``, ``kwargs`` and ``result`` as their JSON text), newest first, without loading
        the others. Filters: ``state``, ``name``, ``queue`` (a value or a list of values),
        ``since <= created_at < until`` (Unix seconds), ``text``: a case-insensitive
        substring of the arguments (their JSON text) or of the error and traceback."""
        return self.backend.search(
            state=state, name=name, queue=queue, since=since, until=until, text=text, offset=offset, limit=limit
        )

    def count_tasks(self, *, state=None, name=None, queue=None, since: float | None = None, until: float | None = None,
                    text: str | None = None) -> dict[tuple[str, str], int]:
        """How many task records match the filters of ``find_tasks``, by ``(state, name)``."""
        return self.backend.counts(state=state, name=name, queue=queue, since=since, until=until, text=text)

    def workflow(self, task_id: str, members: int | None = 200) -> dict | None:
        """The workflow a task belongs to, as a tree of nodes: ``{"kind": "task", "id", "name",
        "state"}``, ``{"kind": "chain", "steps": [...]}``, ``{"kind": "group", "id", "state",
        "members": [...], "more": n}`` (at most ``members`` members of a group listed, None:
        all; ``more`` the rest). A chord is a chain of its group and its callback. None for a
        task sent on its own (or before workflows recorded their shape). Raises KeyError for
        an unknown id."""
        record = self.backend.get(task_id)
        if record is None:
            raise KeyError(f"no task with id {task_id!r}")
        seen = {task_id}
        while record.get("parent_id"):      # chain steps point at the step before, members at their group
            parent = self.backend.get(record["parent_id"])
            if parent is None or parent["id"] in seen:
                break
            seen.add(parent["id"])
            record = parent
        shape = (serialization.loads(record["meta"]) if record.get("meta") else {}).get("workflow")
        if shape is None:
            return None
        return _workflow_tree(self.backend, shape, members)

    def retry_task(self, task_id: str) -> AsyncResult:
        """Send a failed or revoked task again, as a new task with the same name, arguments
        and queue (its record's ``meta`` says ``retry_of``); what followed the old one in a
        workflow is not resumed. Raises KeyError for an unknown id, ValueError for a task in
        another state or one whose arguments were never recorded."""
        record = self.backend.get(task_id)
        if record is None:
            raise KeyError(f"no task with id {task_id!r}")
        if record["state"] not in (states.FAILURE, states.REVOKED) or record.get("name") in (None, "nbqueue.group"):
            raise ValueError(f"task {task_id} is {record['state']}: only a failed or revoked task can be retried")
        if record.get("args") is None:
            raise ValueError(
                f"task {task_id} has no recorded arguments (its message could not be read); it cannot be sent again"
            )
        args = [self.serializer.decode(a) for a in serialization.loads(record["args"])]
        kwargs = {k: self.serializer.decode(v) for k, v in serialization.loads(record.get("kwargs") or "{}").items()}
        sig = self.signature(record["name"], args=args, kwargs=kwargs, queue=record.get("queue"))
        with tracing.sending(sig.name):
            message, new, out = self.prepare(sig, meta={"retry_of": task_id})
            self.publish([new], [out])
        return AsyncResult(out.id, self, name=sig.name)

    def redrive(self, queue: str | None = None, limit: int = 100) -> dict:
        """Send dead letters of ``queue`` (None: every queue) again, at most ``limit`` of them,
        as new tasks (same name, arguments and options; what followed them in a workflow is
        not resumed), and remove them from the dead letters in the same transaction where
        broker and backend share one. Returns ``{"sent": [AsyncResult], "kept": [{"id",
        "queue", "reason"}]}``: a dead letter whose body cannot be read as a message is kept."""
        from .errors import MessageError
        from .message import Message
        from .signature import signature_from_message

        sent, kept, prepared = [], [], []
        for letter in self.broker.dead_letters(queue, limit=limit):
            try:
                sig = signature_from_message(Message.decode(letter["body"] or ""), self.serializer)
            except (MessageError, serialization.SerializationError, ValueError, KeyError, TypeError) as exc:
                kept.append({"id": letter["id"], "queue": letter["queue"], "reason": f"not a readable message: {exc}"})
                continue
            sig = sig.replace(id=None, workflow=None, group_id=None, queue=letter["queue"])
            prepared.append((letter, *self.prepare(sig, meta={"redriven_from": letter["id"]})))
        with tracing.sending("redrive", len(prepared)), self.transaction():
            self.publish([p[2] for p in prepared], [p[3] for p in prepared])
            by_queue: dict[str, list[str]] = {}
            for letter, *_ in prepared:
                by_queue.setdefault(letter["queue"], []).append(letter["id"])
            for name, ids in by_queue.items():
                self.broker.remove_dead_letters(name, ids)
        sent = [AsyncResult(p[3].id, self, name=p[1]["name"]) for p in prepared]
        return {"sent": sent, "kept": kept}

    def revoke(self, task_id: str, reason: str = "revoked", *, terminate: bool = False) -> bool:
        """Cancel a task that has not finished; True when this call did, False (nothing
        changes) for an unknown id, a finished task, or one revoked already.

        A task not started (PENDING, delayed, RETRY, reserved by a worker) never runs. A
        running one is recorded REVOKED now; with ``terminate`` it is also stopped: in a
        process pool its child is stopped (SIGTERM, SIGKILL after a short grace) and
        replaced, in a thread it is asked to stop (``current_task().cancelled``,
        ``nbqueue.check_cancelled()``); without it, it runs on and its result is
        discarded. Workers in any process notice within about a second (see
        nbqueue.control). The workflow it belongs to ends as for a failure, with
        ``TaskRevoked``: a chord whose member is revoked fails and fires its callback's
        error callbacks, the rest of a chain is recorded REVOKED (not run).
        """
        from . import control

        revoked = control.revoke(self, task_id, reason, terminate=terminate)
        if revoked:
            for worker in self.workers:
                worker.note_revoked(task_id)
        return revoked

    def cancel_all(self, reason: str = "cancelled", *, ids=None, unlisted=None) -> int:
        """Cancel (``revoke(terminate=True)``) every task not finished yet: those of ``ids``,
        else every one the result backend lists; a backend that cannot list (such as AMQP
        results) cancels those of ``unlisted`` instead (none when None). How many were cancelled."""
        from . import control

        if ids is None and self.backend.lists_tasks == "none":
            ids = unlisted or []
        if ids is None:
            ids = [r["id"] for r in self.backend.list()
                   if r.get("state") not in states.READY_STATES and r.get("name") != "nbqueue.group"]
        return control.revoke_many(self, list(ids), reason, terminate=True)

    # -- workers --------------------------------------------------------------------------
    def worker(self, concurrency: int = 1, queues: str | Iterable[str] | None = None, **options: Any):
        from .worker import Worker

        return Worker(self, concurrency=concurrency, queues=queues, **options)

    def start_worker(self, concurrency: int = 1, queues: str | Iterable[str] | None = None, **options: Any):
        """Start a worker in daemon threads of this process; returns it at once.

        ``pool="processes"``: run tasks in ``concurrency`` child processes (CPU-bound work
        on every core; functions defined in the notebook are shipped to them by value),
        with ``max_tasks_per_child``, ``max_memory_per_child`` (KiB) and ``shutdown_grace``
        (s); ``allow_code=True``: also run functions shipped from other notebooks. An argument
        out of range is a ConfigurationError naming it, raised here before the stores are asked.
        """
        worker = self.worker(concurrency=concurrency, queues=queues, **options)
        self.check_stores(wait=STORE_CHECK_WAIT_S)
        worker.start()
        return worker

    def check_stores(self, wait: float | None = None) -> None:
        """Reach the broker and the backend once (``status()``) before a worker starts: a
        ConfigurationError (a refused login or vhost) goes up; a server not reachable yet is
        only logged, as the worker retries it. With ``wait`` (seconds), a check still going
        then (a server that does not answer) finishes in the background and logs its finding."""
        found: Future = Future()

        def check() -> None:
            try:
                found.set_result(self.status())
            except BaseException as exc:    # noqa: BLE001 - handed to the caller or logged
                found.set_exception(exc)

        checker = threading.Thread(target=check, name="nbqueue-check-stores", daemon=True)
        checker.start()
        checker.join(wait)          # an answer in time comes with the end of its thread
        try:
            found.result(timeout=0)
        except FutureTimeout:
            log.warning("no answer from the stores within %.0f s; the worker starts and retries", wait)
            found.add_done_callback(_log_store_problem)
        except ConfigurationError:
            raise
        except Exception as exc:    # noqa: BLE001 - a worker outlives a server that is not up yet
            log.warning("cannot reach the store yet (%s); the worker retries", exc)

    def _worker_started(self, worker) -> None:
        with self._lock:
            self._workers.append(worker)

    def _worker_stopped(self, worker) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)

    @property
    def workers(self) -> list:
        """Workers started from this App in this process."""
        return list(self._workers)

    def status(self) -> dict:
        """Queue depths per queue, the live workers (from their heartbeats) and the result
        cache (``{"size", "hits", "misses", "shared", "hit_rate"}``, see cache.py).

        A broker that cannot list its queues (RabbitMQ) is asked about this App's default
        queue, its tasks' queues and the queues live workers serve."""
        workers = self.backend.workers()
        if self.broker.capabilities.lists_queues:
            return {"queues": self.broker.stats(), "workers": workers, "cache": cache.stats(self)}
        known = [self.default_queue, *(t.options["queue"] for t in self.registry.values() if t.options.get("queue")),
                 *(q for w in workers for q in w.get("queues") or [])]
        return {
            "queues": self.broker.stats(queues=list(dict.fromkeys(known))),
            "workers": workers,
            "cache": cache.stats(self),
        }

    # -- the result cache (cache.py) --------------------------------------------------------
    def cache_clear(self, task: str | None = None) -> int:
        """Forget the result cache (of one task name or ``%%task`` label); how many entries
        went. The records stay; later sends run again."""
        return cache.clear(self, task)

    def cache_info(self, task_id: str) -> dict | None:
        """How the cache answered the send of ``task_id``: ``{"hit": True, "from": id}`` (the
        stored result of task ``id``), ``{"hit": False}`` (it ran), ``{"hit": False,
        "waiting_for": id}`` (it shares a run going on); None without the cache."""
        return cache.info(self, task_id)
    # -- end of the result cache ---------------------------------------------------------------

    def live_workers(self, max_age: float = 1.0) -> list[dict]:
        """The live workers on this App's store, from their heartbeats (as in ``status()``:
        worker_id, host, pid, concurrency, queues, tasks (the names it has registered),
        running, waiting, processed), read at most once per ``max_age`` seconds, since
        views and waiters ask often."""
        now = time.monotonic()
        cached = self._live_workers
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        workers = self.backend.workers()
        self._live_workers = (now, workers)
        return workers

    def purge(self, queue: str | None = None) -> int:
        """Remove every waiting message of ``queue`` (default: this App's default queue),
        ready and delayed (ETA, countdown, retries waiting); how many messages went.

        Each purged task is final afterwards: recorded REVOKED with the reason "purged from
        queue ..." (``get()`` raises ``TaskRevoked`` saying so), and the workflow it belongs
        to ends as on a revoke (see ``control.revoke_purged``, also for the brokers that
        cannot name every message they purge). Their payloads are released.
        """
        from . import control

        queue = queue or self.default_queue
        since = self.clock.time()
        purged = self.broker.purge_messages(queue)
        revoked = control.revoke_purged(self, queue, purged, since)
        try:        # the payloads only the purged messages needed
            payloads.release(self, revoked)
        except Exception:
            log.warning("purge: could not release the payloads of the purged tasks "
                        "(the sweep keeps them with their records)", exc_info=True)
        return purged.count

    def close(self) -> None:
        """Stop this App's workers and scheduler, and close its connections."""
        for worker in list(self._workers):
            worker.stop(wait=True, timeout=5)
        if self._schedules is not None and self._schedules.scheduler is not None:
            self._schedules.scheduler.stop()
        self.broker.close()
        self.backend.close()

    # -- periodic tasks: registrations here, the logic in schedule.py ----------------------
    def periodic(
        self, spec: str, target: Any, name: str | None = None, *, catch_up: bool = False, timezone: Any = None
    ):
        """Fire ``target`` (a signature, task, group, chain or chord; a fresh copy each time) on ``spec``.

        ``spec``: a 5-field cron expression, ``@hourly``/``@daily``/``@weekly``/``@monthly``/``@yearly``
        or ``@every 30s`` (units s, m, h, d: ``@every 1h30m``). Cron specs are read in ``timezone``
        (default: the App's ``timezone`` option, UTC). Runs missed while no scheduler was running are
        counted, not replayed; ``catch_up=True`` runs one late firing for them. Returns the Schedule.
        """
        from . import schedule

        return schedule.register(self, spec, target, name=name, catch_up=catch_up, timezone=timezone)

    def periodic_task(self, spec: str, name: str | None = None, *, catch_up: bool = False, timezone: Any = None,
                      args: Any = (), kwargs: dict | None = None, **task_options: Any):
        """``@app.periodic_task("0 9 * * *")``: register the function as a task and schedule it."""
        from . import schedule

        return schedule.periodic_task(
            self, spec, name=name, catch_up=catch_up, timezone=timezone, args=args, kwargs=kwargs, **task_options
        )

    def unschedule(self, name: str) -> bool:
        """Remove a schedule (and its saved state); True if there was one."""
        from . import schedule

        return schedule.unschedule(self, name)

    def schedules(self):
        """The schedules as a DataFrame: name, spec, timezone, next_run, last_run, last_state, missed, catch_up."""
        from . import schedule

        return schedule.schedules_frame(self)

    def scheduler(self):
        """This App's scheduler: ``.tick(now)`` fires what is due; ``.start()``/``.stop()`` run it in a thread."""
        from . import schedule

        return schedule.scheduler(self)

    def __repr__(self) -> str:
        from .urls import redact

        return (
            f"<nbqueue.App broker={redact(self.broker_url)} backend={redact(self.backend_url)} "
            f"tasks={len(self.registry)}>"
        )


def _workflow_tree(backend, shape, limit: int | None) -> dict:
    """``App.workflow``'s tree from a workflow's recorded shape (see ``workflow.graph``),
    listing at most ``limit`` members of each group (None: all)."""
    ids: list[str] = []

    def collect(node) -> None:
        if isinstance(node, str):
            ids.append(node)
        elif "chain" in node:
            for step in node["chain"]:
                collect(step)
        else:
            ids.append(node["group"])
            if node.get("members") is None:
                info = backend.group_info(node["group"]) or {"members": []}
                node["members"] = info["members"]
            for member in node["members"][:limit]:
                collect(member)

    collect(shape)
    records = {r["id"]: r for r in backend.get_many(ids) if r is not None}

    def build(node) -> dict:
        if isinstance(node, str):
            rec = records.get(node) or {}
            return {"kind": "task", "id": node, "name": rec.get("name"), "state": rec.get("state")}
        if "chain" in node:
            return {"kind": "chain", "steps": [build(step) for step in node["chain"]]}
        rec = records.get(node["group"]) or {}
        members = node["members"]
        shown = members[:limit]
        return {"kind": "group", "id": node["group"], "state": rec.get("state"),
                "members": [build(m) for m in shown], "more": len(members) - len(shown)}

    return build(shape)
