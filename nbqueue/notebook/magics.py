"""``%load_ext nbqueue``: the ``%%task`` cell magic and the ``%nbqueue`` line magic.

Loading the extension uses the notebook's App (the ``app`` variable, if it holds an
``nbqueue.App``, else the only App in the namespace; otherwise it creates ``App()`` on
the embedded SQLite default and binds it to ``app``) and starts a worker in threads of
this kernel, with ``allow_cells=True`` (it is the user's own kernel), listening on the
App's default queue and on a queue of this kernel's own.

Which App the magics use is always said, never silently kept: an App created by a later
cell (``app = nbqueue.App("redis://...")`` after ``%load_ext nbqueue``, or re-running
``app = nbqueue.App()``) becomes the one ``%%task``, ``%nbqueue`` and this kernel's
worker use, and that cell prints so once. When one cell creates several, the one named
``app`` wins (else the magics keep theirs and say how to choose). ``%nbqueue use NAME``
picks the App held in variable NAME explicitly; after that, new Apps no longer switch it
(a line says so). Switching moves the kernel's worker to the new App (it keeps running
or stopped as it was); tasks sent before keep their own App.

``%%task [NAME] [-o VAR] [--queue Q] [--retry-count N] [--after NAME_OR_VAR ...]``
runs the cell body as a task and returns at once with a live view of it.

- The variables the cell reads are captured when it is submitted (see cellvars.py):
  values are encoded with the App's serializer, modules and importable functions
  become imports, and anything else (functions defined in the notebook, objects the
  serializer cannot encode) is passed live, deep-copied when possible, to this
  kernel's worker. Changing a variable afterwards does not change the submitted cell.
- Where it runs: without ``--queue``, on this kernel's worker (its own queue) while
  that worker runs; with ``--queue Q``, or after ``%nbqueue worker stop``, on whichever
  worker serves the queue (``nbqueue worker --allow-cells``). A cell that must leave
  the kernel and reads something that cannot is refused at once, naming the variable.
- The value of the cell's last expression is the task's result; ``-o VAR`` binds it
  to VAR in the notebook once the task succeeds.
- ``--after A B`` sends the cell only when the cell tasks (or results held in
  variables) A and B have succeeded; if one fails the cell is recorded REVOKED and
  never runs. A variable the cell reads that is the ``-o`` output of one of them gets
  that task's result, not the value it had when the cell was submitted.
- Re-running a cell (same NAME, else same ``-o`` VAR, else the same notebook cell)
  replaces its earlier task, revoking it if it has not finished.

Thread safety of ``-o``: VAR is assigned exactly once per run, by whichever comes
first: the view-updater thread when it sees SUCCESS (a plain dict assignment into
the user namespace), or the kernel's main thread just before the next cell executes
(IPython's ``pre_run_cell`` event) or in ``%nbqueue wait``. A cell that is running
at that instant may see the old or the new value; a cell started after the task
finished always sees the new one. A failed or replaced run binds nothing. When the
cell ran in this kernel, VAR is the very object the cell computed; from another
process it is the decoded result.

``%%task ... --cache [EXPIRY]`` reuses the stored result of the same source with the same
values of the variables it reads (see nbqueue/cache.py), from any kernel on the store.

``%nbqueue status | tasks [--state S] [--name N] [--limit L] | worker start [-c N] |
worker stop | wait [NAME ...] [--timeout T] | use [NAME] | export [-o FILE] | reattach``
(export: see export.py; reattach: provenance.py). While the extension is loaded, every
send records its notebook, cell and code hash (provenance.py).

After a kernel restart, earlier results are still in the store and a task that was
running in the dead kernel is delivered again once its lease runs out; define (or
import) your tasks before ``%load_ext nbqueue``, since a worker fails a task name it
does not know. ``%%task`` cells that had not run yet were on the dead kernel's own
queue and stay PENDING (their kernel-only objects are gone): run the cell again.
"""
from __future__ import annotations

import builtins
import dataclasses
import hashlib
import os
import threading
import uuid
import weakref
from typing import Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .. import builtin, payloads, provenance, serialization, states
from .. import cache as _cache
from ..canvas import Signature
from ..errors import SerializationError
from ..result import AsyncResult
from ..signature import new_id
from . import cellvars, taskargs, widgets

DEFAULT_CONCURRENCY = 4


@dataclasses.dataclass
class CellRun:
    key: str
    label: str
    task_id: str
    var: str | None
    queue: str
    deps: list[str]                     # task ids this run waits for
    dep_labels: list[str]
    deferred: dict[str, str]            # name the cell reads -> task id whose result it gets
    result: "CellTask | None" = None
    waiting: bool = False               # not sent yet: its dependencies are not done
    cancelled: bool = False
    bound: bool = False
    watches: list = dataclasses.field(default_factory=list)


class CellTask(AsyncResult):
    """The AsyncResult of a ``%%task`` cell; its view shows the cell's name and what it waits for."""

    def __init__(self, task_id: str, app, run: CellRun):
        super().__init__(task_id, app, name=builtin.CELL_TASK)
        self.run = run

    @property
    def label(self) -> str:
        return self.run.label

    def view_note(self, state: str) -> str:
        """What the view says beside the state: what the cell waits for, or where its value goes."""
        run = self.run
        if run.waiting and state == states.PENDING:
            return "waiting for " + ", ".join(run.dep_labels)
        if run.var and state == states.SUCCESS:
            return f"→ {run.var}"
        return ""

    def snapshot(self, *, diagnose: bool = True) -> dict:
        """``AsyncResult.snapshot`` labelled with the cell's name and noting what it waits for."""
        snap = super().snapshot(diagnose=diagnose and not self.run.waiting)
        snap["label"] = self.label
        snap["note"] = self.view_note(snap["state"]) or snap["note"]
        return snap

    def __repr__(self) -> str:
        return f"<CellTask {self.label} {self.id} {self.state}>"


@magics_class
class NbqueueMagics(Magics):
    def __init__(self, shell, app, *, concurrency: int = DEFAULT_CONCURRENCY, start_worker: bool = True):
        super().__init__(shell)
        self.app = app
        self.kernel_queue = _kernel_queue(app)
        self.kernel_worker = None
        self.runs: dict[str, CellRun] = {}
        self._lock = threading.RLock()
        self._closed = False
        self.pinned = False                       # chosen with %nbqueue use: new Apps do not switch it
        self._seen_apps: weakref.WeakSet = weakref.WeakSet(_apps_in(shell))
        self._seen_apps.add(app)
        if start_worker:
            self.start_worker(concurrency)

    # -- which App -------------------------------------------------------------------------------
    def use(self, app, label: str | None = None, *, pinned: bool = True) -> None:
        """Make ``app`` the App of %%task, %nbqueue and the kernel's worker; prints what changed."""
        from ..app import App

        if not isinstance(app, App):
            raise UsageError(f"%nbqueue use: {label or app!r} is a {type(app).__name__}, not an nbqueue.App")
        self.pinned = self.pinned or pinned
        self._seen_apps.add(app)
        name = f"`{label}` = " if label else ""
        if app is self.app:
            print(f"nbqueue: %%task, %nbqueue and this kernel's worker use {name}{app!r}")
            return
        old, was_running = self.app, self.worker_running
        concurrency = self.kernel_worker.concurrency if was_running else None
        self.stop_worker(wait=False)
        self.app = app
        self.kernel_queue = _kernel_queue(app)
        where = "no worker runs in this kernel"
        if was_running:
            worker = self.start_worker(concurrency)
            where = f"this kernel's worker moved to it ({worker.concurrency} threads)"
        how = "" if pinned else "; `%nbqueue use NAME` picks another"
        print(f"nbqueue: %%task and %nbqueue now use {name}{app!r} (was {old!r}); {where}{how}")

    def follow_new_apps(self, *_args) -> None:
        """post_run_cell: an App the cell created becomes the magics' App (see the module docstring)."""
        if self._closed or self.shell is None:
            return
        new = [(n, a) for n, a in _named_apps(self.shell) if a not in self._seen_apps]
        if not new:
            return
        for _, a in new:
            self._seen_apps.add(a)
        names = ", ".join(f"`{n}`" for n, _ in new)
        if self.pinned:
            print(f"nbqueue: new App {names}; %%task and %nbqueue keep using {self.app!r} "
                  f"(chosen with %nbqueue use; `%nbqueue use NAME` switches)")
            return
        chosen = next(((n, a) for n, a in new if n == "app"), new[0] if len({id(a) for _, a in new}) == 1 else None)
        if chosen is None:
            print(f"nbqueue: new Apps {names}; %%task and %nbqueue keep using {self.app!r}: "
                  "`%nbqueue use NAME` picks one")
            return
        self.use(chosen[1], chosen[0], pinned=False)

    # -- the kernel's worker ------------------------------------------------------------------------
    @property
    def worker_running(self) -> bool:
        return self.kernel_worker is not None and self.kernel_worker.running

    def start_worker(self, concurrency: int | None = None):
        if self.worker_running:
            if concurrency is None or concurrency == self.kernel_worker.concurrency:
                return self.kernel_worker
            self.stop_worker()
        self.kernel_worker = self.app.start_worker(
            concurrency=concurrency or DEFAULT_CONCURRENCY, queues=[self.app.default_queue, self.kernel_queue],
            allow_cells=True, prefetch=1, heartbeat_interval=0.5, unknown_grace=KERNEL_UNKNOWN_GRACE)
        return self.kernel_worker

    def stop_worker(self, wait: bool = False) -> None:
        worker, self.kernel_worker = self.kernel_worker, None
        if worker is None:
            return
        worker.stop(wait=wait, timeout=10 if wait else None)
        if not wait:  # joining removes its heartbeat record; do it off the kernel's thread
            threading.Thread(target=worker.join, name="nbqueue-worker-join", daemon=True).start()

    # -- provenance (nbqueue/provenance.py) ------------------------------------------------------------
    def provenance(self) -> dict:
        """Where a send comes from: this notebook and the cell running now."""
        return {"notebook": provenance.notebook_of(self.shell), "cell": getattr(self.shell, "execution_count", None)}

    def mark_seen(self, *_args) -> None:
        """post_run_cell: what this kernel sent has been in its views until now (throttled)."""
        if self._closed:
            return
        try:
            provenance.mark_seen(self.app, provenance.notebook_of(self.shell), every=provenance.MARK_EVERY)
        except Exception:
            pass

    def close(self) -> None:
        """Stop the kernel's worker and forget pending work (``%unload_ext``, tests)."""
        self._closed = True
        provenance.disable(self.provenance)
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            for w in run.watches:
                w.cancelled = True
        self.stop_worker(wait=True)

    # -- %%task ----------------------------------------------------------------------------------------
    @taskargs.task_options
    @cell_magic
    def task(self, line: str, cell: str):
        """Run the cell as a task; returns at once with a live view of it."""
        args = taskargs.parse(line)
        return self.submit(cell, name=args.name, var=args.var, queue=args.queue, retry_count=args.retry_count,
                           after=args.after, cache=args.cache)

    def submit(self, cell: str, *, name: str | None = None, var: str | None = None, queue: str | None = None,
               retry_count: int = 0, after: list[str] | tuple = (), cache=False) -> CellTask:
        """Send ``cell`` as a task (once the ``after`` tasks succeeded); see the module docstring."""
        if var is not None and not var.isidentifier():
            raise UsageError(f"-o {var!r}: not a valid variable name")
        try:
            expires = _cache.policy(cache)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"%%task --cache: {exc}") from None
        source = self.shell.transform_cell(cell) if self.shell is not None else cell
        reads = cellvars.free_names(source)      # a SyntaxError shows as in any cell
        key = name or var or self._cell_id() or "src:" + hashlib.sha1(source.encode()).hexdigest()[:12]
        label = name or var or "cell"
        deps, dep_labels, dep_runs = self._resolve_after(after)
        deferred = {r.var: r.task_id for r in dep_runs if r.var and r.var in reads}
        local_ok = queue is None and self.worker_running
        target_queue = queue or (self.kernel_queue if local_ok else self.app.default_queue)
        task_id = new_id()
        with payloads.sending(self.app, owner=task_id):     # inputs stored out of band belong to the cell's task
            captured = self._capture(reads, label, queue, local_ok, skip=set(deferred))
        self._warn_stale_reads(reads, deps, deferred)

        run = CellRun(key=key, label=label, task_id=task_id, var=var, queue=target_queue, deps=deps,
                      dep_labels=dep_labels, deferred=deferred)
        run.result = CellTask(run.task_id, self.app, run)
        with builtin._live_lock:
            builtin.LIVE[run.task_id] = captured.local      # also marks the cell as ours, for -o's live value
        self._replace(key, run)

        def send(inputs: dict) -> None:
            kwargs = builtin.cell_kwargs(self.app, source=source, inputs=inputs, imports=captured.imports,
                                         local=list(captured.local), label=label)
            sig = Signature(
                builtin.CELL_TASK,
                kwargs=kwargs,
                id=run.task_id,
                queue=target_queue,
                retry_count=retry_count,
                app=self.app,
            )
            if expires is False:
                self.app.send_task(sig)
            else:
                _send_cached_cell(self.app, sig, expires, source, inputs, captured)

        if deps:
            self._send_after_dependencies(run, source, captured.inputs, send)
        else:
            send(dict(captured.inputs))
        self._watch_finish(run)
        return run.result

    def _capture(self, reads: list[str], label: str, queue: str | None, local_ok: bool, skip: set[str]):
        """The values of the names the cell reads (cellvars.capture); a value that cannot go where
        the cell goes is a UsageError naming it."""
        # IPython puts its own versions of some builtins (open, exit, quit) in the namespace:
        # the worker has the real ones
        hidden = getattr(self.shell, "user_ns_hidden", {}) or {}
        namespace = self.shell.user_ns
        ipython_builtins = {n for n in reads if n in vars(builtins) and n in hidden and hidden[n] is namespace.get(n)}
        try:
            return cellvars.capture(reads, namespace, self.app.serializer, allow_local=local_ok,
                                    skip=skip | ipython_builtins)
        except SerializationError as exc:
            where = f"queue {queue!r}" if queue else "the App's workers (this kernel's worker is stopped)"
            raise UsageError(f"%%task {label}: {exc} [the cell goes to {where}]") from None

    def _send_after_dependencies(self, run: CellRun, source: str, inputs: dict, send: Callable[[dict], None]) -> None:
        """Record the cell now (PENDING, so views and app.tasks() show it while it waits) and send it
        from the updater thread once every dependency is final."""
        run.waiting = True
        placeholder = Signature(builtin.CELL_TASK, id=run.task_id, queue=run.queue,
                                kwargs={"label": run.label, "source": source, "after": run.dep_labels})
        _, record, _ = self.app.prepare(placeholder)
        self.app.backend.create([record])
        run.watches.append(widgets.UPDATER.watch(self.app, run.deps,
                                                 lambda found: self._dependencies_done(run, inputs, send, found)))

    def _watch_finish(self, run: CellRun) -> None:
        """Once the run is final (updater thread): ``_finished``."""
        run.watches.append(widgets.UPDATER.watch(self.app, [run.task_id], lambda found: self._finished(run, found)))

    def _cell_id(self) -> str | None:
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None:
            return None
        try:
            cell_id = ((kernel.get_parent() or {}).get("metadata") or {}).get("cellId")
        except Exception:
            return None
        return f"cell:{cell_id}" if cell_id else None

    def _run_named(self, ref: str) -> CellRun | None:
        """The run whose ``-o`` variable or label is ``ref`` (the caller holds the lock)."""
        return next((r for r in self.runs.values() if r.var == ref or r.label == ref), None)

    def _resolve_after(self, after) -> tuple[list[str], list[str], list[CellRun]]:
        deps, labels, runs = [], [], []
        for ref in after:
            with self._lock:
                run = self.runs.get(ref) or self._run_named(ref)
            if run is not None:
                deps.append(run.task_id)
                labels.append(run.label)
                runs.append(run)
                continue
            value = self.shell.user_ns.get(ref)
            terminal = getattr(value, "terminal_id", None) or (value.id if isinstance(value, AsyncResult) else None)
            if terminal is None:
                raise UsageError(f"--after {ref}: no %%task named {ref!r} in this kernel, "
                                 f"and no variable {ref!r} holding a result")
            deps.append(terminal)
            labels.append(ref)
        return deps, labels, runs

    def _warn_stale_reads(self, reads: list[str], deps: list[str], deferred: dict) -> None:
        with self._lock:
            pending = [r for r in self.runs.values() if r.var in reads and r.var not in deferred and not r.cancelled
                       and not r.bound and r.task_id not in deps]
        for r in pending:
            if not r.result.ready():
                print(f"nbqueue: this cell reads {r.var!r}, the output of cell task {r.label!r}, "
                      f"which has not finished; it gets the current value of {r.var!r}. "
                      f"Add --after {r.label} to wait for it.")

    def _replace(self, key: str, run: CellRun) -> None:
        with self._lock:
            old = self.runs.get(key)
            self.runs[key] = run
        if old is None:
            return
        old.cancelled = True
        for w in old.watches:
            w.cancelled = True
        if not old.result.ready():
            self.app.revoke(old.task_id, reason=f"replaced: the cell {old.label!r} was run again")
        builtin.forget_live(old.task_id)

    def _dependencies_done(self, run: CellRun, inputs: dict, send, found: dict) -> None:
        """Updater thread: every dependency is final; send the cell or record why it never runs."""
        if run.cancelled or self._closed:
            return
        failed = [(label, found[i]) for i, label in zip(run.deps, run.dep_labels) if found.get(i) != states.SUCCESS]
        if failed:
            what = ", ".join(f"{label} {state}" for label, state in failed)
            self.app.backend.store_result(run.task_id, states.REVOKED, exc_type="DependencyFailed",
                                          error=f"not run: --after {what}", traceback=None)
            run.waiting = False
            builtin.forget_live(run.task_id)
            return
        inputs = dict(inputs)
        if run.deferred:
            records = dict(zip(run.deferred.values(), self.app.backend.get_many(list(run.deferred.values()))))
            for name, dep_id in run.deferred.items():
                text = (records.get(dep_id) or {}).get("result")
                inputs[name] = serialization.loads(text) if text is not None else None
        try:
            send(inputs)
        except Exception as exc:  # e.g. the store went away: record it where the user looks
            self.app.backend.store_result(run.task_id, states.FAILURE, exc_type=type(exc).__name__,
                                          error=f"could not send the cell: {exc}")
        run.waiting = False

    def _finished(self, run: CellRun, found: dict) -> None:
        """Updater thread: the run is final; bind -o on success, forget the run's live objects."""
        if run.var and found.get(run.task_id) == states.SUCCESS:
            self._bind(run)
        builtin.forget_live(run.task_id)

    def _bind(self, run: CellRun) -> bool:
        with self._lock:
            if run.bound or run.cancelled or self._closed or not run.var or self.runs.get(run.key) is not run:
                return False
            with builtin._live_lock:
                has_live = run.task_id in builtin.LIVE_RESULTS
                value = builtin.LIVE_RESULTS.get(run.task_id)
            if not has_live:
                value = run.result.get(timeout=5)
            self.shell.user_ns[run.var] = value
            run.bound = True
            return True

    def bind_finished(self, *_args) -> None:
        """pre_run_cell: bind the -o outputs of runs that finished since the last cell."""
        with self._lock:
            todo = [r for r in self.runs.values() if r.var and not r.bound and not r.cancelled and not r.waiting]
        if not todo:
            return
        try:
            found = self.app.states_of(r.task_id for r in todo)
        except Exception:
            return
        for run in todo:
            if found.get(run.task_id) == states.SUCCESS:
                try:
                    self._bind(run)
                except Exception:
                    pass

    # -- %nbqueue ----------------------------------------------------------------------------------
    @line_magic
    def nbqueue(self, line: str):
        """%nbqueue status | tasks [--state S] [--name N] [--limit L] | worker start [-c N] | worker stop |
        wait [NAME ...] [--timeout T] | cancel ID [ID ...] | cancel --all | use [NAME] | export [-o FILE] |
        dashboard [--port P] [--height H] [stop] | reattach"""
        import argparse
        import shlex

        parser = argparse.ArgumentParser(prog="%nbqueue", add_help=False, exit_on_error=False)
        sub = parser.add_subparsers(dest="command")
        sub.add_parser("status", add_help=False, exit_on_error=False)
        t = sub.add_parser("tasks", add_help=False, exit_on_error=False)
        t.add_argument("--state", default=None)
        t.add_argument("--name", default=None)
        t.add_argument("--limit", type=int, default=None)
        w = sub.add_parser("worker", add_help=False, exit_on_error=False)
        w.add_argument("action", choices=["start", "stop"])
        w.add_argument("-c", "--concurrency", type=int, default=None)
        wt = sub.add_parser("wait", add_help=False, exit_on_error=False)
        wt.add_argument("names", nargs="*")
        wt.add_argument("--timeout", type=float, default=None)
        c = sub.add_parser("cancel", add_help=False, exit_on_error=False)
        c.add_argument("ids", nargs="*")
        c.add_argument("--all", action="store_true")
        ex = sub.add_parser("export", add_help=False, exit_on_error=False)
        ex.add_argument("-o", "--output", default=None)
        sub.add_parser("reattach", add_help=False, exit_on_error=False)
        u = sub.add_parser("use", add_help=False, exit_on_error=False)
        u.add_argument("name", nargs="?", default=None)
        d = sub.add_parser("dashboard", add_help=False, exit_on_error=False)
        d.add_argument("action", nargs="?", choices=["stop"], default=None)
        d.add_argument("--port", type=int, default=None)
        d.add_argument("--height", type=int, default=600)
        try:
            args = parser.parse_args(shlex.split(line))
        except (argparse.ArgumentError, SystemExit) as exc:
            raise UsageError(f"%nbqueue {line}: {exc}\n{self.nbqueue.__doc__}") from None
        if args.command == "status":
            return self.status()
        if args.command == "tasks":
            state = args.state.upper() if args.state else None
            return self.app.tasks(state=state, name=args.name, limit=args.limit)
        if args.command == "worker":
            if args.action == "start":
                worker = self.start_worker(args.concurrency)
                print(f"nbqueue: worker {worker.name} running in this kernel: {worker.concurrency} thread(s), "
                      f"queues {', '.join(worker.queues)}")
            else:
                running = self.worker_running
                self.stop_worker(wait=False)
                print("nbqueue: this kernel's worker is stopping (running tasks finish first); %%task cells now "
                      f"go to queue {self.app.default_queue!r}" if running
                      else "nbqueue: no worker was running in this kernel")
            return None
        if args.command == "wait":
            self.wait(args.names, timeout=args.timeout)
            return None
        if args.command == "cancel":
            return self.cancel(args.ids, everything=args.all)
        if args.command == "export":
            from .export import magic_export

            return magic_export(self.shell, args.output)
        if args.command == "dashboard":
            return self.dashboard(args.action, args.port, args.height)
        if args.command == "reattach":
            return self.app.reattach(provenance.notebook_of(self.shell))
        if args.command == "use":
            if args.name is None:
                print(f"nbqueue: %%task, %nbqueue and this kernel's worker use {self.app!r}")
                return None
            if args.name not in self.shell.user_ns:
                raise UsageError(f"%nbqueue use {args.name}: no variable {args.name!r} in the notebook")
            self.use(self.shell.user_ns[args.name], args.name)
            return None
        raise UsageError(self.nbqueue.__doc__)

    def cancel(self, ids: list[str], *, everything: bool = False) -> int:
        """``%nbqueue cancel ID ...``: cancel those tasks (``AsyncResult.cancel``); ``--all``:
        every task of the App's result backend that has not finished (with a backend that
        cannot list tasks, those this kernel sent with %%task). Prints what happened per
        id; returns how many were cancelled."""
        if everything == bool(ids):
            raise UsageError("%nbqueue cancel: give task ids, or --all (not both)")
        if everything:
            known = [r.task_id for r in self.runs.values()]
            n = self.app.cancel_all("cancelled with %nbqueue cancel --all", unlisted=known)
            print(f"nbqueue: cancelled {n} task(s) that had not finished")
            return n
        n = 0
        for task_id in ids:
            state = self.app.states_of([task_id]).get(task_id)
            if state is None:
                print(f"nbqueue: {task_id}: no such task")
            elif self.app.revoke(task_id, "cancelled with %nbqueue cancel", terminate=True):
                n += 1
                print(f"nbqueue: {task_id}: cancelled")
            else:
                final = self.app.states_of([task_id]).get(task_id)
                print(f"nbqueue: {task_id}: already final ({final}); nothing changed")
        return n

    def dashboard(self, action: str | None = None, port: int | None = None, height: int = 600):
        """The web dashboard of this App, served on 127.0.0.1 by a daemon thread of this kernel
        (started once, kept across calls), shown in an IFrame; ``stop`` stops it; ``--port 0`` binds a free port."""
        from IPython.display import IFrame

        from .. import dashboard

        running = getattr(self, "_dashboard", None)
        if action == "stop":
            if running is not None:
                running.stop()
                self._dashboard = None
            print("nbqueue: dashboard stopped" if running is not None
                  else "nbqueue: no dashboard was running in this kernel")
            return None
        if running is not None and (running.server.should_exit or (port is not None and port != running.port)):
            running.stop()
            running = None
        if running is None:
            running = self._dashboard = dashboard.start(self.app, port=dashboard.DEFAULT_PORT if port is None else port)
            print(f"nbqueue: dashboard on {running.url} (`%nbqueue dashboard stop` stops it)")
        return IFrame(running.url, width="100%", height=height)

    def status(self):
        """Queue depths (with how many live workers serve each queue); live workers are displayed above."""
        import pandas as pd
        from IPython.display import display

        status = self.app.status()
        workers = pd.DataFrame(status["workers"])
        shown = ("worker_id", "host", "pid", "concurrency", "queues", "running", "processed", "last_seen")
        cols = [c for c in shown if c in workers.columns]
        workers = workers[cols] if len(workers) else pd.DataFrame(columns=list(shown[:-1]))
        if "last_seen" in workers.columns:
            workers["last_seen"] = pd.to_datetime(workers["last_seen"], unit="s", utc=True)
        queues = pd.DataFrame(status["queues"], columns=["queue", "ready", "delayed", "in_flight", "dead"])
        serving = {}
        for info in status["workers"]:
            for q in info.get("queues") or []:
                serving[q] = serving.get(q, 0) + 1
        extra = sorted(set(serving) - set(queues["queue"]))
        if extra:
            idle = pd.DataFrame({"queue": extra, "ready": 0, "delayed": 0, "in_flight": 0, "dead": 0})
            queues = pd.concat([queues, idle], ignore_index=True)
        queues["workers"] = queues["queue"].map(lambda q: serving.get(q, 0))
        queues = queues.astype({"queue": object, "ready": "int64", "delayed": "int64", "in_flight": "int64",
                                "dead": "int64", "workers": "int64"})      # the same types with no queue or worker yet
        display(workers)
        return queues

    def wait(self, names: list[str] | tuple = (), timeout: float | None = None) -> None:
        """Block (Ctrl-C interrupts) until the named cell tasks, or all of this kernel's, are done; bind their -o."""
        with self._lock:
            if names:
                missing = [n for n in names if n not in self.runs and self._run_named(n) is None]
                if missing:
                    raise UsageError(f"%nbqueue wait: no %%task named {', '.join(missing)} in this kernel")
                runs = [self.runs.get(n) or self._run_named(n) for n in names]
            else:
                runs = [r for r in self.runs.values() if not r.cancelled]
        for run in runs:
            run.result.get(timeout=timeout)     # raises TaskFailed / TimeoutError like any result
            self._bind(run)


def _send_cached_cell(app, sig: Signature, expires, source: str, inputs: dict, captured) -> None:
    """``%%task --cache``: the key is the cell's source, imports and live objects (their code), and
    the values of its inputs."""
    import warnings

    try:
        code = _cache.source_hash(source, imports=captured.imports, local=captured.local, serializer=app.serializer)
        values = _cache.inputs_text({"args": [], "kwargs": inputs}, None)
    except _cache.Unstable as exc:
        warnings.warn(f"the result cache is off for this cell: {exc}", _cache.CacheWarning, stacklevel=2)
        app.send_task(sig)
        return
    _cache.send(app, sig, expires, code=code, inputs=values)


# -- loading -----------------------------------------------------------------------------------------

_loaded: dict[int, NbqueueMagics] = {}


def _kernel_queue(app) -> str:
    return f"{app.default_queue}.kernel-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _named_apps(shell) -> list[tuple[str, object]]:
    """(name, App) for the user's variables holding an App (not IPython's ``_`` outputs)."""
    from ..app import App

    return [(n, v) for n, v in list(shell.user_ns.items()) if isinstance(v, App) and not n.startswith("_")]


def _apps_in(shell) -> list:
    return [a for _, a in _named_apps(shell)]


def _app_for(shell):
    from ..app import App

    app = shell.user_ns.get("app")
    if isinstance(app, App):
        return app
    others = {id(a): a for a in _apps_in(shell)}
    if len(others) == 1:
        return next(iter(others.values()))
    app = App()
    shell.user_ns["app"] = app
    return app


#: seconds a kernel's worker hands back tasks it does not know yet: after a restart, the
#: cells that define them may run after %load_ext nbqueue
KERNEL_UNKNOWN_GRACE = 120.0


def load_ipython_extension(shell, *, concurrency: int = DEFAULT_CONCURRENCY,
                           start_worker: bool = True) -> NbqueueMagics:
    """Register %%task and %nbqueue on ``shell``; uses (or creates) ``app`` and starts the kernel's worker."""
    previous = _loaded.pop(id(shell), None)
    if previous is not None:
        unload_ipython_extension(shell, previous)
    magics = NbqueueMagics(shell, _app_for(shell), concurrency=concurrency, start_worker=start_worker)
    shell.register_magics(magics)
    shell.events.register("pre_run_cell", magics.bind_finished)
    shell.events.register("post_run_cell", magics.follow_new_apps)
    shell.events.register("post_run_cell", magics.mark_seen)
    provenance.enable(magics.provenance)
    widgets.install_hooks(shell)
    _loaded[id(shell)] = magics
    where = (f"a worker runs in this kernel ({magics.kernel_worker.concurrency} threads)" if magics.worker_running
             else "no worker runs in this kernel")
    print(f"nbqueue: {magics.app!r}; {where}. %%task runs a cell as a task; %nbqueue status|tasks|worker|wait|use.")
    return magics


def unload_ipython_extension(shell, magics: NbqueueMagics | None = None) -> None:
    magics = magics or _loaded.pop(id(shell), None)
    if magics is None:
        return
    for event, hook in (("pre_run_cell", magics.bind_finished), ("post_run_cell", magics.follow_new_apps),
                        ("post_run_cell", magics.mark_seen)):
        try:
            shell.events.unregister(event, hook)
        except ValueError:
            pass
    magics.close()


def magics_of(shell=None) -> NbqueueMagics | None:
    """The loaded extension's state (tests and advanced use)."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    return _loaded.get(id(shell))
