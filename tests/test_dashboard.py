"""The dashboard's API, its access rules, the App methods it uses, and /metrics."""
from __future__ import annotations

import base64
import html
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import nbqueue
from nbqueue import states
from nbqueue.broker import Outgoing
from nbqueue.testing import wait_for

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

ACTION = {"X-Nbqueue-Action": "1"}
HERE = Path(__file__).resolve().parent


def client_for(app, host: str = "127.0.0.1", **options):
    from starlette.testclient import TestClient

    from nbqueue.dashboard import create_app

    return TestClient(create_app(app, interval=0.05, **options), client=(host, 50000))


def register(app):
    @app.task(name="add")
    def add(x, y):
        return x + y

    @app.task(name="boom")
    def boom(word):
        raise ValueError(f"exploded on {word}")

    return add, boom


def sqlite_app(tmp_path, **options):
    return nbqueue.App(f"sqlite:///{tmp_path}/dash.db", **options)


def metric_values(text: str, name: str) -> dict[tuple, float]:
    """``{labels as sorted (key, value) pairs: value}`` of one metric in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}
    return {}


# -- the App methods the dashboard uses, on every store ---------------------------------------------

def test_find_tasks_filters_by_state_name_queue_time_and_text_and_pages(app_factory, qname):
    app = app_factory()
    add, boom = register(app)
    other = qname("other")
    sent = [add.delay(i, 1000 + i) for i in range(7)]
    elsewhere = app.send_task(add.s(99, 4242).set(queue=other))
    worker = app.start_worker(2, queues=[app.default_queue, other])
    failed = boom.delay("kumquat")
    for r in sent + [elsewhere]:
        r.get(timeout=20)
    wait_for(lambda: failed.ready(), timeout=20)
    worker.stop()

    assert {r["id"] for r in app.find_tasks(state=states.FAILURE)} == {failed.id}
    assert len(app.find_tasks(name="add", limit=100)) == 8
    assert [r["id"] for r in app.find_tasks(queue=other)] == [elsewhere.id]
    assert {r["id"] for r in app.find_tasks(text="1003")} == {sent[3].id}            # in the arguments
    assert {r["id"] for r in app.find_tasks(text="KUMQUAT")} == {failed.id}          # in the error, any case
    page1 = app.find_tasks(name="add", limit=3)
    page2 = app.find_tasks(name="add", limit=3, offset=3)
    assert len(page1) == len(page2) == 3 and not {r["id"] for r in page1} & {r["id"] for r in page2}
    newest = app.find_tasks(limit=100)
    created = [r["created_at"] for r in newest]
    assert created == sorted(created, reverse=True)
    middle = sorted(created)[4]
    assert all(r["created_at"] >= middle for r in app.find_tasks(since=middle, limit=100))
    assert all(r["created_at"] < middle for r in app.find_tasks(until=middle, limit=100))
    assert app.count_tasks() == {(states.SUCCESS, "add"): 8, (states.FAILURE, "boom"): 1}
    assert app.count_tasks(text="kumquat") == {(states.FAILURE, "boom"): 1}


def test_metrics_counts_match_app_tasks_after_a_run(app_factory):
    app = app_factory()
    add, boom = register(app)
    worker = app.start_worker(2)
    results = [add.delay(i, i) for i in range(12)] + [boom.delay(str(i)) for i in range(3)]
    group = app.send(nbqueue.group(add.s(i, 1) for i in range(5)))
    group.get(timeout=30)
    for r in results:
        wait_for(r.ready, timeout=30)
    worker.stop()
    frame = app.tasks()
    expected = frame.groupby(["state", "name"]).size().to_dict()

    text = client_for(app).get("/metrics").text
    tasks = metric_values(text, "nbqueue_tasks")
    assert {(dict(k)["state"], dict(k)["name"]): v for k, v in tasks.items()} == {
        k: float(v) for k, v in expected.items()
    }
    assert sum(tasks.values()) == len(frame) == 20
    assert "nbqueue_queue_messages" in text and "nbqueue_workers" in text


def test_retry_task_sends_a_failed_task_again_as_a_new_task(app_factory):
    app = app_factory()
    calls = []

    @app.task(name="flaky")
    def flaky(x):
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("first time fails")
        return x * 2

    worker = app.start_worker(1)
    first = flaky.delay(21)
    wait_for(first.ready, timeout=20)
    assert first.state == states.FAILURE
    again = app.retry_task(first.id)
    assert again.id != first.id and again.get(timeout=20) == 42
    assert json.loads(again.info()["meta"])["retry_of"] == first.id
    worker.stop()
    with pytest.raises(ValueError, match="only a failed or revoked task"):
        app.retry_task(again.id)
    with pytest.raises(KeyError):
        app.retry_task("no-such-task")


def test_redrive_sends_dead_letters_again_and_keeps_unreadable_ones(app_factory):
    """Given a dead letter with a readable body and one that is not a message, re-driving
    sends the first again (it runs) and keeps the second with its reason."""
    app = app_factory()
    add, _ = register(app)
    queue = app.default_queue
    message, record, sent = app.prepare(add.s(20, 22))
    app.publish([record], [sent])
    app.broker.publish(Outgoing(id="not-a-message", body="{{ not json", queue=queue))
    deliveries = wait_for(lambda: app.broker.reserve([queue], timeout=1.0, limit=5) or None, timeout=20)
    got = {d.message_id for d in deliveries}
    while len(got) < 2:
        more = app.broker.reserve([queue], timeout=1.0, limit=5)
        deliveries += more
        got |= {d.message_id for d in more}
    for d in deliveries:
        assert app.broker.reject(d, "test: dead-lettered by hand")
    wait_for(lambda: len(app.broker.dead_letters(queue)) == 2, timeout=20)

    out = app.redrive(queue)
    assert [r.name for r in out["sent"]] == ["add"]
    assert [k["id"] for k in out["kept"]] == ["not-a-message"] and "not a readable message" in out["kept"][0]["reason"]
    assert [d["id"] for d in app.broker.dead_letters(queue)] == ["not-a-message"]
    worker = app.start_worker(1)
    assert out["sent"][0].get(timeout=20) == 42
    assert json.loads(out["sent"][0].info()["meta"])["redriven_from"] == record["id"]
    worker.stop()


def test_workflow_shape_of_a_chord_and_a_chain_is_read_back_from_any_member(app_factory):
    app = app_factory()
    add, _ = register(app)

    @app.task(name="total")
    def total(values):
        return sum(values)

    worker = app.start_worker(2)
    chord = app.send(nbqueue.chord(nbqueue.group(add.s(i, i) for i in range(3)), total.s()))
    chain = app.send(add.s(1, 1) | add.s(10) | add.s(100))
    assert chord.get(timeout=30) == 6 and chain.get(timeout=30) == 112
    worker.stop()

    tree = app.workflow(chord.header.results[1].id)
    assert tree["kind"] == "chain"
    group_node, callback = tree["steps"]
    assert group_node["kind"] == "group" and group_node["state"] == states.SUCCESS
    assert [m["id"] for m in group_node["members"]] == [r.id for r in chord.header.results]
    assert callback == {"kind": "task", "id": chord.callback.id, "name": "total", "state": states.SUCCESS}
    steps = app.workflow(chain.results[2].id)["steps"]
    assert [s["id"] for s in steps] == [r.id for r in chain.results]
    assert app.workflow(add.delay(1, 2).id) is None


# -- the web layer (SQLite; the layer does not depend on the store) -----------------------------------

def test_unknown_task_and_queue_answer_404_with_a_message(tmp_path):
    app = sqlite_app(tmp_path)
    client = client_for(app)
    for path in ("/api/tasks/nope", "/api/queues/nope", "/api/events?view=task&id=nope"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "nope" in response.json()["error"]
    for path in ("/tasks/nope", "/queues/nope"):
        response = client.get(path)
        assert response.status_code == 404 and "nope" in response.text and "Traceback" not in response.text
    response = client.post("/api/tasks/nope/cancel", headers=ACTION)
    assert response.status_code == 404 and "no task with id 'nope'" in response.json()["error"]
    assert client.get("/api/tasks?page=x").status_code == 400
    assert client.get("/no/such/page").status_code == 404


def test_pages_embed_their_first_data_and_the_api_returns_rows(tmp_path):
    app = sqlite_app(tmp_path)
    add, boom = register(app)
    worker = app.start_worker(1)
    ok, bad = add.delay(2, 3), boom.delay("pear")
    ok.get(timeout=20)
    wait_for(bad.ready, timeout=20)
    worker.stop()
    client = client_for(app)
    home = client.get("/")
    assert home.status_code == 200 and ok.id in home.text and '<base href="./">' in home.text
    rows = client.get("/api/tasks?state=FAILURE").json()
    assert [t["id"] for t in rows["tasks"]] == [bad.id] and rows["total"] == 1 and rows["tasks"][0]["call"] == "'pear'"
    detail = client.get(f"/api/tasks/{bad.id}").json()
    assert "ValueError" in detail["error"] and "exploded on pear" in detail["traceback"]
    page = client.get(f"/tasks/{ok.id}")
    assert page.status_code == 200 and '<base href="../">' in page.text
    assert client.get(f"/api/tasks/{ok.id}").json()["result"] == {"kind": "text", "text": "5"}


def test_a_dataframe_result_is_shown_as_a_table(tmp_path):
    import pandas as pd

    app = sqlite_app(tmp_path)

    @app.task(name="frame")
    def frame(n):
        return pd.DataFrame({"a": range(n), "b": [f"x{i}" for i in range(n)]})

    worker = app.start_worker(1)
    r = frame.delay(40)
    r.get(timeout=20)
    worker.stop()
    shown = client_for(app).get(f"/api/tasks/{r.id}").json()["result"]
    assert shown["kind"] == "frame" and shown["shape"] == [40, 2]
    assert "<table" in shown["html"] and "x19" in shown["html"] and "x20" not in shown["html"]   # its first 20 rows


def test_cancel_reports_the_real_outcome(tmp_path):
    """A task not yet run is revoked; one that finished meanwhile says so and keeps its result."""
    app = sqlite_app(tmp_path)
    add, _ = register(app)
    waiting = add.delay(1, 1)                      # no worker yet
    client = client_for(app)
    out = client.post(f"/api/tasks/{waiting.id}/cancel", headers=ACTION).json()
    assert out["ok"] and out["state"] == states.REVOKED
    done = add.delay(2, 2)
    worker = app.start_worker(1)
    assert done.get(timeout=20) == 4
    worker.stop()
    out = client.post(f"/api/tasks/{done.id}/cancel", headers=ACTION).json()
    assert not out["ok"] and out["state"] == states.SUCCESS and "already finished" in out["message"]
    assert done.get(timeout=1) == 4 and waiting.state == states.REVOKED


def test_purge_and_redrive_actions(tmp_path):
    app = sqlite_app(tmp_path)
    add, _ = register(app)
    for i in range(3):
        add.delay(i, i)
    client = client_for(app)
    queue = app.default_queue
    assert client.get(f"/api/queues/{queue}").json()["queue"]["ready"] == 3
    out = client.post(f"/api/queues/{queue}/purge", headers=ACTION).json()
    assert out == {"ok": True, "purged": 3, "message": f"purged 3 message(s) from {queue}"}
    out = client.post(f"/api/queues/{queue}/redrive", headers=ACTION).json()
    assert out["ok"] and out["sent"] == [] and out["kept"] == []


def test_server_sent_events_stream_the_view(tmp_path):
    app = sqlite_app(tmp_path)
    add, _ = register(app)
    r = add.delay(1, 2)
    client = client_for(app)
    with client.stream("GET", "/api/events?view=home") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                break
    assert event["view"] == "home" and [t["id"] for t in event["tasks"]["tasks"]] == [r.id]
    assert event["tasks"]["total"] == 1 and event["overview"]["queues"][0]["ready"] == 1


# -- access ------------------------------------------------------------------------------------------------

def test_binding_beyond_loopback_needs_a_password_or_token(tmp_path):
    from nbqueue import dashboard
    from nbqueue.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="--password or --token"):
        dashboard.check_binding("0.0.0.0", None, None)
    dashboard.check_binding("0.0.0.0", "secret", None)
    dashboard.check_binding("127.0.0.1", None, None)
    proc = subprocess.run(
        [sys.executable, "-m", "nbqueue", "dashboard", "--host", "0.0.0.0", "--app", "nosuchmodule:app"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "NBQUEUE_DASHBOARD_PASSWORD": "", "NBQUEUE_DASHBOARD_TOKEN": ""},
    )
    assert proc.returncode == 2 and ("--password or --token" in proc.stderr or "nosuchmodule" in proc.stderr)


def test_without_credentials_only_loopback_clients_are_served(tmp_path):
    app = sqlite_app(tmp_path)
    assert client_for(app, host="127.0.0.1").get("/api/overview").status_code == 200
    refused = client_for(app, host="192.0.2.7").get("/api/overview")
    assert refused.status_code == 403 and "loopback" in refused.json()["error"]


def test_password_guards_pages_and_actions(tmp_path):
    app = sqlite_app(tmp_path)
    add, _ = register(app)
    r = add.delay(1, 1)
    client = client_for(app, host="192.0.2.7", password="s3cret")
    assert client.get("/").status_code == 401
    assert client.get("/").headers["www-authenticate"].startswith("Basic")
    assert client.post(f"/api/tasks/{r.id}/cancel", headers=ACTION).status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"me:nope").decode()}
    assert client.get("/api/overview", headers=wrong).status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"me:s3cret").decode()}
    assert client.get("/", headers=good).status_code == 200
    assert client.post(f"/api/tasks/{r.id}/cancel", headers=good).status_code == 403          # no action header
    assert r.state == states.PENDING
    assert client.post(f"/api/tasks/{r.id}/cancel", headers={**good, **ACTION}).json()["state"] == states.REVOKED


def test_token_once_in_the_url_then_a_cookie(tmp_path):
    app = sqlite_app(tmp_path)
    client = client_for(app, host="192.0.2.7", token="t0ken")
    assert client.get("/api/overview").status_code == 401
    assert client.get("/?token=t0ken").status_code == 200
    assert client.get("/api/overview").status_code == 200            # the cookie set above
    other = client_for(app, host="192.0.2.7", token="t0ken")
    assert other.get("/api/overview", headers={"Authorization": "Bearer t0ken"}).status_code == 200
    assert other.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401


# -- worker metrics and the commands ----------------------------------------------------------------

def test_worker_metrics_count_runs_retries_and_time(tmp_path):
    from nbqueue.metrics import WorkerMetrics

    app = sqlite_app(tmp_path)
    add, boom = register(app)
    tries = []

    @app.task(name="again", retry_count=1)
    def again():
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("once")
        return "ok"

    worker = app.worker(1)
    metrics = WorkerMetrics(worker)
    worker.start()
    add.delay(1, 2).get(timeout=20)
    r = boom.delay("x")
    wait_for(r.ready, timeout=20)
    assert again.delay().get(timeout=30) == "ok"
    worker.stop()
    reg = metrics.registry
    assert reg.get_sample_value("nbqueue_tasks_total", {"name": "add", "state": "SUCCESS"}) == 1
    assert reg.get_sample_value("nbqueue_tasks_total", {"name": "boom", "state": "FAILURE"}) == 1
    assert reg.get_sample_value("nbqueue_tasks_total", {"name": "again", "state": "RETRY"}) == 1
    assert reg.get_sample_value("nbqueue_tasks_total", {"name": "again", "state": "SUCCESS"}) == 1
    assert reg.get_sample_value("nbqueue_task_retries_total", {"name": "again"}) == 1
    assert reg.get_sample_value("nbqueue_task_run_seconds_count", {"name": "again"}) == 2
    assert reg.get_sample_value("nbqueue_task_queue_wait_seconds_count", {"name": "add"}) == 1
    assert reg.get_sample_value("nbqueue_tasks_running") == 0


def test_a_failing_event_hook_does_not_fail_the_task(tmp_path):
    app = sqlite_app(tmp_path)
    add, _ = register(app)
    worker = app.worker(1)
    worker.events.on_start.append(lambda *a: 1 / 0)
    worker.events.on_finish.append(lambda *a: 1 / 0)
    worker.start()
    assert add.delay(2, 2).get(timeout=20) == 4
    worker.stop()


def test_nbqueue_worker_metrics_port_serves_prometheus_text(tmp_path, monkeypatch):
    from conftest import cli_worker, free_port

    (tmp_path / "mtasks.py").write_text(
        "import nbqueue\napp = nbqueue.App('sqlite:///dash.db')\n\n@app.task(name='add')\ndef add(x, y):\n    return x "
        "+ y\n"
    )
    port = free_port()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import mtasks

    try:
        with cli_worker(mtasks.app, tmp_path, "mtasks", "-c", "1", "--metrics-port", str(port)):
            assert mtasks.app.send_task(mtasks.app.signature("add", (2, 3))).get(timeout=30) == 5

            def scraped():
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                except OSError:
                    return None
                return text if 'nbqueue_tasks_total{name="add",state="SUCCESS"} 1.0' in text else None
            text = wait_for(scraped, timeout=20, message="the worker's metrics")
            assert "nbqueue_task_run_seconds_bucket" in text
    finally:
        sys.modules.pop("mtasks", None)


def test_dashboard_thread_starts_and_stops(tmp_path):
    from nbqueue.dashboard import start

    app = sqlite_app(tmp_path)
    dash = start(app, port=0)
    assert dash.port != 0 and f":{dash.port}/" in dash.url
    try:
        body = json.loads(urllib.request.urlopen(dash.url + "api/overview", timeout=10).read())
        assert body["default_queue"] == app.default_queue
    finally:
        dash.stop()
    assert not dash.thread.is_alive()


def test_server_proxy_entry_point_describes_the_command():
    from nbqueue.dashboard import server_proxy

    spec = server_proxy()
    assert spec["command"][1:5] == ["-m", "nbqueue", "dashboard", "--port"] and spec["command"][5] == "{port}"


# -- SQLite under load ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_sqlite_dashboard_reads_only_while_four_worker_processes_drain(tmp_path):
    """The dashboard's queries on the SQLite file are reads (no write statement, no write
    transaction), and every page and stream answers while 4 `nbqueue worker` processes
    drain 10,000 tasks."""
    (tmp_path / "ltasks.py").write_text(
        "import nbqueue\napp = nbqueue.App('sqlite:///load.db')\n\n@app.task(name='inc')\ndef inc(x):\n    return x + "
        "1\n"
    )
    sys.path.insert(0, str(tmp_path))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    procs = []
    try:
        import ltasks

        app = ltasks.app
        n = 10_000
        for start in range(0, n, 2000):
            app.send_many(app.signature("inc", (i,)) for i in range(start, start + 2000))
        statements: list[str] = []
        store = app.backend.store
        with store._lock:
            store.conn.set_trace_callback(statements.append)
        client = client_for(app)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "nbqueue", "worker", "--app", "ltasks:app", "-c", "2"],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(4)
        ]
        codes: list[int] = []
        streamed: list[dict] = []
        stop = threading.Event()

        def follow() -> None:
            with client_for(app).stream("GET", "/api/events?view=home") as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        streamed.append(json.loads(line[6:]))
                    if stop.is_set():
                        return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()

        def drained() -> bool:
            for path in ("/", "/api/tasks?state=SUCCESS", "/api/overview", "/metrics", "/api/tasks?q=99"):
                codes.append(client.get(path).status_code)
            return app.count_tasks().get((states.SUCCESS, "inc"), 0) == n

        wait_for(drained, timeout=240, interval=0.2, message="10,000 tasks drained")
        wait_for(lambda: any(e["tasks"]["by_state"].get(states.SUCCESS) == n for e in streamed), timeout=60,
                 message="the stream showing them all")
        stop.set()
        with store._lock:
            store.conn.set_trace_callback(None)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        os.chdir(cwd)
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ltasks", None)
    assert codes and set(codes) == {200}, set(codes)
    assert len(streamed) >= 2
    writes = [
        s
        for s in statements
        if s.split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE", "REPLACE", "BEGIN", "CREATE")
    ]
    assert statements and not writes, writes[:5]


def test_cancel_workflow_revokes_what_has_not_run(tmp_path):
    """Given a chain whose first step runs and a group waiting behind it, cancelling the
    workflow revokes every task not finished; the running step's late result is fenced out."""
    app = sqlite_app(tmp_path)
    gate = threading.Event()

    @app.task(name="slow")
    def slow(x):
        gate.wait(20)
        return x

    @app.task(name="add")
    def add(x, y):
        return x + y

    worker = app.start_worker(1)
    flow = app.send(slow.s(1) | nbqueue.group(add.s(i) for i in range(3)))
    first = flow.results[0]
    wait_for(lambda: first.state == states.STARTED, timeout=20)
    out = client_for(app).post(f"/api/tasks/{first.id}/cancel-workflow", headers=ACTION).json()
    assert (
        out["ok"] and out["revoked"] == 5 and "5 of the workflow's 5" in out["message"]
    )  # the step, the group, 3 members
    gate.set()
    wait_for(lambda: app.backend.get(first.id)["finished_at"] is not None, timeout=20)
    worker.stop()
    tree = app.workflow(first.id)
    assert tree["steps"][0]["state"] == states.REVOKED
    assert {m["state"] for m in tree["steps"][1]["members"]} == {states.REVOKED}


def test_a_queue_is_known_from_tasks_and_workers_even_when_empty(tmp_path):
    app = sqlite_app(tmp_path)

    @app.task(name="mail", queue="emails")
    def mail():
        return None

    client = client_for(app)
    assert client.get("/api/queues/emails").json()["queue"] == {
        "queue": "emails",
        "ready": 0,
        "delayed": 0,
        "in_flight": 0,
        "dead": 0,
    }
    assert client.get(f"/api/queues/{app.default_queue}").status_code == 200
    worker = app.start_worker(1, queues=["reports"])
    wait_for(lambda: app.status()["workers"], timeout=20)
    assert client.get("/queues/reports").status_code == 200
    worker.stop()


def test_a_backend_that_cannot_list_still_serves_the_page_and_task_pages(tmp_path):
    from conftest import store_url

    app = nbqueue.App(f"sqlite:///{tmp_path}/broker.db", backend=store_url("amqp-results", tmp_path))
    try:
        add, _ = register(app)
        worker = app.start_worker(1)
        r = add.delay(4, 5)
        assert r.get(timeout=30) == 9
        worker.stop()
        client = client_for(app)
        home = client.get("/api/tasks")
        assert (
            home.status_code == 200
            and home.json()["tasks"] == []
            and "a task's page is still found by its id" in home.json()["unsupported"]
        )
        assert client.get("/").status_code == 200
        assert client.get(f"/api/tasks/{r.id}").json()["result"] == {"kind": "text", "text": "9"}
        assert "nbqueue_queue_messages" in client.get("/metrics").text
    finally:
        app.backend.delete_queues()
        app.close()


def test_nbqueue_dashboard_magic_shows_an_iframe_and_stops(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    from nbqueue.notebook import magics as nbmagics

    from conftest import ipython_shell

    shell = ipython_shell(monkeypatch)
    shell.reset(new_session=False)
    app = sqlite_app(tmp_path)
    shell.user_ns["app"] = app
    nbmagics.load_ipython_extension(shell, concurrency=1)
    try:
        frame = shell.run_line_magic("nbqueue", "dashboard --port 0 --height 400")
        port = int(frame.src.rsplit(":", 1)[1].rstrip("/"))
        assert type(frame).__name__ == "IFrame" and frame.src == f"http://127.0.0.1:{port}/" and frame.height == 400
        assert port != 0
        body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview", timeout=10).read())
        assert body["default_queue"] == app.default_queue
        assert shell.run_line_magic("nbqueue", "dashboard").src == frame.src         # the same one again
        shell.run_line_magic("nbqueue", "dashboard stop")
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview", timeout=2)
    finally:
        nbmagics.unload_ipython_extension(shell)
        for worker in list(app.workers):
            worker.stop()
        app.close()


def test_nbqueue_dashboard_command_serves_the_app(tmp_path):
    from conftest import free_port

    (tmp_path / "ctasks.py").write_text("import nbqueue\napp = nbqueue.App('sqlite:///c.db', default_queue='cq')\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbqueue", "dashboard", "--app", "ctasks:app", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        def overview():
            try:
                return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview", timeout=5).read())
            except OSError:
                return None
        assert wait_for(overview, timeout=60, message="nbqueue dashboard answering")["default_queue"] == "cq"
        missing = urllib.request.Request(f"http://127.0.0.1:{port}/tasks/nope")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(missing, timeout=5)
        assert err.value.code == 404 and "no task with id 'nope'" in html.unescape(err.value.read().decode())
    finally:
        proc.terminate()
        proc.wait(20)
    assert f"http://127.0.0.1:{port}/" in proc.stdout.read()
