"""Results past ``results_expire_in`` leave the store without a scheduler: a running
worker's heartbeat sweeps them in batches. On every result backend (SQLite, memory://,
Redis; RabbitMQ Apps keep results in SQLite).
"""
from __future__ import annotations

import pytest

from nbqueue import states
from nbqueue.clock import ManualClock
from nbqueue.testing import wait_for

T0 = 1_700_000_000.0


def stored(app) -> dict:
    """What the backend physically holds, whatever reads would show."""
    backend = app.backend
    if hasattr(backend, "store"):
        count = lambda table: backend.store.read(f"SELECT COUNT(*) FROM {table}")[0][0]    # noqa: E731
        return {"records": count("nbq_results"), "groups": count("nbq_groups"), "members": count("nbq_group_members"),
                "markers": count("nbq_kv")}
    client, prefix = backend.client, backend.prefix
    return {"records": sum(1 for _ in client.scan_iter(f"{prefix}r:*", count=1000)),
            "listed": client.zcard(f"{prefix}results"), "expiring": client.zcard(f"{prefix}expiring"),
            "done": sum(1 for _ in client.scan_iter(f"{prefix}done:*", count=1000))}    # these expire by TTL too


def finish(app, ids: list[str], **fields) -> None:
    backend = app.backend
    backend.create([{"id": i, "name": "add", "queue": app.default_queue} for i in ids])
    tokens = backend.begin_many(ids, worker="w")
    backend.store_results([(i, states.SUCCESS, tokens[i], {"result": "1", **fields}) for i in ids])


@pytest.mark.parametrize("app_kind", ["sqlite", "memory", "redis"])
@pytest.mark.slow
def test_expired_results_are_removed_by_a_running_worker_without_a_scheduler(app_factory):
    # Given 6,000 results kept 10 minutes, and 10 kept for a day, all written at T0 (the stores'
    # own expiry runs on real time too: writing them must take less than the 10 minutes)
    clock = ManualClock(T0)
    app = app_factory(clock=clock, results_expire_in=600)
    ids = [f"old-{i}" for i in range(6000)]
    for start in range(0, len(ids), 1000):
        finish(app, ids[start:start + 1000])
    app.backend.results_expire_in = 86_400
    finish(app, [f"kept-{i}" for i in range(10)])
    app.backend.claim_once("nbq:advanced:old-0", 30)                 # a claim marker, expired by then too
    before = stored(app)
    assert before["records"] == 6010
    # When the 10 minutes have passed and a worker runs (no scheduler, no beat)
    clock.advance(3600)
    assert app.result("old-0").state == states.PENDING                 # reads ignore expired records at once
    worker = app.start_worker()
    # Then its heartbeat removes the expired records from storage, batch by batch; the others stay
    gone = (
        {"records": 10, "groups": 0, "members": 0, "markers": 0}
        if "markers" in before
        else {"records": 10, "listed": 10, "expiring": 10}
    )
    wait_for(
        lambda: {k: v for k, v in stored(app).items() if k in gone} == gone,
        timeout=120,
        message="expired records removed",
    )
    assert {r["id"] for r in app.backend.list()} == {f"kept-{i}" for i in range(10)}
    worker.stop(wait=True, timeout=10)


def test_expired_groups_leave_no_bookkeeping_behind(tmp_path):
    import nbqueue

    clock = ManualClock(T0)
    app = nbqueue.App(f"sqlite:///{tmp_path}/groups.db", clock=clock, results_expire_in=60)
    app.task(lambda x: x, name="same")
    g = app.send(nbqueue.group([app.registry["same"].s(i) for i in range(3)]))
    app.worker().drain(timeout=30)
    assert g.get(timeout=10) == [0, 1, 2]
    assert stored(app)["groups"] == 1 and stored(app)["members"] == 3
    clock.advance(3600)
    app.backend.upkeep()
    assert stored(app) == {"records": 0, "groups": 0, "members": 0, "markers": 0}
    app.close()


def test_a_sweep_removes_at_most_a_batch_and_the_next_one_follows_at_once(tmp_path):
    import nbqueue

    clock = ManualClock(T0)
    app = nbqueue.App(f"sqlite:///{tmp_path}/batches.db", clock=clock, results_expire_in=1)
    finish(app, [f"t{i}" for i in range(25)])
    clock.advance(10)
    app.backend.EXPIRE_BATCH = 10
    removed = []
    for _ in range(4):
        app.backend.upkeep()
        removed.append(25 - stored(app)["records"])
    assert removed == [10, 20, 25, 25]          # full batches continue; a short one waits EXPIRE_EVERY
    app.close()
