"""The notebook remembers: ``%%task --cache``, provenance in ``app.tasks()``, reattaching after a
kernel restart, and the cache across a restart in a real kernel (nbclient)."""
from __future__ import annotations

import time

import nbformat
import pytest
from test_magics import run

import nbqueue
from nbqueue import builtin
from nbqueue.notebook import magics as nbmagics

from conftest import ipython_shell


@pytest.fixture
def shell(monkeypatch, tmp_path):
    ipython = ipython_shell(monkeypatch)
    ipython.reset(new_session=False)
    app = nbqueue.App(f"sqlite:///{tmp_path}/nb.db")
    ipython.user_ns["app"] = app
    ipython.user_ns["__session__"] = str(tmp_path / "analysis.ipynb")
    ipython.nbq = nbmagics.load_ipython_extension(ipython, concurrency=2)
    yield ipython
    nbmagics.unload_ipython_extension(ipython)
    app.close()


def test_cell_task_with_cache_hits_on_the_same_source_and_inputs_and_misses_when_an_input_changes(shell):
    run(shell, "limit = 5")
    cell = "total = sum(range(limit))\ntotal"
    first = shell.run_cell_magic("task", "summed -o out --cache", cell)
    assert first.get(timeout=20) == 10
    app = shell.user_ns["app"]
    assert app.cache_info(first.id) == {"hit": False, "key": app.cache_info(first.id)["key"]}
    second = shell.run_cell_magic("task", "summed -o out --cache", cell)
    assert second.get(timeout=5) == 10 and app.cache_info(second.id)["from"] == first.id
    run(shell, "%nbqueue wait summed")
    assert shell.user_ns["out"] == 10                           # -o binds a hit's value too
    run(shell, "limit = 6")
    third = shell.run_cell_magic("task", "summed -o out --cache", cell)
    assert third.get(timeout=20) == 15 and app.cache_info(third.id)["hit"] is False
    plain = shell.run_cell_magic("task", "summed", cell)        # without --cache: it runs
    assert plain.get(timeout=20) == 15 and app.cache_info(plain.id) is None
    assert app.cache_clear(task="summed") == 2


def test_tasks_show_where_each_came_from(shell, tmp_path):
    run(shell, "@app.task(name='double')\ndef double(x):\n    return 2 * x\n")
    count = shell.execution_count                               # the count of the cell that sends
    run(shell, "r = double.delay(4)\nr.get(timeout=20)")
    cell = shell.run_cell_magic("task", "labelled", "1 + 1")
    cell.get(timeout=20)
    frame = shell.user_ns["app"].tasks()
    rows = {row["name"]: row for _, row in frame.iterrows()}
    assert set(rows) == {"double", "labelled"}                  # a %%task's label, not nbqueue.cell
    assert rows["double"]["notebook"] == str(tmp_path / "analysis.ipynb") and rows["double"]["cell"] == count
    assert len(rows["double"]["code_hash"]) == 16 and rows["labelled"]["code_hash"] != rows["double"]["code_hash"]
    assert frame["cached_from"].isna().all()


def test_reattach_returns_what_an_earlier_kernel_of_the_notebook_left_unseen(shell, monkeypatch, tmp_path):
    app = shell.user_ns["app"]
    run(shell, "@app.task(name='double')\ndef double(x):\n    return 2 * x\n")
    nbmagics.magics_of(shell).stop_worker(wait=True)
    worker = app.worker()
    monkeypatch.setattr(builtin, "PROCESS_TOKEN", "host:1:earlier")     # sent "by an earlier kernel"
    run(shell, "seen = double.delay(1)")
    worker.drain()                                                # finished, and seen: the next cell marks it so
    run(shell, "unseen = double.delay(2)\nrunning = double.apply_async((3,), queue='elsewhere')")
    monkeypatch.setattr(builtin, "PROCESS_TOKEN", "host:2:now")   # the kernel after a restart ...
    time.sleep(0.01)
    worker.drain()                                                # ... "unseen" finished after its last cell
    run(shell, "mine = double.delay(4)")                          # this kernel's own: its views show it already
    found = run(shell, "%nbqueue reattach")
    assert [r.id for r in found] == [shell.user_ns["unseen"].id, shell.user_ns["running"].id]
    assert [r.name for r in found] == ["double", "double"]
    assert list(run(shell, "%nbqueue reattach")) == []            # this kernel shows them from now on
    worker.drain()
    assert list(app.reattach(str(tmp_path / "analysis.ipynb"))) == []
    assert list(app.reattach(str(tmp_path / "other.ipynb"))) == []
    app.worker(queues=["elsewhere"]).drain()                      # its view (text mode here) ends
    assert shell.user_ns["running"].get(timeout=10) == 6


# -- a real kernel, restarted ----------------------------------------------------------------------------

KERNEL_SETUP = '''
import nbqueue, os, time
app = nbqueue.App(visibility_timeout=2)
SCALE = 3

@app.task
def until(path):
    while not os.path.exists(path):
        time.sleep(0.02)
    return "released"

@app.task(cache=True)
def slow_square(x):
    with open("runs.log", "a") as fh:
        fh.write("run\\n")
    return x * x * SCALE

%load_ext nbqueue
'''


def _stdout(cell) -> str:
    """What a cell printed, whichever stream messages the kernel split it into."""
    return "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream" and o["name"] == "stdout")


def _kernel_pid(client, nb) -> int:
    cell = nbformat.v4.new_code_cell("import os\nprint(os.getpid())")
    nb.cells.append(cell)
    client.execute_cell(cell, len(nb.cells) - 1)
    nb.cells.remove(cell)
    return int(cell.outputs[0]["text"])


def test_in_a_real_kernel_the_cache_survives_a_restart_and_a_changed_global_misses(tmp_path):
    from nbclient import NotebookClient
    from nbclient.util import run_sync

    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": kernelspec})
    nb.cells = [nbformat.v4.new_code_cell(KERNEL_SETUP),
                nbformat.v4.new_code_cell("r = slow_square.delay(7)\nprint(r.get(timeout=60), r.id)")]
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        client.execute_cell(nb.cells[1], 1)
        value, first_id = nb.cells[1].outputs[0]["text"].split()
        nb.cells.append(nbformat.v4.new_code_cell("held = until.delay('release')\nprint(held.id)"))
        client.execute_cell(nb.cells[2], 2)
        held_id = nb.cells.pop(2).outputs[0]["text"].strip()     # running in this kernel's worker when it dies
        pid_before = _kernel_pid(client, nb)
        run_sync(client.km.restart_kernel)(now=True)
        run_sync(client.kc.wait_for_ready)(timeout=60)
        assert _kernel_pid(client, nb) != pid_before              # a new kernel process: nothing in memory
        client.execute_cell(nb.cells[0], 0)
        nb.cells.append(nbformat.v4.new_code_cell(
            "import time\nt = time.perf_counter()\nr = slow_square.delay(7)\n"
            "print(r.get(timeout=60), app.cache_info(r.id), round((time.perf_counter() - t) * 1000, 1))"))
        client.execute_cell(nb.cells[2], 2)
        nb.cells.append(nbformat.v4.new_code_cell(
            "SCALE = 4\nr = slow_square.delay(7)\nprint(r.get(timeout=60), app.cache_info(r.id))"))
        client.execute_cell(nb.cells[3], 3)
        nb.cells.append(nbformat.v4.new_code_cell(
            "import threading\nsent = []\nbarrier = threading.Barrier(2)\n"
            "def send():\n    barrier.wait()\n    sent.append(slow_square.delay(9))\n"
            "threads = [threading.Thread(target=send) for _ in range(2)]\n"
            "for t in threads: t.start()\nfor t in threads: t.join()\n"
            "infos = [app.cache_info(s.id) for s in sent]\n"
            "print([s.get(timeout=60) for s in sent], sorted('waiting_for' in i or i['hit'] for i in infos))"))
        client.execute_cell(nb.cells[4], 4)
        nb.cells.append(nbformat.v4.new_code_cell(
            "found = app.reattach()\nprint(*[r.id for r in found])\nopen('release', 'w').close()\n"
            "print(found[0].get(timeout=60))\nprint(list(app.reattach()))"))
        client.execute_cell(nb.cells[5], 5)
    assert value == "147"
    hit = nb.cells[2].outputs[0]["text"]
    assert hit.startswith("147 {'hit': True, 'from': '" + first_id + "'")
    print("cache hit after a restart, round trip in ms:", hit.split()[-1])
    assert nb.cells[3].outputs[0]["text"].startswith("196 {'hit': False")
    assert nb.cells[4].outputs[0]["text"].strip() == "[324, 324] [False, True]"   # one ran; the other shared it or hit
    assert _stdout(nb.cells[5]).split() == [held_id, "released", "[]"]
    assert (tmp_path / "runs.log").read_text().count("run") == 3   # 7 once, 7 with SCALE 4, 9 once
