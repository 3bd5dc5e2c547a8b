"""The dashboard in a real browser (Playwright driving Debian's Chromium) against a running worker."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import nbqueue
from nbqueue import states
from nbqueue.testing import wait_for

from conftest import CHROMIUM, CHROMIUM_ARGS, IN_CI

#: the screenshot (docs/dashboard.png in the README is a copy of one)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        if IN_CI:
            pytest.fail(
                f"{CHROMIUM} is not installed (CI=true: a missing browser is a failure; make browser installs it)"
            )
        pytest.skip(f"{CHROMIUM} is not installed (make browser installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def served(tmp_path):
    """An App on SQLite with a worker of 2 threads, and its dashboard on a free loopback port."""
    from nbqueue.dashboard import start

    app = nbqueue.App(f"sqlite:///{tmp_path}/b.db", default_queue="work")
    gate = threading.Event()

    @app.task(name="resize")
    def resize(width, height):
        gate.wait(30)
        return {"pixels": width * height}

    @app.task(name="parse_invoice")
    def parse_invoice(path):
        raise ValueError(f"invoice {path} has no total line")

    @app.task(name="long_report")
    def long_report(pages):
        gate.wait(30)
        return pages

    worker = app.start_worker(2)
    dash = start(app, port=0, interval=0.2)
    yield app, dash, gate
    gate.set()
    dash.stop()
    worker.stop()
    app.close()


def test_group_moves_to_success_live_traceback_cancel_and_screenshot(browser, served):
    app, dash, gate = served
    # sent first: whichever worker thread claims it runs it before the resizes that hold both threads
    failed = app.send_task(app.signature("parse_invoice", ("2024-03.pdf",)))
    group = app.send(nbqueue.group(app.signature("resize", (w, 600)) for w in (640, 800, 1024, 1280)))
    app.send_task(app.signature("long_report", (40,)).set(countdown=3600))        # waits in the queue: delayed
    wait_for(failed.ready, timeout=20)
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(dash.url)
    ids = [r.id for r in group.results]
    page.wait_for_selector(f"tr[data-id='{ids[0]}']")
    page.evaluate("window.notReloaded = true")
    assert page.locator(f"tr[data-id='{ids[0]}']").get_attribute("data-state") != states.SUCCESS

    # Given the group waiting on the gate, when it opens, the rows turn SUCCESS without a reload
    gate.set()
    group.get(timeout=30)
    page.wait_for_function("ids => ids.every(id => { const row = document.querySelector(`tr[data-id='${id}']`);"
                           " return row && row.dataset.state === 'SUCCESS'; })", arg=ids, timeout=20000)
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("#workers").inner_text().count("threads") == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"))

    # the failed task's page shows its traceback
    page.click(f"tr[data-id='{failed.id}'] a")
    page.wait_for_selector("#traceback")
    traceback = page.locator("#traceback").inner_text()
    assert "ValueError: invoice 2024-03.pdf has no total line" in traceback and "parse_invoice" in traceback
    assert page.locator("h1 .state").inner_text() == states.FAILURE

    # cancel a running task: behind a confirmation, then the page shows the real outcome
    gate.clear()
    running = app.send_task(app.signature("long_report", (12,)))
    wait_for(lambda: running.state == states.STARTED, timeout=20)
    page.goto(dash.url.rstrip("/") + f"/tasks/{running.id}")
    page.wait_for_selector("h1 .state.STARTED")
    page.click("#cancel")
    assert page.locator("#confirm").is_visible()
    page.click("#confirm-yes")
    page.wait_for_selector("h1 .state.REVOKED", timeout=20000)
    assert "revoked" in page.locator("#flash").inner_text()
    gate.set()              # the run ends; its late result is fenced out
    wait_for(lambda: app.backend.get(running.id)["finished_at"] is not None, timeout=10)
    page.wait_for_timeout(600)
    assert running.state == states.REVOKED and page.locator("h1 .state").inner_text() == states.REVOKED
    page.close()
    assert not errors, errors


def test_filters_and_queue_page_in_the_browser(browser, served):
    app, dash, gate = served
    gate.set()
    done = [app.send_task(app.signature("resize", (w, 2))) for w in (3, 5)]
    bad = app.send_task(app.signature("parse_invoice", ("q1-zebra.pdf",)))
    for r in done:
        r.get(timeout=20)
    wait_for(bad.ready, timeout=20)
    page = browser.new_page()
    page.goto(dash.url)
    page.fill("#filters input[name=q]", "zebra")
    page.click("#filters button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#tasks tbody tr[data-id]').length === 1")
    assert page.locator("#tasks tbody tr[data-id]").get_attribute("data-id") == bad.id
    assert "q=zebra" in page.url
    page.goto(dash.url.rstrip("/") + "/queues/work")
    page.wait_for_selector("#purge")
    page.click("#purge")
    page.click("#confirm-no")                   # going back does nothing
    assert not page.locator("#flash").is_visible()
    response = page.goto(dash.url.rstrip("/") + "/queues/no-such-queue")
    assert response.status == 404 and "no queue named 'no-such-queue'" in page.content()
    page.close()
