"""Periodic tasks and periodic workflows: cron specs, fired once per tick across schedulers.

A *schedule* is an in-process registration (``app.periodic(spec, target, name=...)``)
of a signature, group, chain or chord. Its spec is a 5-field cron expression, an alias
(``@hourly @daily @midnight @weekly @monthly @yearly @annually``) or an interval
(``@every 30s``, ``@every 1h30m``; units s, m, h, d). Cron specs are read in the
schedule's time zone (the App's ``timezone`` option, UTC by default); intervals are
multiples of their length since the Unix epoch, so every scheduler agrees on them.

A :class:`Scheduler` fires what is due: ``tick(now)`` is one pass (tests step it with
a ManualClock); ``start()``/``stop()`` run it in a daemon thread, inside a notebook's
worker (``app.start_worker(beat=True)``) or in ``nbqueue beat``. Rules:

- Each due time is claimed with ``backend.claim_once(Keys.tick(name, due))``, so
  any number of schedulers on one backend fire it once.
- Only the latest due time is a candidate. It fires if the scheduler sees it within
  ``grace`` seconds; older due times, and a latest one seen too late, were *missed*
  (a scheduler was not running: a closed laptop, a restarted kernel). Missed runs are
  counted and logged, never replayed in a burst; ``catch_up=True`` makes one late
  firing instead.
- Each firing sends a fresh copy of the template (new ids for every task and group).
- The runtime state (cursor, last run, last terminal id, missed count) lives in the
  backend's key-value store under ``Keys.schedule(name)``, so a restarted kernel or
  scheduler knows the last run.
- Once an hour one scheduler runs ``backend.expire()`` (results past their expiry and
  expired claim markers), as celery beat runs its backend cleanup.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import re
import threading
import zoneinfo
from typing import Any, Callable, Iterator

from croniter import croniter

from . import payloads
from .canvas import Signature, chain, chord, group
from .errors import ConfigurationError
from .signature import to_message
from .task import Task, task_name
from .workflow import Keys

log = logging.getLogger(__name__)

DEFAULT_GRACE = 60.0
DEFAULT_INTERVAL = 1.0
UPKEEP_EVERY = 3600
COUNT_CAP = 10_000          # due times counted one by one at most (a year of minutes would take seconds)

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EVERY = re.compile(r"@every\s+(.+)", re.IGNORECASE)
_EVERY_PART = re.compile(r"(\d+)\s*([smhd])", re.IGNORECASE)

COLUMNS = ["name", "spec", "timezone", "next_run", "last_run", "last_state", "missed", "catch_up", "target", "last_id"]


class InvalidSchedule(ConfigurationError, ValueError):
    """A spec, time zone or target that cannot be scheduled; the message says what is accepted."""


# -- triggers: when a spec is due ----------------------------------------------------------------

class EveryTrigger:
    """``@every N``: every multiple of N seconds since the epoch."""

    def __init__(self, seconds: int):
        self.seconds = int(seconds)

    def next_after(self, ts: float) -> int:
        return (math.floor(ts / self.seconds) + 1) * self.seconds

    def dues(self, after: float, until: float) -> tuple[int, int | None]:
        """(how many due times lie in (after, until], the latest of them)."""
        count = math.floor(until / self.seconds) - math.floor(after / self.seconds)
        if count <= 0:
            return 0, None
        return count, math.floor(until / self.seconds) * self.seconds

    def __repr__(self) -> str:
        return f"EveryTrigger({self.seconds}s)"


class CronTrigger:
    """A 5-field cron expression read in a time zone (croniter).

    When clocks go back, a fixed-time job (no ``*`` in its minute and hour fields, say
    ``30 2 * * *``) runs at the first of the two 02:30s only, as vixie cron does; jobs
    with ``*`` in those fields run on elapsed time. croniter alone would run it twice.
    """

    def __init__(self, expr: str, tz: zoneinfo.ZoneInfo):
        self.expr = expr
        self.tz = tz
        fields = expr.split()
        self._fixed_time = "*" not in fields[0] and "*" not in fields[1]

    def _skip(self, ts: float) -> bool:
        return self._fixed_time and _dt.datetime.fromtimestamp(ts, self.tz).fold == 1

    def iter_after(self, ts: float) -> Iterator[int]:
        it = croniter(self.expr, _dt.datetime.fromtimestamp(ts, self.tz))
        while True:
            due = it.get_next(float)
            if not self._skip(due):
                yield int(due)

    def next_after(self, ts: float) -> int:
        return next(self.iter_after(ts))

    def latest_at_or_before(self, ts: float) -> int:
        it = croniter(self.expr, _dt.datetime.fromtimestamp(math.floor(ts) + 1, self.tz))
        while True:
            due = it.get_prev(float)
            if not self._skip(due):
                return int(due)

    def dues(self, after: float, until: float) -> tuple[int, int | None]:
        """(how many due times lie in (after, until], the latest); the count stops at COUNT_CAP."""
        count, latest = 0, None
        for due in self.iter_after(after):
            if due > until:
                return count, latest
            count, latest = count + 1, due
            if count >= COUNT_CAP:
                return count, self.latest_at_or_before(until)
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        return f"CronTrigger({self.expr!r}, {self.tz.key})"


def parse_every(text: str) -> int:
    """``30s``, ``1h30m``, ``1h 30m``, ``2d`` -> seconds."""
    compact = text.strip()
    parts = _EVERY_PART.findall(compact)
    if not parts or _EVERY_PART.sub("", compact).strip():
        raise InvalidSchedule(
            f"cannot read interval {text!r}: use whole numbers with units s, m, h, d, as in '@every 30s' or '@every "
            "1h30m'"
        )
    seconds = sum(int(n) * _UNITS[unit.lower()] for n, unit in parts)
    if seconds <= 0:
        raise InvalidSchedule(f"interval {text!r} must be longer than zero")
    return seconds


def parse_spec(spec: str, tz: zoneinfo.ZoneInfo) -> EveryTrigger | CronTrigger:
    """A trigger for a cron expression, an @alias or ``@every <interval>``."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidSchedule(f"a schedule spec must be a non-empty string, not {spec!r}")
    text = " ".join(spec.split())
    every = _EVERY.fullmatch(text)
    if every:
        return EveryTrigger(parse_every(every.group(1)))
    if text.startswith("@"):
        expr = ALIASES.get(text.lower())
        if expr is None:
            raise InvalidSchedule(
                f"unknown schedule alias {text!r} (known: {', '.join(sorted(ALIASES))}, '@every <interval>')"
            )
        return CronTrigger(expr, tz)
    if len(text.split()) != 5:
        raise InvalidSchedule(f"cron spec {spec!r} must have 5 fields (minute hour day-of-month month day-of-week), "
                              f"not {len(text.split())}; or use an alias such as '@daily' or '@every 30s'")
    try:
        croniter(text)
    except (ValueError, KeyError) as exc:
        raise InvalidSchedule(f"invalid cron spec {spec!r}: {exc}") from None
    return CronTrigger(text, tz)


def zone(name: Any) -> zoneinfo.ZoneInfo:
    """A ZoneInfo from an IANA name ('Europe/Paris') or a ZoneInfo."""
    if isinstance(name, zoneinfo.ZoneInfo):
        return name
    if name is None:
        name = "UTC"
    try:
        return zoneinfo.ZoneInfo(str(name))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidSchedule(f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'Europe/Paris'") from None


# -- registrations -------------------------------------------------------------------------------

@dataclasses.dataclass
class Schedule:
    """One registration: fire ``target`` (a fresh copy each time) when ``spec`` is due."""

    name: str
    spec: str
    target: Any
    timezone: str
    catch_up: bool
    trigger: EveryTrigger | CronTrigger = dataclasses.field(repr=False)
    registered_at: float = dataclasses.field(repr=False)
    _cache: tuple[float, int] | None = dataclasses.field(default=None, repr=False, compare=False)

    def next_after(self, ts: float) -> int:
        """The first due time after ``ts`` (cached while ``ts`` stays before it)."""
        cached = self._cache
        if cached is not None and cached[0] <= ts < cached[1]:
            return cached[1]
        due = self.trigger.next_after(ts)
        self._cache = (ts, due)
        return due


@dataclasses.dataclass
class Firing:
    """What one tick sent for one schedule."""

    name: str
    due: float
    sent_at: float
    result: Any
    catch_up: bool = False
    missed: int = 0

    @property
    def id(self) -> str:
        """The terminal id of the sent task or workflow (whose record holds its result)."""
        return self.result.id


class ScheduleBook:
    """An App's schedules (in registration order) and its scheduler; kept in ``app._schedules``."""

    def __init__(self) -> None:
        self.entries: dict[str, Schedule] = {}
        self.scheduler: Scheduler | None = None
        self.lock = threading.Lock()


def book(app) -> ScheduleBook:
    with app._lock:
        if app._schedules is None:
            app._schedules = ScheduleBook()
        return app._schedules


def fresh_copy(item: Any) -> Any:
    """The same workflow with every id cleared, so sending it assigns new ones."""
    if isinstance(item, Signature):
        return item.replace(id=None, on_success=[fresh_copy(s) for s in item.on_success],
                            on_error=[fresh_copy(s) for s in item.on_error])
    if isinstance(item, group):
        return group(*[fresh_copy(m) for m in item.items])
    if isinstance(item, chain):
        return chain(*[fresh_copy(s) for s in item.steps])
    if isinstance(item, chord):
        return chord(fresh_copy(item.header), fresh_copy(item.callback))
    raise InvalidSchedule(f"a schedule fires a Signature, group, chain or chord, not a {type(item).__name__}")


def describe(item: Any) -> str:
    """A short text for a signature or workflow: ``add(1, 2)``, ``group(add(...), ...)``."""
    if isinstance(item, Signature):
        parts = [repr(a) for a in item.args] + [f"{k}={v!r}" for k, v in item.kwargs.items()]
        text = ", ".join(parts)
        return f"{item.name}({text if len(text) <= 60 else text[:57] + '...'})"
    return repr(item)


def _signatures(item: Any) -> Iterator[Signature]:
    if isinstance(item, Signature):
        yield item
        for cb in item.on_success + item.on_error:
            yield from _signatures(cb)
    elif isinstance(item, group):
        for m in item.items:
            yield from _signatures(m)
    elif isinstance(item, chain):
        for s in item.steps:
            yield from _signatures(s)
    elif isinstance(item, chord):
        yield from _signatures(item.header)
        yield from _signatures(item.callback)


def _check_target(app, target: Any) -> Any:
    if isinstance(target, Task):
        target = target.s()
    if not isinstance(target, (Signature, group, chain, chord)):
        hint = (
            " (decorate a function with @app.periodic_task(spec) to register and schedule it)"
            if callable(target)
            else ""
        )
        raise InvalidSchedule(
            f"a schedule fires a Signature, group, chain or chord, not a {type(target).__name__}{hint}"
        )
    for sig in _signatures(target):
        # fail in the cell that registers, not later in the scheduler thread
        task = app.registry.get(sig.name)
        with payloads.sending(app):     # a check only: what it stored out of band goes again at once
            to_message(sig.replace(id=None), app.serializer, default_queue=app.default_queue,
                       fn=task.fn if task else None)
    return target


def register(
    app, spec: str, target: Any, *, name: str | None = None, catch_up: bool = False, timezone: Any = None
) -> Schedule:
    """``app.periodic``: add or replace a schedule (re-running a cell replaces it)."""
    target = _check_target(app, target)
    if name is None:
        if not isinstance(target, Signature):
            raise InvalidSchedule(f"a periodic workflow needs a name: app.periodic({spec!r}, workflow, name='...')")
        name = target.name
    if not isinstance(name, str) or not name:
        raise InvalidSchedule(f"a schedule name must be a non-empty string, not {name!r}")
    tz = zone(timezone if timezone is not None else app.config.option("timezone"))
    trigger = parse_spec(spec, tz)
    schedules = book(app)
    with schedules.lock:
        old = schedules.entries.get(name)
        entry = Schedule(name=name, spec=spec, target=target, timezone=tz.key, catch_up=bool(catch_up), trigger=trigger,
                         registered_at=old.registered_at if old else app.clock.time())
        schedules.entries[name] = entry
    log.info("%s schedule %s: %s (%s) -> %s", "replaced" if old else "added", name, spec, tz.key, describe(target))
    return entry


def periodic_task(app, spec: str, *, name: str | None = None, catch_up: bool = False, timezone: Any = None,
                  args: Any = (), kwargs: dict | None = None, **task_options: Any) -> Callable:
    """``@app.periodic_task(spec)``: register the function as a task (if it is not one) and schedule it."""

    def decorate(fn: Callable) -> Task:
        task = (
            fn
            if isinstance(fn, Task) and fn.app is app
            else app.register_task(name or task_name(fn), fn, **task_options)
        )
        register(app, spec, task.signature(args, kwargs), name=name or task.name, catch_up=catch_up, timezone=timezone)
        return task

    return decorate


def unschedule(app, name: str) -> bool:
    """Remove a schedule here and its saved state; True if there was either."""
    schedules = book(app)
    with schedules.lock:
        entry = schedules.entries.pop(name, None)
    key = Keys.schedule(name)
    had_state = app.backend.kv_get(key) is not None
    app.backend.kv_set(key, None)
    if entry is not None or had_state:
        log.info("removed schedule %s", name)
    return entry is not None or had_state


# -- persisted state ---------------------------------------------------------------------------------

def _decode_state(name: str, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        state = json.loads(text)
    except ValueError:
        log.warning("schedule %s: unreadable saved state %r; starting afresh", name, text[:80])
        return None
    return state if isinstance(state, dict) and "cursor" in state else None


def _load_state(app, name: str) -> dict | None:
    return _decode_state(name, app.backend.kv_get(Keys.schedule(name)))


def _save_state(app, name: str, state: dict) -> None:
    app.backend.kv_set(Keys.schedule(name), json.dumps(state, sort_keys=True))


def _fmt(ts: float, tz: str = "UTC") -> str:
    return _dt.datetime.fromtimestamp(ts, zone(tz)).isoformat(timespec="seconds")


# -- the scheduler -----------------------------------------------------------------------------------

class Scheduler:
    """Fires an App's due schedules; steppable with ``tick(now)`` or run in a daemon thread."""

    def __init__(self, app, *, grace: float = DEFAULT_GRACE, interval: float = DEFAULT_INTERVAL, upkeep: bool = True):
        if grace <= 0 or interval <= 0:
            raise ValueError("grace and interval must be positive")
        self.app = app
        self.grace = float(grace)
        self.interval = float(interval)
        self.upkeep = upkeep
        self.claim_ttl = 2 * self.grace + 60.0      # outlives the window in which a due time can still fire
        self._upkeep_bucket: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    # -- one pass ------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> list[Firing]:
        """Fire every schedule that is due at ``now``; returns what this scheduler sent."""
        now = self.app.clock.time() if now is None else float(now)
        entries = list(book(self.app).entries.values())
        fired: list[Firing] = []
        if entries:
            saved = self.app.backend.kv_items(Keys.SCHEDULE)
            for entry in entries:
                try:
                    firing = self._tick_one(entry, _decode_state(entry.name, saved.get(Keys.schedule(entry.name))), now)
                except Exception:
                    log.exception("schedule %s: tick failed; trying again on the next tick", entry.name)
                    continue
                if firing is not None:
                    fired.append(firing)
        if self.upkeep:
            self._upkeep(now)
        return fired

    def _tick_one(self, entry: Schedule, state: dict | None, now: float) -> Firing | None:
        if state is None:
            state = self._baseline(entry, now)
        count, latest = entry.trigger.dues(state["cursor"], now)
        if not count:
            return None
        if not self.app.backend.claim_once(Keys.tick(entry.name, latest), self.claim_ttl):
            return None          # another scheduler has this due time
        fresh = _load_state(self.app, entry.name) or state
        if fresh["cursor"] >= latest:
            return None
        if fresh["cursor"] != state["cursor"]:
            count, _ = entry.trigger.dues(fresh["cursor"], now)
        state = fresh
        on_time = now - latest <= self.grace
        missed = count - 1 if on_time else count
        if missed:
            then = (f"running the one due at {_fmt(latest, entry.timezone)}" if on_time
                    else "running one catch-up now" if entry.catch_up else "not replayed")
            log.warning("schedule %s: %d run(s) due after %s were missed (no scheduler was running); %s",
                        entry.name, missed, _fmt(state["cursor"], entry.timezone), then)
        firing = None
        if on_time or entry.catch_up:
            try:
                result = self.app.send(fresh_copy(entry.target))
            except Exception:
                log.exception("schedule %s: could not send the run due %s", entry.name, _fmt(latest, entry.timezone))
                missed += 1 if on_time else 0
            else:
                firing = Firing(entry.name, latest, now, result, catch_up=not on_time, missed=missed)
                log.info("schedule %s: sent %s for %s%s", entry.name, result.id, _fmt(latest, entry.timezone),
                         " (catch-up)" if not on_time else "")
        new_state = {
            **state,
            "cursor": latest,
            "missed": int(state.get("missed", 0)) + missed,
            "spec": entry.spec,
            "timezone": entry.timezone,
        }
        if firing is not None:
            new_state.update(last_run=now, last_due=latest, last_id=firing.id)
        current = _load_state(self.app, entry.name)
        if current is None or current["cursor"] < latest:
            _save_state(self.app, entry.name, new_state)
        return firing

    def _baseline(self, entry: Schedule, now: float) -> dict:
        """First sight of a schedule with no saved state: due times count from its registration."""
        state = {
            "cursor": min(entry.registered_at, now),
            "missed": 0,
            "last_run": None,
            "last_due": None,
            "last_id": None,
            "spec": entry.spec,
            "timezone": entry.timezone,
        }
        existing = _load_state(self.app, entry.name)
        if existing is not None:
            return existing
        _save_state(self.app, entry.name, state)
        return state

    def _upkeep(self, now: float) -> None:
        bucket = int(now // UPKEEP_EVERY)
        if self._upkeep_bucket == bucket:
            return
        self._upkeep_bucket = bucket
        try:
            if self.app.backend.claim_once(Keys.upkeep(bucket), 2 * UPKEEP_EVERY):
                removed = self.app.backend.expire()      # the backend's own clock, which its claim TTLs use
                log.debug("upkeep: %d expired record(s) removed", removed)
        except Exception:
            log.warning("upkeep failed; trying again next hour", exc_info=True)

    # -- the thread ----------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Run ticks in a daemon thread; returns at once (idempotent)."""
        with self._thread_lock:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="nbqueue-beat", daemon=True)
            self._thread.start()
        log.info("scheduler started: %d schedule(s)", len(book(self.app).entries))
        return self

    def stop(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop the thread; True once it has ended (always True with ``wait=False`` only if it had)."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        if wait and thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.tick()
                failures = 0
                delay = self._delay()
            except Exception as exc:  # the store is unreachable: keep the thread alive and back off
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("scheduler tick failed (%s); retrying in %.1fs", exc, delay, exc_info=failures == 1)
            self._stop.wait(delay)
        log.info("scheduler stopped")

    def _delay(self) -> float:
        """Sleep until just after the next due time, at most ``interval``."""
        now = self.app.clock.time()
        entries = list(book(self.app).entries.values())
        if not entries:
            return self.interval
        soonest = min(e.next_after(now) for e in entries)
        return min(self.interval, max(0.005, soonest - now + 0.005))

    def __repr__(self) -> str:
        return f"<Scheduler {'running' if self.running else 'stopped'} schedules={len(book(self.app).entries)}>"


def scheduler(app) -> Scheduler:
    """The App's own scheduler (one per App, created on first use)."""
    schedules = book(app)
    with schedules.lock:
        if schedules.scheduler is None:
            schedules.scheduler = Scheduler(app)
        return schedules.scheduler


# -- the table -------------------------------------------------------------------------------------------

def schedules_frame(app):
    """One row per schedule: name, spec, timezone, next_run, last_run, last_state, missed, catch_up, target, last_id."""
    import pandas as pd

    schedules = book(app)
    entries = list(schedules.entries.values())
    grace = schedules.scheduler.grace if schedules.scheduler is not None else DEFAULT_GRACE
    now = app.clock.time()
    saved = app.backend.kv_items(Keys.SCHEDULE) if entries else {}
    states = {e.name: _decode_state(e.name, saved.get(Keys.schedule(e.name))) or {} for e in entries}
    ids = [s["last_id"] for s in states.values() if s.get("last_id")]
    task_states = app.backend.states_of(ids) if ids else {}
    rows = []
    for entry in entries:
        state = states[entry.name]
        cursor = state.get("cursor", entry.registered_at)
        rows.append({
            "name": entry.name,
            "spec": entry.spec,
            "timezone": entry.timezone,
            # a due time within the grace period is still to be fired; older ones are missed
            "next_run": entry.next_after(max(cursor, now - grace)),
            "last_run": state.get("last_run"),
            "last_state": task_states.get(state.get("last_id")),
            "missed": int(state.get("missed", 0)),
            "catch_up": entry.catch_up,
            "target": describe(entry.target),
            "last_id": state.get("last_id"),
        })
    frame = pd.DataFrame(rows, columns=COLUMNS, dtype=object)      # None (never fired) stays None, not NaN
    for col in ("next_run", "last_run"):
        frame[col] = pd.to_datetime(frame[col].astype("float64"), unit="s", utc=True)
    frame["missed"] = frame["missed"].astype("int64")
    frame["catch_up"] = frame["catch_up"].astype("bool")
    return frame


__all__ = ["Schedule", "Scheduler", "Firing", "InvalidSchedule", "parse_spec", "parse_every", "fresh_copy", "ALIASES"]
