"""AsyncResult: the handle a send returns, readable from any process and after a restart."""
from __future__ import annotations

import time
from typing import Any

from . import payloads, serialization, states
from .errors import TaskFailed, TaskRevoked


_UNREAD = object()


def failure_from_record(record: dict) -> TaskFailed:
    cls = TaskRevoked if record.get("state") == states.REVOKED else TaskFailed
    return cls(record["id"], record.get("exc_type"), record.get("error"), record.get("traceback"), name=record.get("name"))


def value_from_record(app, record: dict) -> Any:
    text = record.get("result")
    return None if text is None else app.serializer.decode(serialization.loads(text))


class AsyncResult:
    """The state and, once ready, the value or error of one task."""

    def __init__(self, task_id: str, app, *, name: str | None = None):
        self.id = task_id
        self.app = app
        self._name = name
        self._final: dict | None = None
        # the backend's wake-up version read before this task was sent (see wait_record)
        self._sent_at_version: int | None = None
        #: results of the on_success/on_error callbacks sent with this task (the one that runs finishes)
        self.callbacks: list[AsyncResult] = []
        self._value: Any = _UNREAD       # the decoded value, read once (a frame out of band is loaded once)

    # -- reading the record ---------------------------------------------------------------
    def info(self) -> dict:
        """The stored record (state, times, retries, worker, output, ...); {} before it exists."""
        if self._final is not None:
            return dict(self._final)
        record = self.app.backend.get(self.id)
        if record is None:
            return {}
        if record["state"] in states.READY_STATES:
            self._final = record
        return dict(record)

    @property
    def name(self) -> str | None:
        return self._name or self.info().get("name")

    @property
    def state(self) -> str:
        return self.info().get("state") or states.PENDING

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state in (states.FAILURE, states.REVOKED)

    @property
    def result(self) -> Any:
        """The value if it succeeded, else None (no waiting)."""
        record = self.info()
        return self._value_of(record) if record.get("state") == states.SUCCESS else None

    def _value_of(self, record: dict) -> Any:
        if self._final is None:
            return value_from_record(self.app, record)
        if self._value is _UNREAD:
            self._value = value_from_record(self.app, self._final)
        return self._value

    @property
    def error(self) -> str | None:
        record = self.info()
        if not record.get("error"):
            return None
        return f"{record.get('exc_type') or 'Error'}: {record['error']}"

    @property
    def traceback(self) -> str | None:
        return self.info().get("traceback")

    @property
    def retries(self) -> int:
        return self.info().get("retries") or 0

    @property
    def output(self) -> str:
        """What the task printed (stdout and stderr)."""
        return self.info().get("output") or ""

    # -- waiting ------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None, interval: float | None = None) -> bool:
        """Block until the task is ready; False if the timeout passed first."""
        return _wait_ids(self.app, [self.id], timeout)

    def get(self, timeout: float | None = None, interval: float | None = None) -> Any:
        """The task's value; raises TaskFailed (remote type, message, traceback) or TimeoutError.

        Ctrl-C interrupts the wait: the task itself goes on.
        """
        record = self._final or self._wait_record(timeout)
        if record is None:
            raise TimeoutError(f"task {self.name or ''} {self.id} not ready after {timeout}s (state {self.state})")
        if record["state"] == states.SUCCESS:
            return self._value_of(record)
        raise failure_from_record(record)

    def _wait_record(self, timeout: float | None) -> dict | None:
        since, self._sent_at_version = self._sent_at_version, None
        record = _in_slices(lambda t: self.app.backend.wait_record(self.id, timeout=t, since=since), timeout)
        if record is not None:
            self._final = record
        return record

    def revoke(self, reason: str = "revoked by user") -> bool:
        return self.app.revoke(self.id, reason)

    def forget(self) -> None:
        self.app.backend.forget([self.id])
        payloads.release(self.app, [self.id])      # the payloads only this record referenced go with it
        self._final = None
        self._value = _UNREAD

    def progress(self) -> dict:
        return self.app.backend.progress([self.id])

    # -- display ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<AsyncResult {self.name or ''} {self.id} {self.state}>"

    def _repr_html_(self) -> str:
        from .notebook.display import async_result_html

        return async_result_html(self)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """In a notebook: a live view (ipywidgets, or a text line without a widget frontend)."""
        from .notebook.display import mimebundle

        return mimebundle(self, include, exclude)

    def __eq__(self, other) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


def _in_slices(wait, timeout: float | None):
    """Call ``wait(seconds)`` in slices of at most 1 s until it returns something or the
    timeout passes (then None), so Ctrl-C is honoured promptly even on stores that block."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        slice_ = 1.0 if remaining is None else min(1.0, remaining)
        got = wait(slice_)
        if got:
            return got
        if remaining is not None and remaining <= slice_:
            return None


def _wait_ids(app, ids: list[str], timeout: float | None) -> bool:
    return bool(_in_slices(lambda t: app.backend.wait(ids, timeout=t), timeout))


def _leaves(result) -> list[AsyncResult]:
    """The task results inside a (possibly nested) result, in order."""
    if isinstance(result, AsyncResult):
        return [result]
    return [leaf for child in result.children for leaf in _leaves(child)]


class _WorkflowResult:
    """Shared behaviour of group, chain and chord results."""

    app: Any
    children: list

    @property
    def terminal_id(self) -> str:
        raise NotImplementedError

    def ready(self) -> bool:
        return self.app.backend.states_of([self.terminal_id]).get(self.terminal_id) in states.READY_STATES

    def wait(self, timeout: float | None = None) -> bool:
        return _wait_ids(self.app, [self.terminal_id], timeout)

    def successful(self) -> bool:
        return self.app.backend.states_of([self.terminal_id]).get(self.terminal_id) == states.SUCCESS

    def failed(self) -> bool:
        return self.app.backend.states_of([self.terminal_id]).get(self.terminal_id) in (states.FAILURE, states.REVOKED)

    @property
    def state(self) -> str:
        return self.app.backend.states_of([self.terminal_id]).get(self.terminal_id) or states.PENDING

    def leaves(self) -> list[AsyncResult]:
        return _leaves(self)

    def progress(self) -> dict:
        """Counts by state of every task inside, from one backend query."""
        return self.app.backend.progress([r.id for r in self.leaves()])

    def to_frame(self):
        """One row per task: args, state, result, error, runtime, retries."""
        from .frames import records_frame

        leaves = self.leaves()
        frame = records_frame(self.app, [r for r in self.app.backend.get_many([x.id for x in leaves]) if r is not None])
        order = {r.id: i for i, r in enumerate(leaves)}
        frame["position"] = frame["id"].map(order)
        return frame.sort_values("position").drop(columns="position").reset_index(drop=True)

    def _raise_failure(self) -> None:
        """Raise the error of the first task that failed (not of those merely not run)."""
        records = [r for r in self.app.backend.get_many([x.id for x in self.leaves()]) if r is not None]
        for rec in records:
            if rec["state"] == states.FAILURE:
                raise failure_from_record(rec)
        terminal = self.app.backend.get(self.terminal_id)
        raise failure_from_record(terminal or {"id": self.terminal_id, "state": states.FAILURE, "error": "unknown failure"})

    def get(self, timeout: float | None = None, interval: float | None = None) -> Any:
        """The workflow's value (a group's member values in order, a chain's last step's, a
        chord's callback's); raises the first task failure, or TimeoutError."""
        record = _in_slices(lambda t: self.app.backend.wait_record(self.terminal_id, timeout=t), timeout)
        if record is None:
            raise TimeoutError(f"{type(self).__name__} {self.terminal_id} not ready after {timeout}s")
        if record["state"] != states.SUCCESS:
            self._raise_failure()
        return self.app.serializer.decode(serialization.loads(record["result"]))

    def _repr_html_(self) -> str:
        from .notebook.display import workflow_html

        return workflow_html(self)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """In a notebook: a live view (ipywidgets, or a text line without a widget frontend)."""
        from .notebook.display import mimebundle

        return mimebundle(self, include, exclude)


class GroupResult(_WorkflowResult):
    """Members' results in group order."""

    def __init__(self, group_id: str, results: list, app):
        self.id = group_id
        self.results = results
        self.app = app

    @property
    def children(self) -> list:
        return self.results

    @property
    def terminal_id(self) -> str:
        return self.id

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, i):
        return self.results[i]

    def member_ids(self) -> list[str]:
        """The id holding each member's result (a chain's last step, a nested group's own id)."""
        return [r.id if isinstance(r, AsyncResult) else r.terminal_id for r in self.results]

    def completed_count(self) -> int:
        """How many members succeeded (a member that is a chain counts once, when its last step did)."""
        found = self.app.backend.states_of(self.member_ids())
        return sum(1 for state in found.values() if state == states.SUCCESS)

    def ready(self) -> bool:
        """True once every member has finished (succeeded, failed, or was not run).

        A failed member makes the group's record FAILURE at once, and ``get()`` raises
        then; the group is ready only when the other members are done too.
        """
        ids = [self.id] + self.member_ids()
        found = self.app.backend.states_of(ids)
        return all(found.get(i) in states.READY_STATES for i in ids)

    def progress(self) -> dict:
        if all(isinstance(r, AsyncResult) for r in self.results):
            return self.app.backend.progress(group_id=self.id)
        return self.app.backend.progress([r.id for r in self.leaves()])

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} {len(self.results)} members {self.state}>"


class ChainResult(_WorkflowResult):
    """The steps' results; ``get()`` is the last step's value."""

    def __init__(self, results: list, app):
        self.results = results
        self.app = app

    @property
    def id(self) -> str:
        return self.terminal_id

    @property
    def children(self) -> list:
        return self.results

    @property
    def terminal_id(self) -> str:
        last = self.results[-1]
        return last.id if isinstance(last, AsyncResult) else last.terminal_id

    def __repr__(self) -> str:
        return f"<ChainResult {len(self.results)} steps {self.state}>"


class ChordResult(_WorkflowResult):
    """A header group and its callback; ``get()`` is the callback's value."""

    def __init__(self, header: GroupResult, callback, app):
        self.header = header
        self.callback = callback
        self.app = app

    @property
    def id(self) -> str:
        return self.terminal_id

    @property
    def results(self) -> list:
        return self.header.results

    @property
    def children(self) -> list:
        return [self.header, self.callback]

    @property
    def terminal_id(self) -> str:
        return self.callback.id if isinstance(self.callback, AsyncResult) else self.callback.terminal_id

    def __repr__(self) -> str:
        return f"<ChordResult {len(self.header)} members {self.state}>"
