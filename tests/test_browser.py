"""02-workflows.ipynb in JupyterLab, in headless Chromium: the progress bars render and reach 100%;
a running group's Cancel button ends it REVOKED, and its tasks' reported progress bars move.

JupyterLab runs on 127.0.0.1 with its own settings, runtime and config directories; the
browser is Debian's Chromium (``make test`` installs it). The screenshot is saved under
tests/artifacts/. Locally a missing Chromium skips this test; under CI=true it fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import CHROMIUM, CHROMIUM_ARGS, IN_CI

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = pytest.mark.slow

# user settings: no news or update checks (no network here), every cell kept in the page
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def _need(condition: bool, message: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing browser or JupyterLab is a failure, not a skip)")
    pytest.skip(message)


_ROOTS: dict[str, str] = {}     # base URL -> the directory that server serves


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on loopback serving a copy of the notebooks; yields its base URL and token."""
    _need(os.path.exists(CHROMIUM), f"{CHROMIUM} is not installed (make test installs Debian's chromium)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _need(False, "jupyterlab is not installed (pip install -e '.[test]')")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "02-workflows.ipynb", root)
    settings = tmp_path / "lab-settings"
    for rel, value in SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    token = uuid.uuid4().hex
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    env.pop("NBQUEUE_PROGRESS", None)
    # the kernel imports the nbqueue under test (a relative PYTHONPATH would not reach it from root)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port=0",          # the server binds a free port and writes it to its runtime file
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--ServerApp.allow_root=True",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    runtime = tmp_path / "runtime" / f"jpserver-{server.pid}.json"
    base = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if base is None:
                base = f"http://127.0.0.1:{json.loads(runtime.read_text())['port']}"
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
                if response.status == 200:
                    break
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    else:
        server.terminate()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "jupyterlab.log").read_text()[-2000:])
    _ROOTS[base] = str(root)
    yield base, token
    _ROOTS.pop(base, None)
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


ALL_BARS_FULL = """() => {
    const bars = [...document.querySelectorAll('.nbqueue-progress .progress-bar')];
    return bars.length === 4 && bars.every(b => b.style.width === '100%');
}"""
LAST_VALUE_SHOWN = "() => document.body.innerText.includes('[0, 1, 4, 9, 16, 25, 36, 49]')"   # the last cell ran


def _sessions(base: str, token: str) -> list:
    with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5) as response:
        return json.loads(response.read())


def _wait_for_kernel(page, base: str, token: str) -> None:
    """Until the notebook's kernel runs; accepts JupyterLab's "Select Kernel" dialog if it asks (it sometimes does)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.first.click()
        elif _sessions(base, token) and page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').count():
            return
        time.sleep(0.25)
    raise AssertionError("the notebook's kernel did not start")


def test_workflow_progress_bars_render_and_reach_100_percent_in_jupyterlab(jupyterlab):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 3400})
            page.goto(f"{base}/lab/tree/02-workflows.ipynb?token={token}")
            _wait_for_kernel(page, base, token)
            page.click('.lm-MenuBar-itemLabel:text-is("Run")')
            page.click('li.lm-Menu-item[data-command="runmenu:run-all"]')
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (
                page.evaluate(ALL_BARS_FULL) and page.evaluate(LAST_VALUE_SHOWN)
            ):
                time.sleep(0.25)
            page.screenshot(path=str(ARTIFACTS / "02-workflows.png"), full_page=True)
            text = page.inner_text(".jp-Notebook")
            assert page.evaluate(ALL_BARS_FULL) and page.evaluate(LAST_VALUE_SHOWN), text[-3000:]
            page.locator(".nbqueue-chain-view").screenshot(path=str(ARTIFACTS / "02-workflows-chain-view.png"))
            widths = page.eval_on_selector_all(
                ".nbqueue-progress .progress-bar", "bars => bars.map(b => b.style.width)"
            )
            headers = page.eval_on_selector_all(".nbqueue-header", "els => els.map(e => e.innerText)")
        finally:
            browser.close()
    assert widths == ["100%"] * 4
    assert len(headers) == 4 and all("SUCCESS" in h for h in headers)
    assert any(h.startswith("group of 20") for h in headers) and any(h.startswith("chain of 3 steps") for h in headers)
    assert "20/20 done: 20 succeeded" in text and "→ 385" in text and "→ 169" in text
    # an interactive frontend gets the widgets only: no text progress lines
    assert "[nbqueue]" not in text


CANCEL_NOTEBOOK_CELLS = [
    """import time
import nbqueue
app = nbqueue.App("sqlite:///cancel.db")

@app.task(name="train")
def train(i, steps):
    task = nbqueue.current_task()
    for k in range(steps):
        nbqueue.report_progress(k + 1, steps, note=f"member {i} step {k + 1}")
        task.check_cancelled()
        time.sleep(0.05)
    return i

worker = app.start_worker(2)""",
    "g = app.send_group(nbqueue.group([train.si(i, 4000) for i in range(2)]))\ng",
]

TASK_BAR_SELECTOR = ".nbqueue-group-view progress.nbqueue-task-progress"
TASK_BARS = f"() => [...document.querySelectorAll('{TASK_BAR_SELECTOR}')].map(b => Number(b.value))"
GROUP_HEADER = "() => (document.querySelector('.nbqueue-group-view .nbqueue-header') || {}).innerText || ''"


def test_cancel_button_stops_a_running_group_and_task_progress_bars_move_in_jupyterlab(jupyterlab):
    """Click Cancel on a running group's view: it ends REVOKED; before that, its per-task bars move."""
    import nbformat
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    root = Path(_root_of(base, token))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CANCEL_NOTEBOOK_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "cancel.ipynb")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            page.goto(f"{base}/lab/tree/cancel.ipynb?token={token}")
            _wait_for_kernel(page, base, token)
            page.click('.lm-MenuBar-itemLabel:text-is("Run")')
            page.click('li.lm-Menu-item[data-command="runmenu:run-all"]')
            try:
                page.wait_for_function(f"() => document.querySelectorAll('{TASK_BAR_SELECTOR}').length >= 1",
                                       timeout=120_000)
            finally:
                page.screenshot(path=str(ARTIFACTS / "cancel-started.png"), full_page=True)
            first = page.evaluate(TASK_BARS)
            page.wait_for_function(
                f"() => {{ const v = ({TASK_BARS})(); return v.length && Math.max(...v) > {max(first)}; }}",
                timeout=30_000)
            moved = page.evaluate(TASK_BARS)
            page.screenshot(path=str(ARTIFACTS / "cancel-running.png"), full_page=True)
            assert "STARTED" in page.evaluate(GROUP_HEADER)
            page.click(".nbqueue-group-view .nbqueue-cancel")
            page.wait_for_function(f"() => ({GROUP_HEADER})().includes('REVOKED')", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "cancel-revoked.png"), full_page=True)
            header = page.evaluate(GROUP_HEADER)
            text = page.inner_text(".nbqueue-group-view")
        finally:
            browser.close()
    assert max(moved) > max(first) and "REVOKED" in header
    assert "2 not run" in text


def _root_of(base: str, token: str) -> str:
    """The directory the JupyterLab server serves (its root_dir)."""
    url = f"{base}/api/contents/02-workflows.ipynb?token={token}&content=0"
    with urllib.request.urlopen(url, timeout=5) as response:
        json.loads(response.read())
    return _ROOTS[base]
