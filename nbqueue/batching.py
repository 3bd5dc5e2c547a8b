"""``with app.batch():`` many single sends written at once, when the block ends.

Inside the block, ``task.delay()``, ``apply_async()`` and ``app.send_task()`` return their
AsyncResult at once without writing anything; at the end of the block every task sent in
it is recorded and published in one write (one SQLite transaction; one Redis round trip;
on RabbitMQ, publisher confirms pipelined ``publish_batch`` messages at a time). When the
block exits the tasks are durably queued, as each ``.delay()`` promises outside a block.

- If the block raises, nothing sent in it is written (the handles stay unknown ids).
- A handle's ``get()`` inside the block raises ``ResultNotFound``: its task is not sent yet.
- Workflows (group, chain, chord) sent inside the block are written at once, as outside.
- Blocks nest: an inner block's sends are written with the outermost block's.
- Per thread: sends from other threads are not held.
"""
from __future__ import annotations

import threading

_local = threading.local()


class SendBatch:
    """The context manager ``App.batch()`` returns."""

    def __init__(self, app) -> None:
        self.app = app
        self.records: list[dict] = []
        self.outs: list = []
        self._outer: "SendBatch | None" = None

    def __enter__(self) -> "SendBatch":
        stack = _stack()
        self._outer = next((b for b in stack if b.app is self.app), None)
        stack.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _stack().remove(self)
        if exc_type is not None:
            return False
        if self._outer is not None:                  # written with the outermost block of this App
            self._outer.records += self.records
            self._outer.outs += self.outs
        elif self.records:
            self.app.publish(self.records, self.outs)
        self.records, self.outs = [], []
        return False

    def __len__(self) -> int:
        """How many tasks wait to be written."""
        return len(self.outs)


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def hold(app, record: dict, out) -> bool:
    """Keep one send for the end of this thread's innermost ``app.batch()`` block; False
    outside a block (the caller writes it now)."""
    stack = getattr(_local, "stack", None)
    if not stack:
        return False
    for batch in reversed(stack):
        if batch.app is app:
            batch.records.append(record)
            batch.outs.append(out)
            return True
    return False
