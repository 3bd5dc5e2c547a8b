"""Built-in tasks: ``nbqueue.cell`` runs the body of a ``%%task`` notebook cell.

Shipped notebook code is code execution on the worker, so (DESIGN invariant 4):

- a worker runs a cell only when it was started with ``allow_cells=True``
  (``nbqueue worker --allow-cells``); any other worker fails the task with
  ``CellsNotAllowed`` and runs nothing;
- when a secret is configured (``App(secret=...)`` or ``NBQUEUE_SECRET``) the sender signs
  the cell (HMAC-SHA256 over its source, inputs and imports) and the worker refuses an
  unsigned or altered cell with ``SignatureError``, running nothing.

Both checks happen in :func:`refusal`, which the worker calls (through the task's
``nbqueue_check`` hook) before it decodes or runs anything; a refusal is a plain FAILURE
(no retries).

A cell message carries, as keyword arguments:

``source``   the cell body (Python);
``inputs``   JSON text: ``{name: value}`` of the variables the cell reads, each encoded
             with the App's serializer (so a worker sees the values they had when the
             cell was submitted);
``imports``  ``{name: [module, attribute or None]}``: modules, and functions or classes
             importable from a module, re-imported on the worker;
``local``    names of objects that cannot leave the kernel (functions defined in the
             notebook, objects the serializer cannot encode). They travel only inside
             the process that sent the cell, through :data:`LIVE`, keyed by task id;
             such a cell is sent to a queue only the kernel's own worker reads;
``origin``   the sending process (see :data:`PROCESS_TOKEN`);
``label``    the cell's name, for people;
``signature`` the HMAC, or None.

The value of the cell's last expression is the task's result.
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import hmac
import importlib
import json
import linecache
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any

from . import serialization
from .errors import NbqueueError, SignatureError

if TYPE_CHECKING:
    from .message import Message

CELL_TASK = "nbqueue.cell"

#: identifies this process; a cell with ``local`` names runs only where it was sent from
PROCESS_TOKEN = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

#: task id -> {name: object}: the kernel-only objects of cells sent from this process
LIVE: dict[str, dict[str, Any]] = {}
#: task id -> the value of the cell, unserialized, when it ran in the process that sent it
LIVE_RESULTS: dict[str, Any] = {}
_live_lock = threading.Lock()

SIGNED_FIELDS = ("source", "inputs", "imports", "local", "origin", "label")


class CellsNotAllowed(NbqueueError):
    """A worker started without allow_cells received a notebook cell; nothing was run."""


class CellError(NbqueueError):
    """A cell cannot run here (it needs objects that exist only in the kernel that sent it)."""


def register(app) -> None:
    """Register the built-in tasks on an App (called by App.__init__)."""
    app.register_task(CELL_TASK, run_cell)


def secret_of(app) -> str | None:
    """The App's HMAC key: ``App(secret=...)``, else the NBQUEUE_SECRET environment variable."""
    return app.config.option("secret") or os.environ.get("NBQUEUE_SECRET") or None


def _canonical(fields: dict) -> bytes:
    body = {k: fields.get(k) for k in SIGNED_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sign(secret: str, fields: dict) -> str:
    """HMAC-SHA256 (hex) of a cell's source, inputs, imports, local names, origin and label."""
    return hmac.new(secret.encode("utf-8"), _canonical(fields), hashlib.sha256).hexdigest()


def cell_kwargs(app, *, source: str, inputs: dict[str, Any], imports: dict[str, list] | None = None,
                local: list[str] | None = None, label: str | None = None) -> dict:
    """The keyword arguments of a cell message; ``inputs`` are already encoded by the serializer."""
    fields = {
        "source": source,
        "inputs": serialization.dumps(inputs),
        "imports": dict(imports or {}),
        "local": list(local or []),
        "origin": PROCESS_TOKEN,
        "label": label,
    }
    secret = secret_of(app)
    fields["signature"] = sign(secret, fields) if secret else None
    return fields


def refusal(app, message: Message, allow_cells: bool) -> NbqueueError | None:
    """Why this worker must not run a cell message, or None. Decodes nothing it does not check."""
    if not allow_cells:
        return CellsNotAllowed(
            "this worker does not run notebook cells (it was started without --allow-cells / allow_cells=True); "
            "the cell was not run")
    secret = secret_of(app)
    if not secret:
        return None
    try:
        fields = {k: app.serializer.decode(v) for k, v in message.kwargs.items()}
    except Exception as exc:
        return SignatureError(f"cannot read the cell message to verify its signature ({exc}); the cell was not run")
    signature = fields.get("signature")
    if not signature:
        return SignatureError(
            "unsigned cell refused: this worker has a secret (NBQUEUE_SECRET) and the cell carries no "
            "signature; set the same secret where the cell is sent from. The cell was not run"
        )
    if not isinstance(signature, str) or not hmac.compare_digest(signature, sign(secret, fields)):
        return SignatureError("cell signature does not match its content (tampered, or signed with another secret); "
                              "the cell was not run")
    return None


def _check(worker, message: Message) -> NbqueueError | None:
    """The worker's refusal hook (``task.fn.nbqueue_check``): runs before anything is decoded or run."""
    return refusal(worker.app, message, getattr(worker, "allow_cells", False))


def forget_live(task_id: str) -> None:
    with _live_lock:
        LIVE.pop(task_id, None)
        LIVE_RESULTS.pop(task_id, None)


def _import(name: str, spec: list) -> Any:
    module_name, attribute = spec[0], spec[1] if len(spec) > 1 else None
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise CellError(
            f"the cell reads {name!r} from module {module_name!r}, which this worker cannot import: {exc}"
        ) from exc
    for part in (attribute.split(".") if attribute else []):
        obj = getattr(obj, part)
    return obj


def run_cell(source: str, inputs: str = "{}", imports: dict | None = None, local: list | None = None,
             origin: str | None = None, label: str | None = None, signature: str | None = None) -> Any:
    """Run a cell body in a fresh namespace holding its captured inputs; returns its last expression."""
    from .context import current_task

    ctx = current_task() or {}
    app, task_id, worker = ctx.get("app"), ctx.get("id"), ctx.get("worker")
    if worker is not None and not getattr(worker, "allow_cells", False):  # worker.py refuses first; belt and braces
        raise CellsNotAllowed("this worker does not run notebook cells; the cell was not run")
    namespace: dict[str, Any] = {"__name__": "__nbqueue_cell__", "__builtins__": builtins}
    decoded = serialization.loads(inputs)
    for name, value in decoded.items():
        namespace[name] = app.serializer.decode(value) if app is not None else serialization.from_jsonable(value)
    for name, spec in (imports or {}).items():
        namespace[name] = _import(name, spec)
    if local:
        with _live_lock:
            live = LIVE.get(task_id) if origin == PROCESS_TOKEN else None
        if live is None:
            names = ", ".join(repr(n) for n in local)
            raise CellError(f"the cell reads {names}, which exist only in the notebook kernel that sent it "
                            f"({origin}); it cannot run in another process")
        namespace.update(live)
    filename = f"<cell {label or task_id}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show the lines
    tree = ast.parse(source, filename=filename, mode="exec")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), namespace)
    value = None
    if last is not None:
        value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
    if origin == PROCESS_TOKEN:
        with _live_lock:
            if task_id in LIVE:  # the sender (the %%task magic) collects it, unserialized, for -o
                LIVE_RESULTS[task_id] = value
    return value


run_cell.nbqueue_check = _check  # type: ignore[attr-defined]
