"""The notebooks, executed top to bottom with nbclient; a kernel restart; the Binder setup.

Each notebook runs on a copy in a temporary directory (its SQLite file lands there),
in a kernel of this virtual environment's Python. Under nbclient the views are in
``both`` mode (widgets.py), so the executed notebook holds the final widget state in
its metadata and the progress lines in its outputs; both are checked.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REDIS_URL, private_redis_url, require_server

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
DEMO_REDIS = os.environ.get("NBQUEUE_TEST_DEMO_REDIS", REDIS_URL)

pytestmark = pytest.mark.slow


def execute(name: str, workdir: Path, km=None, source_dir: Path = NOTEBOOKS) -> nbformat.NotebookNode:
    if source_dir != workdir:
        shutil.copy(source_dir / name, workdir / name)
    nb = nbformat.read(workdir / name, as_version=4)
    client = NotebookClient(
        nb, timeout=180, kernel_name="python3", km=km, resources={"metadata": {"path": str(workdir)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, workdir / f"executed-{name}")   # kept in the tmp dir for a look when a test fails
    return nb


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def cell_text(cell) -> str:
    """Everything a cell printed or returned, as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
        else:
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def cell_result(cell) -> str:
    """The text of a cell's value (its execute_result); progress lines may be printed beside it."""
    results = [o for o in cell.get("outputs", []) if o.output_type == "execute_result"]
    assert len(results) == 1, cell.source
    return results[0]["data"]["text/plain"]


def cell_starting(nb, prefix: str):
    matches = [c for c in code_cells(nb) if c.source.startswith(prefix)]
    assert len(matches) == 1, f"expected one cell starting with {prefix!r}"
    return matches[0]


def widget_models(nb, model_name: str) -> list[dict]:
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return [m["state"] for m in state.values() if m["state"].get("_model_name") == model_name]


def html_widgets_with(nb, *needles: str) -> list[str]:
    return [m.get("value", "") for m in widget_models(nb, "HTMLModel") if all(n in m.get("value", "") for n in needles)]


def has_widget_view(cell) -> bool:
    return any("application/vnd.jupyter.widget-view+json" in out.get("data", {}) for out in cell.get("outputs", []))


def leftovers(workdir: Path, name: str) -> list[str]:
    """Files a notebook run left in its directory that git would report as untracked
    (the notebook, its executed copy and the git-ignored .nbqueue/ aside)."""
    ignored = {name, f"executed-{name}", ".nbqueue", ".ipynb_checkpoints"}
    return sorted(p.name for p in workdir.iterdir() if p.name not in ignored)


def assert_no_errors(nb) -> None:
    errors = [cell_text(c) for c in code_cells(nb) if any(o.output_type == "error" for o in c.get("outputs", []))]
    assert not errors, errors


# -- the notebooks --------------------------------------------------------------------------------------

def test_notebooks_are_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code_cells(nb)), path.name
        assert nb.metadata.kernelspec.name == "python3"
    assert [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb"))] == [
        "01-quickstart.ipynb", "02-workflows.ipynb", "03-cell-tasks.ipynb", "04-production.ipynb", "05-export.ipynb",
        "06-process-pool.ipynb", "07-remember.ipynb"]


def test_kernelspec_python3_runs_this_virtual_environment():
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    assert km.format_kernel_cmd()[0] == sys.executable


def test_quickstart_runs_the_machinery_example(tmp_path):
    nb = execute("01-quickstart.ipynb", tmp_path)
    assert_no_errors(nb)
    assert cell_result(cell_starting(nb, "res.get(timeout=10)")) == "55"
    view_cell = cell_starting(nb, '@app.task(name="sum")')
    assert has_widget_view(view_cell) and "[nbqueue] sum" in cell_text(view_cell)
    assert html_widgets_with(nb, "<b>sum</b>", "SUCCESS")                       # the widget's final state
    assert html_widgets_with(nb, "→ <code>55</code>")
    assert re.search(r"sum = 6, started \+\d+\.\d\ds after its ETA", cell_text(cell_starting(nb, "value = later.get")))
    assert "flaky(21) = 42 after 2 retries" in cell_text(cell_starting(nb, "attempts = []"))
    assert "callback: 10 / 4: 2.5" in cell_text(cell_starting(nb, '@app.task(name="divide")'))
    failed = cell_text(cell_starting(nb, "res = app.send_task(divide.s(1, 0)"))
    assert (
        "failed as expected: ZeroDivisionError division by zero" in failed
        and "error callback: division by zero" in failed
    )
    frame = cell_starting(nb, "app.tasks(limit=8)").outputs[0]["data"]
    assert "<table" in frame["text/html"] and "ZeroDivisionError" in frame["text/html"]
    assert leftovers(tmp_path, "01-quickstart.ipynb") == []


def test_workflows_show_progress_bars_that_reach_completion(tmp_path):
    nb = execute("02-workflows.ipynb", tmp_path)
    assert_no_errors(nb)
    assert cell_result(cell_starting(nb, "squares.get")) == "[1, 4, 9, 16, 25]"
    assert cell_result(cell_starting(nb, "sum_of_squares.get")) == "385"
    assert cell_result(cell_starting(nb, "pipeline.get")) == "169"
    bars = sorted((m["value"], m["max"], m["bar_style"]) for m in widget_models(nb, "IntProgressModel"))
    assert bars == [(3, 3, "success"), (8, 8, "success"), (10, 10, "success"), (20, 20, "success")]
    assert html_widgets_with(nb, "group of 20", "SUCCESS") and html_widgets_with(nb, "20/20 done: 20 succeeded")
    assert html_widgets_with(nb, "chord of 10", "SUCCESS") and html_widgets_with(nb, "→ <code>385</code>")
    steps = html_widgets_with(nb, 'class="nbqueue-steps"')
    assert len(steps) == 1 and steps[0].count("SUCCESS") == 3 and "<code>169</code>" in steps[0]
    for prefix in ("squares = app.send", "sum_of_squares = app.send", "pipeline = app.send", "more = app.send"):
        assert has_widget_view(cell_starting(nb, prefix)), prefix
    # the text lines printed for headless runs are in the cell of their view, not in the cells run meanwhile
    for prefix, label in (("squares = app.send", "group of 20"), ("sum_of_squares = app.send", "chord of 10"),
                          ("pipeline = app.send", "chain of 3 steps"), ("more = app.send", "group of 8")):
        lines = [line for line in cell_text(cell_starting(nb, prefix)).splitlines() if line.startswith("[nbqueue]")]
        assert lines and all(line.startswith(f"[nbqueue] {label} ") for line in lines), (prefix, lines)
    for prefix in ("squares.get", "sum_of_squares.get", "pipeline.get", "more.get"):
        assert "[nbqueue]" not in cell_text(cell_starting(nb, prefix)), prefix
    # where widgets do not render (GitHub, nbconvert without widget state): the static table, one row per task
    for prefix, rows, squares in (("squares = app.send", 20, 20), ("sum_of_squares = app.send", 11, 10),
                                  ("pipeline = app.send", 3, 1), ("more = app.send", 8, 8)):
        [static] = [o.data["text/html"] for o in cell_starting(nb, prefix).outputs if "text/html" in o.get("data", {})]
        assert "no table" not in static and static.count("<tr") == rows + 1, prefix
        assert "<th>name</th>" in static and static.count("<td>square</td>") == squares, prefix
    assert leftovers(tmp_path, "02-workflows.ipynb") == []
    frame = cell_starting(nb, "squares.to_frame()").outputs[0]["data"]["text/html"]
    assert frame.count("<td>SUCCESS</td>") == 5
    chain_frame = cell_starting(nb, "pipeline.to_frame()").outputs[0]["data"]["text/plain"]
    assert re.search(r"add\s+\[1, 2\]\s+SUCCESS\s+3", chain_frame) and re.search(r"square.*SUCCESS\s+169", chain_frame)
    assert "sent 8 tasks; the cell returned at once" in cell_text(cell_starting(nb, "more = app.send"))


def test_cell_tasks_notebook(tmp_path):
    nb = execute("03-cell-tasks.ipynb", tmp_path)
    assert_no_errors(nb)
    assert (
        cell_result(cell_starting(nb, "%nbqueue wait stats"))
        == "([4, 5, 6, 7, 8, 9], {'n': 6, 'total': 39, 'mean': 6.5})"
    )
    assert html_widgets_with(nb, "<b>load</b>", "SUCCESS", "→ rows")
    assert html_widgets_with(nb, "<b>stats</b>", "SUCCESS", "→ summary")
    assert html_widgets_with(nb, "<b>oops</b>", "FAILURE")
    assert html_widgets_with(
        nb, "ZeroDivisionError: division by zero", "[10 / n for n in numbers]"
    )  # error and traceback
    outputs = [m["outputs"] for m in widget_models(nb, "OutputModel")]
    assert ["loading…\nkept 6 of 10\n"] in [["".join(o["text"] for o in outs)] for outs in outputs]  # the cell's prints
    assert "(waiting for load)" in cell_text(cell_starting(nb, "%%task stats"))
    tasks = cell_starting(nb, "%nbqueue tasks").outputs[0]["data"]["text/plain"]
    names = [line.split()[2] for line in tasks.splitlines()[1:4]]     # a cell task is listed by its label
    assert sorted(names) == ["load", "oops", "stats"] and "nbqueue.cell" not in tasks
    assert leftovers(tmp_path, "03-cell-tasks.ipynb") == []


def test_production_notebook_runs_a_worker_process_on_redis(tmp_path, monkeypatch):
    require_server("Redis", "127.0.0.1", 6379)
    url = private_redis_url(DEMO_REDIS)              # a key prefix of this test's own, deleted afterwards
    monkeypatch.setenv("NBQUEUE_DEMO_REDIS", url)
    scratch = tmp_path.parent / f"{tmp_path.name}-scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))       # the kernel's temporary directories
    nb = execute("04-production.ipynb", tmp_path)
    assert_no_errors(nb)
    assert f"using Redis at {url}" in cell_text(code_cells(nb)[0])
    pid = int(re.search(r"worker process (\d+) is up", cell_text(cell_starting(nb, "log = open("))).group(1))
    ran = cell_text(cell_starting(nb, "print(squares.get"))
    assert "[1, 4, 9, 16, 25, 36, 49, 64]" in ran and re.search(rf"ran on: \['[^']*:{pid}:[0-9a-f]+'\]", ran)
    answer = cell_text(cell_starting(nb, "%nbqueue wait remote"))
    kernel_pid = int(re.search(r"kernel pid (\d+)", answer).group(1))
    assert "answer = 285" in answer and f"worker pid {pid}" in answer and kernel_pid != pid
    assert html_widgets_with(nb, "<b>remote</b>", "SUCCESS", "→ answer")
    assert [f"running in process {pid}\n"] in [
        ["".join(o["text"] for o in m["outputs"])] for m in widget_models(nb, "OutputModel")
    ]
    stopped = cell_text(cell_starting(nb, "worker.terminate()"))
    assert "worker exited with 0" in stopped and "stopped after 9 task(s)" in stopped
    assert leftovers(tmp_path, "04-production.ipynb") == []        # its scratch files were in a temporary directory ...
    assert list(scratch.iterdir()) == []                            # ... removed at the end


def test_remember_notebook_shows_the_cache_reattach_and_export(tmp_path, monkeypatch):
    scratch = tmp_path.parent / f"{tmp_path.name}-scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))       # the notebook's temporary directory, removed at its end
    nb = execute("07-remember.ipynb", tmp_path)
    assert_no_errors(nb)
    first = cell_text(cell_starting(nb, "t = time.perf_counter()\nfirst ="))
    assert first.startswith("first: 499600 in ") and "{'hit': False" in first
    again = cell_text(cell_starting(nb, "t = time.perf_counter()\nagain ="))
    assert "again: 499600 in " in again and "from the cache: True | the first run's result: True" in again
    assert cell_text(cell_starting(nb, "OFFSET = 200")) == "changed: 499700 | from the cache: False\n"
    waits = [cell_text(c) for c in code_cells(nb) if c.source.startswith("%nbqueue wait table")]
    assert waits == ["[0, 1, 4, 9, 16]\n", "[0, 1, 4, 9, 16] | the second run came from the cache: True\n"]
    stats = cell_result(cell_starting(nb, 'app.status()["cache"]'))
    assert stats == "{'size': 3, 'hits': 2, 'misses': 3, 'shared': 0, 'hit_rate': 0.4}"
    frame = cell_starting(nb, "app.tasks()[").outputs[0]["data"]["text/plain"]
    assert frame.count("table") == 2 and frame.count("fit") == 3 and "nbqueue.cell" not in frame
    assert "its task is STARTED" in cell_text(cell_starting(nb, "from jupyter_client.manager import"))
    reattached = cell_starting(nb, "@app.task\ndef wait_for")
    assert "reattached 1 task(s) of this notebook" in cell_text(reattached) and has_widget_view(reattached)
    assert cell_text(cell_starting(nb, "open(release")) == "reattached: ['wait_for'] -> released\n"
    exported = cell_text(cell_starting(nb, "module = "))
    assert '@app.task(cache="7d", name="fit")' in exported and '@app.task(name="table", cache=True)' in exported
    assert "registered tasks: fit, table, wait_for" in cell_text(cell_starting(nb, "check = "))
    assert leftovers(tmp_path, "07-remember.ipynb") == [] and list(scratch.iterdir()) == []


# -- where text output goes under nbclient -----------------------------------------------------------------

OUTPUT_ROUTING_CELLS = [
    """import threading
import nbqueue
from nbqueue import capture
from nbqueue.notebook import widgets
from nbqueue.testing import wait_for
app = nbqueue.App()
%load_ext nbqueue
gate = threading.Event()

@app.task(name="chatty")
def chatty():
    print("hello from the task")
    gate.wait(60)
    print("bye from the task")
    return 42""",
    # the cell that sends the task: it returns at once, the task keeps running
    """pending = chatty.delay()
pending""",
    # unrelated cells while it runs: its prints and progress lines must not land here
    """wait_for(lambda: "hello" in (capture.peek(pending.id) or ""), timeout=30)
for _ in range(3):
    widgets.UPDATER.flush()
print("unrelated cell 1")""",
    """gate.set()
print("unrelated cell 2:", pending.get(timeout=30))
for _ in range(3):
    widgets.UPDATER.flush()""",
    """print("unrelated cell 3")""",
    # a task that finishes while the cell that shows it runs: its lines are in that cell
    """gate.clear()
shown = chatty.delay()
nbqueue.progress(shown)
wait_for(lambda: "hello" in (capture.peek(shown.id) or ""), timeout=30)
gate.set()
print("value:", shown.get(timeout=30))""",
    """g = app.send(nbqueue.group([chatty.s() for _ in range(2)]))
g""",
    """print("unrelated cell 4:", g.get(timeout=30))
for _ in range(3):
    widgets.UPDATER.flush()""",
]


def test_text_output_of_a_task_goes_to_the_cell_that_sent_it_or_nowhere(tmp_path):
    """Under nbclient (views in ``both`` mode: widget and text lines), a pending task's
    progress lines and its prints never show up in the unrelated cells run meanwhile."""
    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    nb.cells = [nbformat.v4.new_code_cell(source) for source in OUTPUT_ROUTING_CELLS]
    nbformat.write(nb, tmp_path / "routing.ipynb")
    nb = execute("routing.ipynb", tmp_path, source_dir=tmp_path)
    assert_no_errors(nb)
    cells = code_cells(nb)
    for index, expected in ((2, "unrelated cell 1\n"), (3, "unrelated cell 2: 42\n"), (4, "unrelated cell 3\n"),
                            (7, "unrelated cell 4: [42, 42]\n")):
        assert cell_text(cells[index]) == expected, (index, cell_text(cells[index]))
    sender = cell_text(cells[1])
    assert "[nbqueue] chatty" in sender and "bye from the task" not in sender
    shown = cell_text(cells[5])
    assert "hello from the task" in shown and "bye from the task" in shown and "value: 42" in shown
    assert re.search(r"\[nbqueue\] chatty \w{8}: SUCCESS in \S+ → 42", shown)
    assert "[nbqueue] group of 2" in cell_text(cells[6])


# -- a kernel restart -------------------------------------------------------------------------------------

# The tasks are defined before %load_ext starts the kernel's worker: a task delivered again
# after a restart must find its definition (a worker fails task names it does not know).
SETUP = """
import os, time
import nbqueue
app = nbqueue.App(visibility_timeout=2)

@app.task
def add(x, y):
    return x + y

@app.task
def slow():
    if not os.path.exists("first-attempt"):
        open("first-attempt", "w").close()
        time.sleep(600)                    # the first attempt never finishes: its kernel dies
    return "finished on attempt " + str(nbqueue.current_task()["token"])

%load_ext nbqueue
"""


def run_code(kc, code: str, timeout: float = 60) -> str:
    out: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("ERROR " + msg["content"]["ename"] + ": " + msg["content"]["evalue"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    text = "".join(out)
    assert reply["content"]["status"] == "ok", text
    return text


def test_after_a_kernel_restart_results_remain_and_a_running_task_is_delivered_again(tmp_path):
    from jupyter_client.manager import start_new_kernel

    import nbqueue

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        run_code(kc, SETUP)
        ids = run_code(
            kc, "quick = add.delay(2, 3)\nprint(quick.get(timeout=30))\nlong = slow.delay()\nprint(quick.id, long.id)"
        )
        value, quick_id, long_id = ids.split()[-3:]
        assert value == "5"
        deadline = time.monotonic() + 60
        while not (tmp_path / "first-attempt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "first-attempt").exists()          # the long task is running in the kernel
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)                          # killed, not asked to stop

    observer = nbqueue.App(f"sqlite:///{tmp_path}/.nbqueue/nbqueue.db")
    assert observer.result(long_id).state in ("RECEIVED", "STARTED")

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        run_code(kc, SETUP)
        out = run_code(kc, f"print(app.result({quick_id!r}).get(timeout=5))\n"
                           f"print(sorted(app.tasks()['name']))\n"
                           f"print(app.result({long_id!r}).get(timeout=60))")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    lines = out.strip().splitlines()
    assert lines[-3] == "5"
    assert lines[-2] == "['add', 'slow']"
    assert lines[-1] == "finished on attempt 2"
    assert observer.result(long_id).state == "SUCCESS"
    observer.close()


# -- Binder ----------------------------------------------------------------------------------------------------

def test_binder_requirements_install_into_a_fresh_venv_and_run_the_quickstart(tmp_path, monkeypatch):
    """binder/requirements.txt and postBuild, as repo2docker runs them, then 01 in a kernel of that venv."""
    monkeypatch.delenv("PYTHONPATH", raising=False)     # the venv's processes import its own nbqueue only
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    source = tmp_path / "repo"                      # pip builds nbqueue from a copy: the work tree stays clean
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("nbqueue", "binder", "notebooks"):
        shutil.copytree(
            REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", ".nbqueue", ".ipynb_checkpoints")
        )
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    started = time.monotonic()
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-r", "binder/requirements.txt"],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "VIRTUAL_ENV": str(venv),
    }
    post = subprocess.run(["bash", "binder/postBuild"], cwd=source, env=env, capture_output=True, text=True)
    assert post.returncode == 0, post.stdout + post.stderr
    print(f"binder install + postBuild took {time.monotonic() - started:.1f}s")
    assert "nbqueue 0.1.0 with ipywidgets 8" in post.stdout
    config = (tmp_path / "jupyter-config" / "jupyter_server_config.py").read_text()
    assert 'c.ServerApp.default_url = "/lab/tree/notebooks/01-quickstart.ipynb"' in config
    probe = subprocess.run([str(python), "-c", "import nbqueue, sys; print(nbqueue.__file__); print(sys.prefix)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert probe[0].startswith(str(venv)) and probe[1] == str(venv)   # its own nbqueue, not this checkout's

    kernels = tmp_path / "kernels" / "binder-venv"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "binder venv", "language": "python"}))
    km = KernelManager(
        kernel_name="binder-venv", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    )
    workdir = source / "notebooks"
    nb = execute("01-quickstart.ipynb", workdir, km=km)
    assert_no_errors(nb)
    assert cell_result(cell_starting(nb, "res.get(timeout=10)")) == "55"
    assert html_widgets_with(nb, "<b>sum</b>", "SUCCESS")
    assert (workdir / ".nbqueue" / "nbqueue.db").exists()
