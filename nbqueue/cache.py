"""The result cache: a send whose code and inputs ran before returns the stored result.

``@app.task(cache=True)`` (or ``cache="7d"``: hits only for results younger than that)
and ``%%task NAME --cache``. The key is the SHA-256 of the task's name, a hash of its code
(:func:`code_hash`: the bytecode of its function, the code of the notebook functions it
calls and the values of the globals and closure cells it reads) and its encoded
arguments (sets sorted, keyword arguments by name). Redefining the function with other
code, or rebinding a global it reads, gives another key.

The index lives in the result backend's key-value store (``kv_get``/``kv_set``/
``kv_items``/``claim_once``), so every backend has it and every process on the store
shares it: a notebook kernel, the kernel after a restart, a CLI worker's producer. Its keys
(built by ``workflow.Keys``):

==============================================  ==============================================
``nbqueue.cache:<key>``                         JSON ``{"task_id", "task", "at"}``: the run
                                                that computes (or computed) the key
``nbqueue.cache.lead:<key>:<generation>``       ``claim_once``: one sender per generation of a
                                                key becomes its leader and runs it
``nbqueue.cache.epoch``                         changed by ``cache_clear``: a fresh generation
``nbqueue.cache.stats:<process>``               JSON ``{"hits", "misses", "shared"}`` of one
                                                process (each writes only its own)
==============================================  ==============================================

A send looks the key up:

- its run is SUCCESS (within the expiry) and its result still reads: a **hit**. A new
  record is written final at once (no message, no worker): state SUCCESS, the stored
  result, and ``meta["cache"] = {"hit": True, "from": <task id of the run>, "key": ...}``.
- its run is still going (PENDING, STARTED, RETRY with a live worker able to run it):
  **shared**. The send's record is PENDING with ``meta["cache"]["waiting_for"]`` and a
  thread of this process copies the run's final state into it: the key runs once.
- no entry, or its run failed, was revoked, expired, or its record or result is gone: a
  **miss**. The sender that wins ``claim_once`` for the key's generation sends the task
  (``meta["cache"] = {"hit": False, "key": ...}``) and points the entry at it; a sender
  that loses waits briefly for the entry and shares that run. A FAILURE is never reused.

An argument (or a global the task reads) that cannot be hashed stably (a pickled object,
a value the serializer cannot encode) turns the cache off for that call, with a warning
naming it: never a wrong hit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
import time
import types
import warnings
from typing import Any, Callable

from . import serialization, states
from .backend import FIELDS
from .workflow import Keys

log = logging.getLogger(__name__)

#: seconds a leader's claim holds (it writes the entry right after publishing, within milliseconds)
LEAD_TTL = 30.0
#: seconds a sender that lost the claim waits for the leader's entry before it runs the task uncached
LEAD_WAIT = 5.0
_IN_FLIGHT = (states.PENDING, states.RECEIVED, states.STARTED, states.RETRY)


class CacheWarning(UserWarning):
    """The cache is off for one call (an argument or global cannot be hashed stably)."""


class Unstable(Exception):
    """A value whose encoding may differ between runs (its ``args[0]`` says which)."""


# -- the policy ---------------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


def policy(value: Any) -> float | None | bool:
    """A task's ``cache=`` option as: False (off), None (on, results never too old) or the
    expiry in seconds. Accepts True/False/None, a number of seconds, or a duration text
    such as ``"30s"``, ``"10m"``, ``"2h"``, ``"7d"``, ``"1w"``, ``"1h30m"``. Raises TypeError
    or ValueError naming the option."""
    if value is None or value is False:
        return False
    if value is True:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0:
            raise ValueError(f"cache must be a positive number of seconds, not {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        parts = _DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return float(sum(float(n) * _UNITS[u] for n, u in parts))
        raise ValueError(f"cache={value!r}: use True or a duration such as '30s', '10m', '2h', '7d', '1w' or '1h30m'")
    raise TypeError(f"cache must be True, False, a number of seconds or a duration text, not {type(value).__name__}")


# -- hashing code -------------------------------------------------------------------------------------

_code_digests: dict[int, tuple[types.CodeType, bytes]] = {}
#: the Task classes (nbqueue.task; a SentTask is a Task unpickled in another process), by name
_TASK_TYPES = ("Task", "SentTask")


def _code_digest(code: types.CodeType) -> bytes:
    """SHA-256 of a code object's bytecode, constants (nested code too) and names; not of
    its line numbers, so moving a cell does not change it."""
    got = _code_digests.get(id(code))
    if got is not None and got[0] is code:
        return got[1]
    h = hashlib.sha256()
    h.update(code.co_code)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(_code_digest(const))
        else:
            h.update(f"{type(const).__name__}:{const!r}".encode())
        h.update(b"\0")
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        h.update(",".join(names).encode() + b"\0")
    h.update(f"{code.co_argcount},{code.co_posonlyargcount},{code.co_kwonlyargcount},{code.co_flags}".encode())
    digest = h.digest()
    if len(_code_digests) > 4096:
        _code_digests.clear()
    _code_digests[id(code)] = (code, digest)
    return digest


def _global_names(code: types.CodeType) -> list[str]:
    """The global names a function's code (and the code nested in it) reads."""
    from .shipping import _extract_code_globals

    if _extract_code_globals is not None:
        return sorted(_extract_code_globals(code))
    names: set[str] = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return sorted(names)


class _Hasher:
    """Feeds a function, the notebook code it reaches and the values it reads into one hash."""

    def __init__(self, serializer, task: str):
        self.h = hashlib.sha256()
        self.serializer = serializer
        self.task = task
        self.seen: set[int] = set()

    def feed(self, *parts: Any) -> None:
        for part in parts:
            self.h.update(part if isinstance(part, bytes) else str(part).encode("utf-8", "backslashreplace"))
            self.h.update(b"\0")

    def function(self, fn: Any, where: str) -> None:
        fn = getattr(fn, "fn", fn) if type(fn).__name__ in _TASK_TYPES else fn
        if id(fn) in self.seen:
            self.feed("again", getattr(fn, "__qualname__", ""))
            return
        self.seen.add(id(fn))
        code = getattr(fn, "__code__", None)
        if not isinstance(code, types.CodeType):
            self.value(fn, where)
            return
        self.feed("function", getattr(fn, "__qualname__", ""), _code_digest(code))
        self.value(fn.__defaults__, f"the defaults of {where}")
        self.value(fn.__kwdefaults__, f"the keyword defaults of {where}")
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:
                self.feed("empty cell", name)
                continue
            self.feed("closure", name)
            self.value(contents, f"variable {name!r} read by {where}")
        if _importable(fn) and getattr(fn, "__module__", "") != "__main__":
            return      # a library function: its code, not the whole module it reads from
        namespace = getattr(fn, "__globals__", {})
        for name in _global_names(code):
            if name not in namespace:
                self.feed("unbound", name)      # a builtin, or not defined yet
                continue
            self.feed("global", name)
            self.value(namespace[name], f"global {name!r} read by {where}")

    def value(self, value: Any, where: str) -> None:
        if value is None or isinstance(value, (bool, int, float, str)):
            self.feed(type(value).__name__, repr(value))
            return
        if isinstance(value, types.ModuleType):
            self.feed("module", value.__name__, getattr(value, "__version__", ""))
            return
        if type(value).__name__ in _TASK_TYPES and hasattr(value, "fn"):
            self.function(value.fn, f"task {value.name!r}")
            return
        if isinstance(value, (types.FunctionType, types.MethodType)):
            if isinstance(value, types.MethodType):
                self.value(value.__self__, where)
                value = value.__func__
            self.function(value, f"function {getattr(value, '__qualname__', '?')!r} ({where})")
            return
        if isinstance(value, type) or callable(value) and _importable(value):
            self._class_or_reference(value, where)
            return
        self.feed("value", canonical_text(value, self.serializer, where))

    def _class_or_reference(self, value: Any, where: str) -> None:
        self.feed("ref", getattr(value, "__module__", ""), getattr(value, "__qualname__", ""))
        mine = getattr(value, "__module__", "") == "__main__" or not _importable(value)
        if isinstance(value, type) and mine and id(value) not in self.seen:
            self.seen.add(id(value))
            for name, attr in sorted(vars(value).items()):
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if isinstance(attr, types.FunctionType):
                    self.feed("method", name)
                    self.function(attr, f"{value.__qualname__}.{name} ({where})")
                elif not name.startswith("__"):
                    self.feed("attribute", name)
                    self.value(attr, f"{value.__qualname__}.{name} ({where})")

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _importable(obj: Any) -> bool:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return False
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


def code_hash(fn: Callable, serializer=None, task: str = "") -> str:
    """SHA-256 hex of a task's code: its function's bytecode, constants and defaults; the
    values of the closure cells and globals it reads (their encoded form); and the same,
    recursively, for the notebook functions and classes among them. Library functions and
    modules count by name (and version), not by their code. Raises Unstable naming a value
    that cannot be hashed stably."""
    hasher = _Hasher(serializer or serialization.Serializer(), task)
    hasher.function(fn, f"task {task!r}" if task else "the task")
    return hasher.hexdigest()


def source_hash(source: str, *, imports: dict | None = None, local: dict | None = None, serializer=None) -> str:
    """SHA-256 hex of a ``%%task`` cell's code: its source, its imports and the live objects
    it reads (notebook functions by their code). Raises Unstable naming a value that
    cannot be hashed stably."""
    hasher = _Hasher(serializer or serialization.Serializer(), "cell")
    hasher.feed("cell", source, json.dumps(imports or {}, sort_keys=True))
    for name, value in sorted((local or {}).items()):
        hasher.feed("local", name)
        hasher.value(value, f"variable {name!r}")
    return hasher.hexdigest()


# -- hashing values -----------------------------------------------------------------------------------

def _canonical(obj: Any, where: str) -> Any:
    """An encoded value (serializer output) in a form whose JSON text is the same in every
    process: set members sorted. Raises Unstable for pickled values."""
    if isinstance(obj, list):
        return [_canonical(v, where) for v in obj]
    if isinstance(obj, dict):
        tag = obj.get(serialization.TAG)
        if tag in ("set", "frozenset"):
            members = [_canonical(v, where) for v in obj["v"]]
            return {serialization.TAG: tag, "v": sorted(members, key=serialization.dumps)}
        if tag == "blob" and (obj.get("v") or {}).get("codec") == "pickle":
            raise Unstable(f"{where} cannot be hashed stably (a pickled value: its pickle may differ between runs)")
        return {k: _canonical(v, where) for k, v in obj.items()}
    return obj


def canonical_text(value: Any, serializer, where: str) -> str:
    """The canonical JSON text of a live value (see ``_canonical``); raises Unstable."""
    try:
        encoded = serializer.encode(value, where)
    except serialization.SerializationError as exc:
        raise Unstable(f"{where} cannot be hashed stably (it cannot be encoded: {exc})") from None
    return serialization.dumps(_canonical(encoded, where))


def inputs_text(message: dict, labels: Callable[[int], str] | None = None) -> str:
    """The canonical JSON text of a message's encoded arguments (keyword arguments by name)."""
    args = [_canonical(a, labels(i) if labels else f"argument {i + 1}") for i, a in enumerate(message["args"])]
    kwargs = {k: _canonical(v, f"{'variable' if labels is None else 'keyword argument'} {k!r}")
              for k, v in sorted(message["kwargs"].items())}
    return serialization.dumps([args, kwargs])


def key_of(name: str, code: str, inputs: str) -> str:
    return hashlib.sha256(json.dumps([name, code, inputs]).encode()).hexdigest()


# -- the stats of this process --------------------------------------------------------------------------

class _Stats:
    """This process's counters, written to the store at most once per ``FLUSH_EVERY`` seconds
    (and by ``stats()``), so a hit costs no extra write."""

    FLUSH_EVERY = 1.0

    def __init__(self) -> None:
        self.counts: dict[int, tuple[Any, dict[str, int]]] = {}
        self.lock = threading.Lock()
        self.flushed: dict[int, float] = {}
        self.dirty: set[int] = set()

    def add(self, app, what: str) -> None:
        with self.lock:
            counts = self.counts.setdefault(id(app.backend), (app.backend, {"hits": 0, "misses": 0, "shared": 0}))[1]
            counts[what] += 1
            self.dirty.add(id(app.backend))
            due = time.monotonic() - self.flushed.get(id(app.backend), 0.0) >= self.FLUSH_EVERY
        if due:
            self.flush(app.backend)

    def flush(self, backend) -> None:
        from .builtin import PROCESS_TOKEN

        with self.lock:     # written in order: a later count never lands before an earlier one
            entry = self.counts.get(id(backend))
            if entry is None or entry[0] is not backend or id(backend) not in self.dirty:
                return
            self.dirty.discard(id(backend))
            self.flushed[id(backend)] = time.monotonic()
            try:
                backend.kv_set(Keys.cache_stats(PROCESS_TOKEN), json.dumps(entry[1]))
            except Exception:
                log.debug("could not write the cache counters", exc_info=True)

    def forget(self) -> None:
        with self.lock:
            self.counts.clear()
            self.flushed.clear()
            self.dirty.clear()


_STATS = _Stats()


def stats(app) -> dict:
    """``{"size": entries, "hits", "misses", "shared", "hit_rate"}`` over every process on the
    store (hit_rate: hits and shared runs over all cached sends; None before any)."""
    backend = app.backend
    _STATS.flush(backend)
    total = {"hits": 0, "misses": 0, "shared": 0}
    for text in backend.kv_items(Keys.CACHE_STATS).values():
        try:
            counts = json.loads(text)
        except ValueError:
            continue
        for k in total:
            total[k] += int(counts.get(k) or 0)
    sends = sum(total.values())
    size = len(backend.kv_items(Keys.CACHE))
    return {"size": size, **total, "hit_rate": (total["hits"] + total["shared"]) / sends if sends else None}


def clear(app, task: str | None = None) -> int:
    """Remove the cache entries (of task ``task`` only, a task name or a ``%%task`` label);
    returns how many. Later sends of those keys run again; the records stay."""
    backend = app.backend
    entries = backend.kv_items(Keys.CACHE)
    gone = {}
    for k, text in entries.items():
        try:
            entry = json.loads(text)
        except ValueError:
            entry = {}
        if task is None or entry.get("task") == task:
            gone[k] = None
    for k in gone:
        backend.kv_set(k, None)
    backend.kv_set(Keys.CACHE_EPOCH, _new_id())     # fresh claims for keys whose entry is gone
    if task is None:
        for k in backend.kv_items(Keys.CACHE_STATS):
            backend.kv_set(k, None)
        _STATS.forget()
    return len(gone)


def _new_id() -> str:
    from .signature import new_id

    return new_id()


# -- sending ------------------------------------------------------------------------------------------

def cache_of(meta_text: str | None) -> dict | None:
    """The ``cache`` part of a record's meta (None when the send did not use the cache)."""
    if not meta_text:
        return None
    try:
        return (serialization.loads(meta_text) or {}).get("cache")
    except ValueError:
        return None


def info(app, task_id: str) -> dict | None:
    """How the cache answered a send: ``{"hit": True, "from": id, "key"}`` for a hit,
    ``{"hit": False, "key"}`` for a run, ``{"hit": False, "waiting_for": id, "key"}`` for a
    send that shares a run; None for a send without the cache (or an unknown id)."""
    record = app.backend.get(task_id)
    return cache_of(record.get("meta")) if record else None


def send(app, sig, expires: float | None, *, code: str | None = None, inputs: str | None = None):
    """Send ``sig`` through the cache (see the module docstring); returns its AsyncResult.

    ``expires``: seconds a stored result stays usable (None: always). ``code``: the code
    hash (default: :func:`code_hash` of the registered task's function); ``inputs``: the
    canonical text of what else the result depends on (default: the encoded arguments,
    :func:`inputs_text`). Arguments or code that cannot be hashed stably send it plainly,
    with a CacheWarning naming the value."""
    from .signature import _arg_label, _parameter_names

    task = app.registry.get(sig.name)
    message, record, out = app.prepare(sig)
    try:
        if code is None:
            code = code_hash(task.fn, app.serializer, sig.name) if task is not None else ""
        if inputs is None:
            names = _parameter_names(task.fn if task else None)
            inputs = inputs_text(message, lambda i: _arg_label(sig.name, i, names))
        key = key_of(sig.name, code, inputs)
    except Unstable as exc:
        warnings.warn(f"the result cache is off for this call: {exc}", CacheWarning, stacklevel=4)
        return app._send_prepared(sig, message, record, out)
    return _Lookup(app, sig, message, record, out, key, expires).run()


class _Lookup:
    """One cached send: look the key up, then hit, share or lead (see the module docstring)."""

    def __init__(self, app, sig, message, record, out, key: str, expires: float | None):
        self.app, self.sig, self.message, self.record, self.out = app, sig, message, record, out
        self.key, self.expires = key, expires
        self.label = (sig.kwargs or {}).get("label") if sig.name == "nbqueue.cell" else None

    def run(self):
        backend = self.app.backend
        deadline = time.monotonic() + LEAD_WAIT
        while True:
            entry = _entry(backend.kv_get(Keys.cache(self.key)))
            leader = backend.get(entry["task_id"]) if entry else None
            answer = self._answer(leader)
            if answer is not None:
                return answer
            generation = entry["task_id"] if entry else (backend.kv_get(Keys.CACHE_EPOCH) or "0")
            if backend.claim_once(Keys.cache_lead(self.key, generation), LEAD_TTL):
                return self._lead()
            if time.monotonic() >= deadline:    # the claim's holder never wrote its entry (it died): run it here
                log.warning("task %s: no entry from the sender that claimed cache key %s; running it uncached",
                            self.sig.name, self.key)
                return self.app._send_prepared(self.sig, self.message, self.record, self.out)
            time.sleep(0.005)

    def _answer(self, leader: dict | None):
        """The send's result when the leader's record answers it (hit or shared), else None."""
        if leader is None:
            return None
        state = leader.get("state")
        if state == states.SUCCESS and self._fresh(leader) and self._readable(leader):
            return self._hit(leader)
        if state in _IN_FLIGHT and self._runnable(leader):
            return self._share(leader)
        return None

    def _fresh(self, leader: dict) -> bool:
        if self.expires is None:
            return True
        finished = leader.get("finished_at") or 0.0
        return self.app.clock.time() - finished < self.expires

    def _readable(self, leader: dict) -> bool:
        try:
            self.app.serializer.decode(serialization.loads(leader["result"]))
            return True
        except Exception:
            log.info("task %s: the cached result of %s cannot be read any more; running it again",
                     self.sig.name, leader["id"])
            return False

    def _runnable(self, leader: dict) -> bool:
        """A run not final yet is shared unless no live worker can ever run it (a dead kernel's queue)."""
        from .result import waiting_problem

        try:
            return waiting_problem(self.app, leader) is None
        except Exception:
            return True

    def _meta(self, cache: dict) -> str:
        meta = serialization.loads(self.record["meta"]) if self.record.get("meta") else {}
        meta["cache"] = {**cache, "key": self.key}
        return serialization.dumps(meta)

    def _hit(self, leader: dict):
        from .result import AsyncResult

        app, now = self.app, self.app.clock.time()
        record = dict(self.record, meta=self._meta({"hit": True, "from": leader["id"]}))
        final = {"result": leader["result"], "output": None, "error": None, "exc_type": None, "traceback": None,
                 "started_at": now, "finished_at": now}
        with app.transaction():
            app.backend.create([record])
            stored = app.backend.store_result(record["id"], states.SUCCESS, **final)
        _STATS.add(app, "hits")
        result = AsyncResult(record["id"], app, name=self.sig.name)
        if stored:      # final already: get() needs no read
            result._final = {**dict.fromkeys(FIELDS), **record, **final, "state": states.SUCCESS, "retries": 0}
        result.cache = {"hit": True, "from": leader["id"], "key": self.key}
        return result

    def _share(self, leader: dict):
        from .result import AsyncResult

        app = self.app
        record = dict(self.record, meta=self._meta({"hit": False, "waiting_for": leader["id"]}))
        app.backend.create([record])
        _follower(app).follow(leader["id"], record["id"])
        _STATS.add(app, "shared")
        result = AsyncResult(record["id"], app, name=self.sig.name)
        result.cache = {"hit": False, "waiting_for": leader["id"], "key": self.key}
        return result

    def _lead(self):
        app = self.app
        self.record["meta"] = self._meta({"hit": False})
        result = app._send_prepared(self.sig, self.message, self.record, self.out)
        entry = {"task_id": self.record["id"], "task": self.label or self.sig.name, "at": app.clock.time()}
        app.backend.kv_set(Keys.cache(self.key), json.dumps(entry))
        _STATS.add(app, "misses")
        result.cache = {"hit": False, "key": self.key}
        return result


def _entry(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        entry = json.loads(text)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("task_id"), str) else None


# -- shared runs: copying the leader's final state -------------------------------------------------------

class _Follower:
    """One daemon thread per App that copies a run's final state into the records of the
    sends that share it (``_Lookup._share``)."""

    def __init__(self, app):
        self.app = app
        self.waiting: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def follow(self, leader_id: str, follower_id: str) -> None:
        with self.lock:
            self.waiting.setdefault(leader_id, []).append(follower_id)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="nbqueue-cache-follower", daemon=True)
                self.thread.start()
        self.wake.set()

    def _loop(self) -> None:
        interval = 0.005
        while True:
            with self.lock:
                leaders = list(self.waiting)
                if not leaders:
                    self.thread = None
                    return
            try:
                found = self.app.backend.get_many(leaders)
                done = [r for r in found if r is not None and r["state"] in states.READY_STATES]
                for leader in done:
                    with self.lock:
                        followers = self.waiting.pop(leader["id"], [])
                    settle(self.app, leader, followers)
                interval = 0.005 if done else min(interval * 2, 0.2)
            except Exception:
                log.warning("cache: reading shared runs failed; trying again", exc_info=True)
                interval = 1.0
            self.wake.wait(interval)
            self.wake.clear()


_followers: dict[int, _Follower] = {}
_followers_lock = threading.Lock()


def _follower(app) -> _Follower:
    with _followers_lock:
        follower = _followers.get(id(app))
        if follower is None or follower.app is not app:
            follower = _followers[id(app)] = _Follower(app)
        return follower


def settle(app, leader: dict, followers: list[str]) -> None:
    """Give each follower the leader's final state (a FAILURE too: they asked for that run)."""
    now = app.clock.time()
    for follower_id in followers:
        if leader["state"] == states.SUCCESS:
            fields = {"result": leader.get("result")}
        else:
            why = f"the run it shared ({leader['id']}) ended {leader['state']}: {leader.get('error') or ''}"
            fields = {"error": why.rstrip(": "),
                      "exc_type": leader.get("exc_type"), "traceback": leader.get("traceback")}
        app.backend.store_result(follower_id, leader["state"], started_at=now, finished_at=now, **fields)


__all__ = ["policy", "code_hash", "source_hash", "inputs_text", "key_of", "send", "info", "stats", "clear", "settle",
           "CacheWarning", "Unstable"]
