"""Shipping task functions to other processes by value (cloudpickle).

A function defined in a notebook lives in the kernel's ``__main__``: no other process
can import it by name. cloudpickle pickles such a function *by value* (its code, its
closure, the globals it reads, other notebook functions and classes it calls) and any
importable function *by reference* (module and name; also a module function whose name
the module binds to its Task, as ``@app.task`` does: the child imports the module, and so
has the module's App to read results or send tasks with). Two users of this module:

- **The process pool** (``pool.py``) ships every task function to its children this way,
  keyed by the SHA-256 of the pickle: a child unpickles a key once and keeps it; a
  re-defined function (or a global it reads bound to a new object) pickles differently,
  so its new key is shipped and no child runs stale code.
- **Messages**: a task defined in a notebook (:func:`defined_in_notebook`), sent from its
  function (``fit.delay()``, ``fit.s()``; a signature by name goes by name), is sent with
  a ``code`` field and routed to ``<queue>.code`` (:func:`code_queue`; the SQS broker
  holds it in the SQS queue ``<queue>-_code``, see nbqueue.drivers.sqs.broker), a queue that
  only workers able to run it read: workers of a process that registered a notebook
  function (the sending kernel's own; they run their registered function by name, as
  for any message, and unpickle nothing) and workers started with ``allow_code=True``
  (``nbqueue worker --allow-code``), which run the shipped code. The opt-in and the
  signing are those of ``%%task`` cells (``builtin.py``): when a secret is configured (``App(secret=...)`` or
  ``NBQUEUE_SECRET``) the sender signs the code (HMAC-SHA256 over the task name, the
  code's hash and the sending process) and a worker refuses unsigned or altered code.
  A worker checks all of this before it unpickles anything; a worker without the opt-in
  never unpickles.

The ``code`` field: ``{"key": sha256 hex of the pickle, "data": base64 of the pickle,
"origin": the sending process (builtin.PROCESS_TOKEN), "signature": hex HMAC or None}``.

What is captured: the values of the globals a function reads, *when it is pickled*. The
pickle is kept per function object and made again when the function, a notebook
function it calls, or a global it reads is bound to another object; an object changed
in place (``rows.append(x)``) is not seen: re-bind it or re-run the defining cell.
Pickles larger than :data:`INLINE_LIMIT` are not put in messages (a warning says so):
pass large data as task arguments, or load it inside the task.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import hmac
import json
import linecache
import logging
import os
import pickle
import sys
import threading
import types
import weakref
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle

from . import builtin
from .errors import CodeNotAllowed, MessageError, NbqueueError, SignatureError

if TYPE_CHECKING:
    from .message import Message

log = logging.getLogger(__name__)

CODE_SUFFIX = ".code"
#: pickles up to this many bytes ride in messages (base64); larger ones are not shipped to other workers
INLINE_LIMIT = 1 << 20
_LOADED_MAX = 256        # unpickled functions kept per process, least recently used dropped

try:  # cloudpickle's own answers (stable for years; used only to cache, never for correctness)
    from cloudpickle.cloudpickle import _extract_code_globals, _should_pickle_by_reference
except ImportError:  # pragma: no cover - a future cloudpickle without them: pickle every time
    _extract_code_globals = _should_pickle_by_reference = None


@dataclasses.dataclass(frozen=True, eq=False)
class Shipped:
    """A pickled function: ``key`` (SHA-256 hex of ``data``), ``data`` (cloudpickle of
    ``(function, {filename: source lines})``), ``by_value`` (False: an importable function
    pickled by module and name)."""

    key: str
    data: bytes
    by_value: bool = True

    @property
    def b64(self) -> str:
        text = self.__dict__.get("_b64")
        if text is None:
            text = base64.b64encode(self.data).decode("ascii")
            object.__setattr__(self, "_b64", text)
        return text


# -- packing ---------------------------------------------------------------------------------------------

_ABSENT = object()
_packed: "weakref.WeakKeyDictionary[Callable, tuple[Shipped, list]]" = weakref.WeakKeyDictionary()
_packed_lock = threading.Lock()
_warned: set[str] = set()


def _by_reference(fn: Any) -> bool:
    if _should_pickle_by_reference is None:
        return getattr(fn, "__module__", "__main__") != "__main__"
    try:
        return bool(_should_pickle_by_reference(fn))
    except Exception:
        return False


class _ImportedAs:
    """A module function that its module binds to a wrapper (``@app.task`` binds the name to
    a Task): pickled as the module and name, so the process that loads it imports the module
    (and the App it makes) rather than receiving the function's globals by value."""

    def __init__(self, module: str, qualname: str):
        self.module, self.qualname = module, qualname

    def __reduce__(self):
        return _imported_function, (self.module, self.qualname)


def imported(module: str, qualname: str) -> Any:
    """What the module ``module`` binds ``qualname`` to, importing the module."""
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def module_binding(fn: Any) -> tuple[str, str, Any] | None:
    """``(module, qualname, what that module binds the name to now)`` for a function of an
    imported module (not ``__main__``, not a local function), else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<locals>" in qualname or module not in sys.modules:
        return None
    obj: Any = sys.modules[module]
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return module, qualname, obj


def _imported_function(module: str, qualname: str) -> Callable:
    """The function ``module.qualname`` wraps (a Task's ``fn``, a decorator's ``__wrapped__``), imported."""
    obj = imported(module, qualname)
    inner = getattr(obj, "fn", None)
    return inner if callable(inner) else getattr(obj, "__wrapped__", obj)


def _wrapped_in_module(fn: Any) -> _ImportedAs | None:
    """An importable module's function whose name there is bound to a wrapper of it, else None."""
    binding = module_binding(fn)
    if binding is None:
        return None
    module, qualname, obj = binding
    if obj is None or obj is fn or not (getattr(obj, "fn", None) is fn or getattr(obj, "__wrapped__", None) is fn):
        return None
    return _ImportedAs(module, qualname)


def _code_files(code: types.CodeType, files: dict) -> None:
    files[(code.co_name, code.co_firstlineno)] = code.co_filename
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_files(const, files)


def _walk(fn: types.FunctionType, parts: list, files: dict, seen: set) -> None:
    """Everything a by-value pickle of ``fn`` depends on, as objects compared by identity:
    its code, defaults, the globals and closure cells it reads, recursively for the
    by-value functions among them; and where their code came from (``files``)."""
    seen.add(id(fn))
    code = fn.__code__
    parts += [code, fn.__defaults__, fn.__kwdefaults__]
    _code_files(code, files)
    for value in _reads(fn):
        parts.append(value)
        inner = _by_value_function(value)
        if inner is not None and id(inner) not in seen:
            _walk(inner, parts, files, seen)


def _by_value_function(value: Any) -> types.FunctionType | None:
    """The function a by-value pickle of ``value`` carries by value: ``value`` itself (a
    function no other process imports), or the one a wrapper of it holds (a Task: see
    ``Task.__reduce__``); else None."""
    if not isinstance(value, types.FunctionType):
        try:
            attributes = object.__getattribute__(value, "__dict__")
        except AttributeError:
            return None
        value = attributes.get("__wrapped__") if isinstance(attributes, dict) else None
    if isinstance(value, types.FunctionType) and not _by_reference(value):
        return value
    return None


def _reads(fn: types.FunctionType) -> list:
    """The values of the globals and closure cells ``fn`` reads."""
    return [value for _, value in _named_reads(fn)]


def _named_reads(fn: types.FunctionType) -> list[tuple[str, Any]]:
    """The globals and closure cells ``fn`` reads, as (name, value)."""
    names = _extract_code_globals(fn.__code__)
    reads = [(name, fn.__globals__.get(name, _ABSENT)) for name in names]
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            reads.append((name, cell.cell_contents))
        except ValueError:   # an empty cell
            reads.append((name, _ABSENT))
    return reads


def unpicklable(fn: Any) -> str | None:
    """What makes ``fn`` impossible to pickle by value, named: "reads 'lock' (a
    _thread.lock)", "reads 'helper', which reads 'lock' (...)"; None when no global or
    closure cell it reads (recursively through the notebook functions and tasks it calls)
    is the cause. Only for an error message: it pickles each value it reads."""
    if _extract_code_globals is None or not isinstance(fn, types.FunctionType):
        return None
    path = _culprit(fn, {id(fn)})
    if not path:
        return None
    *through, (name, value) = path
    kind = type(value)
    what = f"reads {name!r} ({'the' if kind.__name__ == 'App' else 'a'} {kind.__module__}.{kind.__qualname__})"
    for outer, _ in reversed(through):
        what = f"reads {outer!r}, which {what}"
    return what


def _culprit(fn: types.FunctionType, seen: set) -> list[tuple[str, Any]] | None:
    for name, value in _named_reads(fn):
        if value is _ABSENT:
            continue
        inner = _by_value_function(value)
        if inner is not None:
            if id(inner) in seen:
                continue
            seen.add(id(inner))
            deeper = _culprit(inner, seen)
            if deeper:
                return [(name, value)] + deeper
            if inner is value:
                continue
        try:
            cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return [(name, value)]
    return None


def _where(files: dict) -> dict:
    """What travels beside a by-value function so tracebacks elsewhere name the notebook's
    cells and show their lines (cloudpickle ships code as ``<dynamic-code>``):
    ``{"files": {(name, first line): file name}, "lines": {file name: source lines}}``,
    lines only for files that exist in this process's linecache alone (notebook cells)."""
    lines = {}
    for name in set(files.values()):
        if name and not os.path.exists(name):
            got = linecache.getlines(name)
            if got:
                lines[name] = got
    return {"files": files, "lines": lines}


def _restore(code: types.CodeType, files: dict) -> types.CodeType:
    consts = tuple(_restore(c, files) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    changes: dict = {}
    if any(a is not b for a, b in zip(consts, code.co_consts)):
        changes["co_consts"] = consts
    name = files.get((code.co_name, code.co_firstlineno))
    if name and code.co_filename != name:
        changes["co_filename"] = name
    return code.replace(**changes) if changes else code


def _restore_files(fn: Any, files: dict, seen: set | None = None) -> None:
    """Give the code of ``fn`` and of the by-value functions it reads their file names back."""
    if not isinstance(fn, types.FunctionType) or not files:
        return
    seen = set() if seen is None else seen
    seen.add(id(fn))
    if fn.__code__.co_filename == "<dynamic-code>":
        fn.__code__ = _restore(fn.__code__, files)
    if _extract_code_globals is None:
        return
    for value in _reads(fn):
        if isinstance(value, types.FunctionType) and id(value) not in seen:
            _restore_files(value, files, seen)


def pack(fn: Callable) -> Shipped:
    """Pickle ``fn`` for another process (cached per function; see the module docstring)."""
    cacheable = isinstance(fn, types.FunctionType) and _extract_code_globals is not None
    parts: list = []
    files: dict = {}
    if cacheable:
        with _packed_lock:
            entry = _packed.get(fn)
        by_value = entry[0].by_value if entry is not None else not (_by_reference(fn) or _wrapped_in_module(fn))
        if by_value:
            _walk(fn, parts, files, set())
        if entry is not None:
            shipped, old = entry
            if not by_value or (len(old) == len(parts) and all(a is b for a, b in zip(old, parts))):
                return shipped
    else:
        by_value = not (_by_reference(fn) or _wrapped_in_module(fn))
        if by_value and isinstance(getattr(fn, "__code__", None), types.CodeType):
            _code_files(fn.__code__, files)
    target = fn if by_value or _by_reference(fn) else _wrapped_in_module(fn)
    data = cloudpickle.dumps((target, _where(files) if by_value else {}), protocol=pickle.HIGHEST_PROTOCOL)
    shipped = Shipped(hashlib.sha256(data).hexdigest(), data, by_value)
    if cacheable:
        with _packed_lock:
            _packed[fn] = (shipped, parts)
    return shipped


# -- loading ---------------------------------------------------------------------------------------------

_loaded: "collections.OrderedDict[str, Callable]" = collections.OrderedDict()
_loaded_lock = threading.Lock()


def load(key: str, data: bytes | None) -> Callable:
    """The function of a pickle made by :func:`pack` (kept by ``key``; ``data`` may be None
    for a key loaded before). Raises KeyError for an unknown key without data. Only call
    this on data a worker may run (see :func:`refusal`): unpickling runs code."""
    with _loaded_lock:
        fn = _loaded.get(key)
        if fn is not None:
            _loaded.move_to_end(key)
            return fn
    if data is None:
        raise KeyError(key)
    fn, where = cloudpickle.loads(data)
    for name, source in (where.get("lines") or {}).items():
        linecache.cache[name] = (sum(map(len, source)), None, source, name)
    _restore_files(fn, where.get("files") or {})
    with _loaded_lock:
        _loaded[key] = fn
        while len(_loaded) > _LOADED_MAX:
            _loaded.popitem(last=False)
    return fn


# -- messages: sending ---------------------------------------------------------------------------------

def defined_in_notebook(fn: Any) -> bool:
    """True for a function no other process can import: defined in ``__main__`` by a
    notebook cell or other interactive input (not in the file of a script run as
    ``__main__``, whose workers import that file as a module)."""
    if getattr(fn, "__module__", None) != "__main__":
        return False
    code = getattr(fn, "__code__", None)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if code is not None and main_file and os.path.abspath(code.co_filename) == os.path.abspath(main_file):
        return False
    return True


def interactive() -> bool:
    """True in a notebook kernel or another interactive interpreter (``__main__`` is no
    file): where notebook functions are defined, so its workers read code queues from
    the start (elsewhere they begin to once one is registered)."""
    main = sys.modules.get("__main__")
    return main is not None and not getattr(main, "__file__", None)


def code_queue(queue: str) -> str:
    """The queue that tasks defined in a notebook and sent to ``queue`` go to."""
    return queue if queue.endswith(CODE_SUFFIX) else queue + CODE_SUFFIX


def with_code_queues(queues: list[str]) -> list[str]:
    """``queues`` and their code queues (see :func:`code_queue`), each once, in order."""
    out = list(queues)
    for q in queues:
        c = code_queue(q)
        if c not in out:
            out.append(c)
    return out


def sign(secret: str, name: str, key: str, origin: str | None) -> str:
    """HMAC-SHA256 (hex) over a shipped function's task name, code hash and sending process."""
    body = json.dumps(
        {"kind": "code", "name": name, "key": key, "origin": origin}, sort_keys=True, separators=(",", ":")
    )
    return hmac.new(secret.encode("utf-8"), body.encode("ascii"), hashlib.sha256).hexdigest()


def attach(app, sig, message: dict) -> None:
    """Sender side (``App.prepare``): a signature made from a task function defined in a
    notebook (``fit.s()``, ``fit.delay()``: ``Signature.ship_code``) gets its ``code`` field
    (the function registered under its name now) and is routed to the code queue; the same
    for its callbacks. A function that cannot be pickled (it reads a lock, a connection)
    is sent by name instead: it runs where it is registered. A signature by name
    (``Signature("fit")``, ``app.signature("fit")``) goes by name, as ever: to whichever
    worker of its queue has that task (a module exported from the notebook, say)."""
    if getattr(sig, "ship_code", False):
        task = app.registry.get(message["name"])
        shipped = None
        if task is not None and defined_in_notebook(task.fn):
            try:
                shipped = pack(task.fn)
            except Exception as exc:   # it reads a lock, a connection...: it runs where it is registered only
                if message["name"] not in _warned:
                    _warned.add(message["name"])
                    why = unpicklable(task.fn)
                    log.info("task %r is not shipped to other workers: it cannot be pickled (%s%s: %s); "
                             "it goes by name", message["name"], f"it {why}: " if why else "", type(exc).__name__, exc)
        if shipped is not None:
            if len(shipped.data) <= INLINE_LIMIT:
                secret = builtin.secret_of(app)
                message["code"] = {
                    "key": shipped.key,
                    "data": shipped.b64,
                    "origin": builtin.PROCESS_TOKEN,
                    "signature": sign(secret, message["name"], shipped.key, builtin.PROCESS_TOKEN) if secret else None,
                }
                message["queue"] = code_queue(message["queue"])
            elif shipped.key not in _warned:
                _warned.add(shipped.key)
                log.warning(
                    "task %r and the globals it reads pickle to %.1f MB: it is not shipped to other workers "
                    "(only this kernel's workers run it); pass large data as arguments or load it inside the task",
                    message["name"],
                    len(shipped.data) / 1e6,
                )
    for key in ("on_success", "on_error"):
        for callback, nested in zip(getattr(sig, key, None) or [], message.get(key) or []):
            attach(app, callback, nested)


# -- messages: receiving -----------------------------------------------------------------------------

def refusal(app, message: Message, allow_code: bool) -> NbqueueError | None:
    """Why this worker must not run the code a message carries, or None. Unpickles nothing."""
    if not allow_code:
        return CodeNotAllowed(
            f"task {message.name!r} is a function shipped from a notebook, and this worker does not run shipped "
            "code (start it with --allow-code / allow_code=True); nothing was unpickled or run")
    code = message.code
    if not isinstance(code, dict) or not isinstance(code.get("key"), str) or not isinstance(code.get("data"), str):
        return MessageError(
            "the message's shipped code is malformed (its 'code' field needs 'key' and 'data' strings); nothing was run"
        )
    try:
        data = base64.b64decode(code["data"], validate=True)
    except ValueError as exc:
        return MessageError(f"the message's shipped code is not valid base64 ({exc}); nothing was run")
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), code["key"]):
        return SignatureError(
            "shipped code does not match its hash (corrupted or altered); nothing was unpickled or run"
        )
    secret = builtin.secret_of(app)
    if not secret:
        return None
    signature = code.get("signature")
    if not signature:
        return SignatureError(
            "unsigned code refused: this worker has a secret (NBQUEUE_SECRET) and the shipped function carries "
            "no signature; set the same secret where it is sent from. Nothing was unpickled or run"
        )
    if not isinstance(signature, str) or not hmac.compare_digest(
        signature, sign(secret, message.name, code["key"], code.get("origin"))
    ):
        return SignatureError("shipped code signature does not match (altered, or signed with another secret); "
                              "nothing was unpickled or run")
    return None


class _ShippedFunction:
    """A task's function taken from the message's ``code``: checked (``nbqueue_check``,
    which the worker calls before anything is decoded or run), then unpickled and called
    here (thread pool) or handed to a child process as ``nbqueue_shipped`` (process pool)."""

    def __init__(self, message: Message):
        self.code = message.code or {}
        self.__name__ = self.__qualname__ = message.name

    @staticmethod
    def nbqueue_check(worker, message: Message) -> NbqueueError | None:
        return refusal(worker.app, message, getattr(worker, "allow_code", False))

    @property
    def nbqueue_shipped(self) -> Shipped:
        return Shipped(self.code["key"], base64.b64decode(self.code["data"]))

    def __call__(self, *args, **kwargs):
        shipped = self.nbqueue_shipped
        return load(shipped.key, shipped.data)(*args, **kwargs)


class ShippedTask:
    """What a worker runs for a message whose function it takes from the message (Task-like)."""

    def __init__(self, message: Message):
        self.name = message.name
        self.fn = _ShippedFunction(message)
        self.options: dict = {}

    def __repr__(self) -> str:
        return f"<ShippedTask {self.name}>"


def _capable_elsewhere(worker, message: Message, queue: str | None) -> bool:
    """Does another live worker run this shipped function (its sender's own, or one with allow_code)?"""
    origin = (message.code or {}).get("origin")
    try:
        workers = worker.app.backend.workers()
    except Exception:
        return False
    for info in workers:
        if info.get("worker_id") == worker.name or (queue and queue not in (info.get("queues") or [queue])):
            continue
        if info.get("allow_code") or (origin and info.get("origin") == origin):
            return True
    return False


#: ``task_for``'s answer for a message another live worker should run: hand it back
HAND_BACK = object()


def task_for(worker, message: Message, task, queue: str | None = None):
    """Worker side: what runs a message that carries ``code``, ``task`` being the worker's
    registered task of that name (or None).

    - The registered task, on a worker without ``allow_code`` (tasks go by name, as any
      message: the sending kernel's own worker, or the same notebook after a kernel
      restart), and for the sending process's own messages: nothing is unpickled.
    - On a worker with ``allow_code``: the shipped function (checked before it is unpickled).
    - Otherwise :data:`HAND_BACK` while a live worker with ``allow_code``, or of the sending
      process, reads the queue (by their heartbeats); None while the worker's usual
      handling of a task it lacks hands it back (another live worker has the name, or a
      kernel's grace: ``Worker._leave_unknown``); else a task that refuses to run, with
      ``CodeNotAllowed``.
    """
    code = message.code
    own = isinstance(code, dict) and code.get("origin") == builtin.PROCESS_TOKEN
    allow = getattr(worker, "allow_code", False)
    if task is not None and (own or not allow):
        return task
    if allow:
        return ShippedTask(message)
    if _capable_elsewhere(worker, message, queue):
        return HAND_BACK
    leave = getattr(worker, "_leave_unknown", None)
    if leave is not None and queue is not None and leave(message.name, queue, message) is not None:
        return None
    return ShippedTask(message)


__all__ = [
    "Shipped",
    "pack",
    "unpicklable",
    "load",
    "defined_in_notebook",
    "interactive",
    "code_queue",
    "with_code_queues",
    "sign",
    "attach",
    "refusal",
    "ShippedTask",
    "task_for",
    "HAND_BACK",
    "INLINE_LIMIT",
]
