"""Periodic tasks and periodic workflows.

Time is a ManualClock everywhere except the two subprocess tests of the CLI, which
watch an ``@every 1s`` schedule fire in real time. Multi-store tests run on SQLite,
memory:// (fakeredis) and real Redis.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest

import nbqueue
from nbqueue import chain, chord, group, states
from nbqueue.clock import ManualClock
from nbqueue.schedule import InvalidSchedule, parse_spec, zone
from nbqueue.testing import wait_for
from nbqueue.workflow import Keys

UTC = dt.timezone.utc
PARIS = zone("Europe/Paris")
ROOT = Path(__file__).resolve().parents[1]


def ts(*args, tz=UTC) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()


def utc(stamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(stamp, UTC)


# 08:30 UTC on Monday 15 January 2024 (winter: Paris is UTC+1)
T0 = ts(2024, 1, 15, 8, 30)


@pytest.fixture(params=["sqlite", "memory", "redis"])
def app_kind(request):
    """Schedules need a backend with claim_once and kv_*: SQLite, fakeredis and Redis (AMQP keeps none)."""
    return request.param


@pytest.fixture
def clock():
    return ManualClock(T0)


@pytest.fixture
def make_app(tmp_path, clock):
    """Apps on one SQLite file, all reading the same ManualClock."""
    made = []

    def make(**options):
        options.setdefault("clock", clock)
        app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db", **options)
        made.append(app)
        return app

    yield make
    for app in made:
        if app._schedules is not None and app._schedules.scheduler is not None:
            app.scheduler().stop(timeout=5)
        app.close()


def register_math(app):
    app.task(lambda x, y: x + y, name="add")
    app.task(lambda values: sum(values), name="total")
    app.task(lambda x: x * 10, name="times10")
    return app.registry["add"], app.registry["total"], app.registry["times10"]


def sent(app, name: str) -> list[dict]:
    return app.backend.list(name=name)


# -- specs, aliases, intervals and time zones (no store needed) -----------------------------------------

def test_cron_due_times_fall_on_minute_boundaries():
    trigger = parse_spec("*/15 * * * *", zone("UTC"))
    assert utc(trigger.next_after(ts(2024, 1, 15, 10, 7, 30))) == dt.datetime(2024, 1, 15, 10, 15, tzinfo=UTC)
    # exactly on a boundary, the next one is the following boundary
    assert utc(trigger.next_after(ts(2024, 1, 15, 10, 15))) == dt.datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    count, latest = trigger.dues(ts(2024, 1, 15, 10, 0), ts(2024, 1, 15, 11, 0))
    assert (count, utc(latest)) == (4, dt.datetime(2024, 1, 15, 11, 0, tzinfo=UTC))
    assert trigger.dues(ts(2024, 1, 15, 10, 0), ts(2024, 1, 15, 10, 14, 59)) == (0, None)


@pytest.mark.parametrize("alias, expected", [
    ("@hourly", dt.datetime(2024, 1, 15, 9, 0)),
    ("@daily", dt.datetime(2024, 1, 16, 0, 0)),
    ("@midnight", dt.datetime(2024, 1, 16, 0, 0)),
    ("@weekly", dt.datetime(2024, 1, 21, 0, 0)),       # the next Sunday
    ("@monthly", dt.datetime(2024, 2, 1, 0, 0)),
    ("@yearly", dt.datetime(2025, 1, 1, 0, 0)),
    ("@annually", dt.datetime(2025, 1, 1, 0, 0)),
])
def test_aliases_fire_at_their_cron_times(alias, expected):
    assert utc(parse_spec(alias, zone("UTC")).next_after(T0)) == expected.replace(tzinfo=UTC)


@pytest.mark.parametrize("spec, seconds", [
    ("@every 30s", 30), ("@every 5m", 300), ("@every 2h", 7200), ("@every 1d", 86400),
    ("@every 1h30m", 5400), ("@every 1h 30m 15s", 5415), ("@EVERY 45M", 2700),
])
def test_every_specs_read_units_and_combinations(spec, seconds):
    trigger = parse_spec(spec, zone("UTC"))
    assert trigger.seconds == seconds
    # due times are multiples of the interval since the epoch, so every scheduler agrees on them
    due = trigger.next_after(T0 + 1)
    assert due % seconds == 0 and T0 + 1 < due <= T0 + 1 + seconds


def test_every_counts_due_times_in_a_window():
    trigger = parse_spec("@every 30s", zone("UTC"))
    count, latest = trigger.dues(T0, T0 + 95)
    assert (count, latest) == (3, T0 + 90)


@pytest.mark.parametrize("spec, fragment", [
    ("61 * * * *", "invalid cron spec"),
    ("0 9 * *", "must have 5 fields"),
    ("0 0 9 * * *", "must have 5 fields"),
    ("@fortnightly", "unknown schedule alias"),
    ("@every 0s", "longer than zero"),
    ("@every 10", "units s, m, h, d"),
    ("@every 5x", "units s, m, h, d"),
    ("", "non-empty"),
])
def test_invalid_specs_raise_a_clear_error(spec, fragment):
    with pytest.raises(InvalidSchedule, match=fragment) as info:
        parse_spec(spec, zone("UTC"))
    assert isinstance(info.value, ValueError) and isinstance(info.value, nbqueue.ConfigurationError)


def test_unknown_time_zone_is_refused():
    with pytest.raises(InvalidSchedule, match="unknown time zone 'Mars/Olympus'"):
        zone("Mars/Olympus")


def test_nine_oclock_in_paris_is_eight_utc_in_winter_and_seven_in_summer():
    trigger = parse_spec("0 9 * * *", PARIS)
    assert utc(trigger.next_after(ts(2024, 1, 15, 0, 0))) == dt.datetime(2024, 1, 15, 8, 0, tzinfo=UTC)
    assert utc(trigger.next_after(ts(2024, 7, 15, 0, 0))) == dt.datetime(2024, 7, 15, 7, 0, tzinfo=UTC)


def test_fixed_time_job_runs_once_when_clocks_go_back():
    # 27 October 2024: Paris goes from 03:00 CEST back to 02:00 CET, so 02:30 happens twice
    daily = parse_spec("30 2 * * *", PARIS)
    count, latest = daily.dues(ts(2024, 10, 26, 12, 0), ts(2024, 10, 27, 12, 0))
    assert count == 1
    assert utc(latest) == dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC)       # the first 02:30 (CEST)
    # a job with '*' in its minute or hour field runs on elapsed time through the repeated hour
    half_hourly = parse_spec("*/30 * * * *", PARIS)
    assert half_hourly.dues(ts(2024, 10, 26, 23, 45), ts(2024, 10, 27, 2, 15))[0] == 5


def test_fixed_time_job_in_the_skipped_hour_runs_right_after_clocks_go_forward():
    # 31 March 2024: Paris jumps from 02:00 to 03:00, so there is no 02:30
    daily = parse_spec("30 2 * * *", PARIS)
    count, latest = daily.dues(ts(2024, 3, 30, 12, 0), ts(2024, 3, 31, 12, 0))
    assert count == 1
    assert utc(latest) == dt.datetime(2024, 3, 31, 1, 0, tzinfo=UTC)          # 03:00 CEST


# -- registering -------------------------------------------------------------------------------------------

def test_periodic_task_decorator_registers_the_task_and_its_schedule(make_app, clock):
    app = make_app()

    @app.periodic_task("@hourly", args=(2,), kwargs={"y": 3})
    def power(x, y):
        return x ** y

    assert power(2, 3) == 8                              # still callable here
    assert app.registry[power.name] is power
    frame = app.schedules()
    assert list(frame.columns[:8]) == [
        "name",
        "spec",
        "timezone",
        "next_run",
        "last_run",
        "last_state",
        "missed",
        "catch_up",
    ]
    row = frame.iloc[0]
    assert (row["name"], row["spec"], row["timezone"], row["missed"], bool(row["catch_up"])) == (
        power.name,
        "@hourly",
        "UTC",
        0,
        False,
    )
    assert row["next_run"] == dt.datetime(2024, 1, 15, 9, 0, tzinfo=UTC)
    assert row["last_state"] is None and row["last_id"] is None and pd.isna(row["last_run"])

    clock.set(ts(2024, 1, 15, 9, 0))
    [firing] = app.scheduler().tick()
    app.worker().drain()
    assert firing.result.get(timeout=5) == 8
    row = app.schedules().iloc[0]
    assert (row["last_state"], row["last_id"]) == (states.SUCCESS, firing.id)
    assert row["last_run"] == dt.datetime(2024, 1, 15, 9, 0, tzinfo=UTC)
    assert row["next_run"] == dt.datetime(2024, 1, 15, 10, 0, tzinfo=UTC)


def test_reregistering_a_name_replaces_the_schedule(make_app):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(1, 1), name="sum")
    app.periodic("*/5 * * * *", add.s(2, 2), name="sum")         # the cell was edited and run again
    frame = app.schedules()
    assert list(frame["name"]) == ["sum"] and list(frame["spec"]) == ["*/5 * * * *"]
    assert frame.iloc[0]["target"] == "add(2, 2)"


def test_periodic_refuses_what_it_cannot_fire(make_app):
    app = make_app()
    add, total, _ = register_math(app)
    with pytest.raises(InvalidSchedule, match="needs a name"):
        app.periodic("@hourly", group(add.s(1, 1), add.s(2, 2)))
    with pytest.raises(InvalidSchedule, match="periodic_task"):
        app.periodic("@hourly", lambda: None, name="plain")
    with pytest.raises(nbqueue.SerializationError):
        app.periodic("@hourly", add.s(object(), 1), name="bad-arg")   # fails in the cell, not later in a thread
    with pytest.raises(InvalidSchedule, match="unknown time zone"):
        app.periodic("@hourly", add.s(1, 1), name="tz", timezone="Europe/Atlantis")
    assert len(app.schedules()) == 0


# -- ticking -------------------------------------------------------------------------------------------

def test_tick_fires_at_each_cron_boundary_and_not_between(make_app, clock):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("0 * * * *", add.s(1, 2), name="hourly-sum")
    beat = app.scheduler()

    assert beat.tick(ts(2024, 1, 15, 8, 59, 59)) == []
    first = beat.tick(ts(2024, 1, 15, 9, 0))
    assert [(f.name, utc(f.due), f.catch_up, f.missed) for f in first] == [
        ("hourly-sum", dt.datetime(2024, 1, 15, 9, 0, tzinfo=UTC), False, 0)
    ]
    assert beat.tick(ts(2024, 1, 15, 9, 0, 30)) == []      # same tick again: nothing new
    assert beat.tick(ts(2024, 1, 15, 9, 59)) == []
    second = beat.tick(ts(2024, 1, 15, 10, 0, 20))          # a little late, within the grace period
    assert len(second) == 1 and second[0].id != first[0].id
    assert len(sent(app, "add")) == 2
    app.worker().drain()
    assert [f.result.get(timeout=5) for f in first + second] == [3, 3]


def test_every_schedule_fires_once_per_interval(make_app, clock):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@every 30s", add.s(0, 1), name="often")
    beat = app.scheduler()
    firings = []
    start = ts(2024, 1, 15, 8, 30)
    for step in range(1, 13):                               # three minutes in 15-second steps
        firings += beat.tick(start + 15 * step)
    assert [f.due - start for f in firings] == [30, 60, 90, 120, 150, 180]
    assert len({f.id for f in firings}) == 6


def test_app_timezone_option_is_the_default_and_a_schedule_may_override_it(make_app, clock):
    app = make_app(timezone="Europe/Paris")
    add, _, _ = register_math(app)
    app.periodic("0 9 * * *", add.s(1, 1), name="paris")
    app.periodic("0 9 * * *", add.s(2, 2), name="new-york", timezone="America/New_York")
    app.periodic("0 9 * * *", add.s(3, 3), name="utc", timezone="UTC")
    assert dict(zip(app.schedules()["name"], app.schedules()["timezone"])) == {
        "paris": "Europe/Paris", "new-york": "America/New_York", "utc": "UTC"}
    beat = app.scheduler()
    fired = {}
    for hour in range(9, 16):                               # 09:00 .. 15:00 UTC, hour by hour
        for f in beat.tick(ts(2024, 1, 15, hour, 0)):
            fired[f.name] = utc(f.due).hour
    # 08:00 UTC is before the first tick: Paris's 09:00 was at 08:00 UTC, so it fires tomorrow
    assert fired == {"utc": 9, "new-york": 14}
    assert [f.name for f in beat.tick(ts(2024, 1, 16, 8, 0))] == ["paris"]


def test_each_firing_sends_a_fresh_copy_and_leaves_the_template_alone(make_app, clock):
    app = make_app()
    add, _, times10 = register_math(app)
    template = add.s(2, 3).set(id="my-report")            # a fixed id would make every later firing a duplicate
    template.link(times10.s().set(id="my-callback"))
    app.periodic("@every 1m", template, name="linked")
    beat = app.scheduler()
    a = beat.tick(ts(2024, 1, 15, 8, 31))
    b = beat.tick(ts(2024, 1, 15, 8, 32))
    app.worker().drain()
    assert (template.id, template.on_success[0].id) == ("my-report", "my-callback")
    assert len({a[0].id, b[0].id, "my-report"}) == 3
    assert a[0].result.get(timeout=5) == b[0].result.get(timeout=5) == 5
    callbacks = sent(app, "times10")
    assert len(callbacks) == 2 and len({r["id"] for r in callbacks} - {"my-callback"}) == 2
    assert all(r["state"] == states.SUCCESS and json.loads(r["result"]) == 50 for r in callbacks)


def test_unschedule_stops_firing_and_forgets_saved_state(make_app, clock):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(1, 1), name="gone")
    app.periodic("@hourly", add.s(2, 2), name="kept")
    beat = app.scheduler()
    assert len(beat.tick(ts(2024, 1, 15, 9, 0))) == 2
    assert app.backend.kv_get(Keys.schedule("gone")) is not None

    assert app.unschedule("gone") is True
    assert [f.name for f in beat.tick(ts(2024, 1, 15, 10, 0))] == ["kept"]
    assert list(app.schedules()["name"]) == ["kept"]
    assert app.backend.kv_get(Keys.schedule("gone")) is None
    assert app.unschedule("gone") is False


# -- missed runs ------------------------------------------------------------------------------------------

def test_runs_missed_while_no_scheduler_ran_are_counted_not_replayed(make_app, clock, caplog):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(1, 1), name="report")
    beat = app.scheduler()
    assert len(beat.tick(ts(2024, 1, 15, 9, 0))) == 1
    # the laptop sleeps from 09:10 to 12:30: 10:00, 11:00 and 12:00 pass unseen
    with caplog.at_level(logging.WARNING, logger="nbqueue.schedule"):
        assert beat.tick(ts(2024, 1, 15, 12, 30)) == []
    assert "report: 3 run(s) due after" in caplog.text and "not replayed" in caplog.text
    row = app.schedules().iloc[0]
    assert row["missed"] == 3
    assert row["last_run"] == dt.datetime(2024, 1, 15, 9, 0, tzinfo=UTC)
    assert row["next_run"] == dt.datetime(2024, 1, 15, 13, 0, tzinfo=UTC)
    assert len(sent(app, "add")) == 1
    # the schedule carries on at its next due time
    assert len(beat.tick(ts(2024, 1, 15, 13, 0))) == 1
    assert len(sent(app, "add")) == 2 and app.schedules().iloc[0]["missed"] == 3


def test_latest_due_time_still_fires_when_older_ones_were_missed(make_app, clock):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(1, 1), name="report")
    beat = app.scheduler()
    beat.tick(ts(2024, 1, 15, 9, 0))
    [firing] = beat.tick(ts(2024, 1, 15, 12, 0, 10))       # back just after 12:00: 10:00 and 11:00 missed
    assert (utc(firing.due).hour, firing.catch_up, firing.missed) == (12, False, 2)
    assert app.schedules().iloc[0]["missed"] == 2


def test_catch_up_runs_exactly_one_firing_for_many_missed_runs(make_app, clock):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(1, 1), name="report", catch_up=True)
    beat = app.scheduler()
    beat.tick(ts(2024, 1, 15, 9, 0))
    [late] = beat.tick(ts(2024, 1, 15, 17, 30))           # eight hours unseen
    assert late.catch_up and late.missed == 8 and utc(late.due).hour == 17
    assert beat.tick(ts(2024, 1, 15, 17, 31)) == []
    assert len(beat.tick(ts(2024, 1, 15, 18, 0))) == 1
    assert len(sent(app, "add")) == 3
    app.worker().drain()
    assert late.result.get(timeout=5) == 2
    row = app.schedules().iloc[0]
    assert (row["missed"], bool(row["catch_up"])) == (8, True)


def test_a_restarted_kernel_knows_the_last_run_and_counts_what_it_missed(make_app, clock):
    first = make_app()
    add, _, _ = register_math(first)
    first.periodic("@hourly", add.s(1, 1), name="report")
    [firing] = first.scheduler().tick(ts(2024, 1, 15, 9, 0))
    first.close()

    clock.set(ts(2024, 1, 15, 11, 30))                     # the kernel restarts, the cell runs again
    second = make_app()
    add, _, _ = register_math(second)
    second.periodic("@hourly", add.s(1, 1), name="report")
    row = second.schedules().iloc[0]
    assert (row["last_id"], row["last_run"]) == (firing.id, dt.datetime(2024, 1, 15, 9, 0, tzinfo=UTC))
    assert second.scheduler().tick() == []                 # 10:00 and 11:00 are not replayed
    row = second.schedules().iloc[0]
    assert row["missed"] == 2 and row["last_state"] == states.PENDING
    assert len(sent(second, "add")) == 1


def test_a_restart_before_the_first_firing_still_counts_the_runs_missed_meanwhile(make_app, clock):
    first = make_app()
    add, _, _ = register_math(first)
    first.periodic("@hourly", add.s(1, 1), name="report")
    assert first.scheduler().tick(ts(2024, 1, 15, 8, 45)) == []   # seen at 08:45; nothing due yet
    first.close()

    clock.set(ts(2024, 1, 15, 10, 30))
    second = make_app()
    add, _, _ = register_math(second)
    second.periodic("@hourly", add.s(1, 1), name="report")
    assert second.scheduler().tick() == []
    assert second.schedules().iloc[0]["missed"] == 2                   # 09:00 and 10:00


def test_a_schedule_registered_before_the_scheduler_started_counts_from_its_registration(make_app, clock):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(1, 1), name="report")    # at 08:30; the scheduler starts at 11:00:05
    [firing] = app.scheduler().tick(ts(2024, 1, 15, 11, 0, 5))
    assert (utc(firing.due).hour, firing.missed) == (11, 2)


def test_a_failed_send_is_logged_and_counted_and_other_schedules_still_fire(make_app, clock, monkeypatch, caplog):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(1, 1), name="broken")
    app.periodic("@hourly", add.s(2, 2), name="fine")
    real_send = app.send

    def send(item):
        if item.args == [1, 1]:
            raise nbqueue.BrokerError("broker refused")
        return real_send(item)

    monkeypatch.setattr(app, "send", send)
    with caplog.at_level(logging.ERROR, logger="nbqueue.schedule"):
        fired = app.scheduler().tick(ts(2024, 1, 15, 9, 0))
    assert [f.name for f in fired] == ["fine"]
    assert "broken: could not send" in caplog.text
    missed = dict(zip(app.schedules()["name"], app.schedules()["missed"]))
    assert missed == {"broken": 1, "fine": 0}


# -- periodic workflows --------------------------------------------------------------------------------------

def _workflow(kind, add, total, times10):
    if kind == "group":
        return group(add.s(1, 1), add.s(2, 2), add.s(3, 3)), [2, 4, 6]
    if kind == "chain":
        return chain(add.s(1, 2), times10.s(), add.s(5)), 35
    return chord(group(add.s(1, 1), add.s(2, 2), add.s(3, 3)), total.s()), 12


@pytest.mark.parametrize("kind", ["group", "chain", "chord"])
def test_periodic_workflow_sends_a_new_workflow_each_firing_and_each_completes(app_factory, kind):
    clock = ManualClock(T0)
    app = app_factory(clock=clock)
    add, total, times10 = register_math(app)
    template, expected = _workflow(kind, add, total, times10)
    if kind == "group":
        template.id = "fixed-group-id"                       # fresh ids each firing, even so
    app.periodic("*/10 * * * *", template, name=f"periodic-{kind}")
    beat = app.scheduler()
    worker = app.worker()

    results = []
    for minute in (40, 50):
        [firing] = beat.tick(ts(2024, 1, 15, 8, minute))
        worker.drain()
        results.append(firing.result)
    leaf_ids = [{leaf.id for leaf in r.leaves()} for r in results]
    assert leaf_ids[0].isdisjoint(leaf_ids[1])
    assert results[0].id != results[1].id
    assert [r.get(timeout=10) for r in results] == [expected, expected]
    assert app.schedules().iloc[0]["last_state"] == states.SUCCESS
    assert app.schedules().iloc[0]["last_id"] == results[1].id


# -- several schedulers --------------------------------------------------------------------------------------

def _scheduler_apps(app_factory, clock, n):
    apps = []
    for _ in range(n):
        app = app_factory(clock=clock)                      # each its own connections: like separate processes
        add, _, _ = register_math(app)
        app.periodic("*/5 * * * *", add.s(1, 1), name="shared")
        app.periodic("@every 1m", add.s(2, 2), name="minutely")
        apps.append(app)
    return apps


def test_two_schedulers_on_one_store_fire_each_tick_once(app_factory):
    clock = ManualClock(T0)
    one, two = _scheduler_apps(app_factory, clock, 2)
    fired = []
    for minute in range(31, 46):                            # 08:31 .. 08:45, in turn and both at once
        now = ts(2024, 1, 15, 8, minute)
        first, second = (one, two) if minute % 2 else (two, one)
        fired += first.scheduler().tick(now) + second.scheduler().tick(now)
    assert sorted(f.name for f in fired).count("shared") == 3                # 08:35, 08:40, 08:45
    assert sorted(f.name for f in fired).count("minutely") == 15
    assert len(sent(one, "add")) == 18
    assert {f.due for f in fired if f.name == "minutely"} == {ts(2024, 1, 15, 8, m) for m in range(31, 46)}


def test_schedulers_ticking_at_the_same_instant_fire_once(app_factory):
    clock = ManualClock(T0)
    apps = _scheduler_apps(app_factory, clock, 4)
    for minute in (35, 40):
        now = ts(2024, 1, 15, 8, minute)
        barrier = threading.Barrier(len(apps))
        fired: list = []
        lock = threading.Lock()

        def run(app):
            barrier.wait()
            result = app.scheduler().tick(now)
            with lock:
                fired.extend(result)

        threads = [threading.Thread(target=run, args=(app,)) for app in apps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(f.name for f in fired) == ["minutely", "shared"]
    assert len(sent(apps[0], "add")) == 4


# -- the scheduler thread, in a notebook worker and in the CLI ----------------------------------------------------

def test_scheduler_thread_fires_when_due_and_stops(make_app, clock):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(1, 1), name="report")
    beat = app.scheduler()
    beat.interval = 0.02
    assert beat.start() is beat and beat.running
    clock.set(ts(2024, 1, 15, 9, 0))
    assert wait_for(lambda: len(sent(app, "add")) == 1)
    assert beat.stop(timeout=5) and not beat.running
    clock.set(ts(2024, 1, 15, 10, 0))
    assert beat.tick() and len(sent(app, "add")) == 2       # a stopped scheduler can still be stepped


def test_in_notebook_worker_with_beat_runs_the_scheduler_and_the_tasks(make_app, clock):
    app = make_app()
    add, _, _ = register_math(app)
    app.periodic("@hourly", add.s(20, 22), name="report")
    app.scheduler().interval = 0.02
    worker = app.start_worker(beat=True)
    assert app.scheduler().running
    clock.set(ts(2024, 1, 15, 9, 0))
    done = wait_for(lambda: [r for r in sent(app, "add") if r["state"] == states.SUCCESS])
    assert [json.loads(r["result"]) for r in done] == [42]
    worker.stop(timeout=10)
    assert not app.scheduler().running


def _beat_project(tmp_path: Path) -> Path:
    (tmp_path / "beatapp.py").write_text(textwrap.dedent(f"""
        import nbqueue

        app = nbqueue.App("sqlite:///{tmp_path}/beat.db")

        @app.periodic_task("@every 1s", name="ping")
        def ping():
            return "pong"
    """))
    return tmp_path


def _run_cli(tmp_path: Path, *args: str):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "nbqueue", *args, "--app", "beatapp:app"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def test_nbqueue_beat_process_fires_an_every_second_schedule(tmp_path):
    project = _beat_project(tmp_path)
    proc = _run_cli(project, "beat")
    try:
        observer = nbqueue.App(f"sqlite:///{tmp_path}/beat.db")
        pings = wait_for(lambda: len(observer.backend.list(name="ping")) >= 2)
        observer.close()
    finally:
        code, out = _stop(proc)
    assert pings, out
    assert code == 0, out
    assert "nbqueue beat: 1 schedule(s)" in out


def test_nbqueue_worker_with_beat_fires_and_runs_the_schedule(tmp_path):
    project = _beat_project(tmp_path)
    proc = _run_cli(project, "worker", "--beat", "-c", "1")
    try:
        observer = nbqueue.App(f"sqlite:///{tmp_path}/beat.db")
        done = wait_for(lambda: observer.backend.list(name="ping", state=states.SUCCESS))
        observer.close()
    finally:
        code, out = _stop(proc)
    assert done and json.loads(done[0]["result"]) == "pong", out
    assert code == 0, out
