"""``nbqueue export``: a notebook's tasks, and only the code they need, as an importable module.

Notebooks are built with nbformat in tmp_path. The main one has a task with a helper
function, a class, constants and imports; a task that calls another task; a periodic
task; a ``%%task`` cell; exploratory cells (a plot, prints, a big computation); names
that cannot be resolved (a loop variable, ``exec``, a star-import, a shell line, a value
changed in place later); and IPython lines in exported cells. The exported module is run
by a real ``nbqueue worker --app mytasks:app`` process (no --allow-cells) on an SQLite
file, with PYTHONPATH pointing at the module.
"""
from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import nbqueue
from nbqueue import Signature, TaskFailed, states
from nbqueue.notebook import export as nbexport
from nbqueue.testing import wait_for

REPO = Path(__file__).resolve().parent.parent

IMPORTS = """\
%matplotlib inline
import os
import statistics
from collections import Counter

import nbqueue

app = nbqueue.App.from_env()
"""

HELPERS = """\
SCALE = 10
OFFSETS = {"a": 1, "b": 2}
LETTERS = sorted(Counter("hello world"))  # computed by a call


def scaled(x):
    return x * SCALE + OFFSETS["a"]


class Stats:
    \"\"\"Mean and size.

    A docstring on several lines stays as written.
    \"\"\"

    def __init__(self, values):
        self.values = list(values)

    def as_dict(self):
        return {"mean": statistics.mean(self.values), "n": len(self.values), "letters": len(LETTERS)}
"""

TASKS = """\
@app.task
def score(x):
    return scaled(x)


@app.task(name="total", retry_count=1)
def total_of(xs):
    return sum(score(x) for x in xs)   # a task that calls another task


@app.task()
def describe(xs):
    return Stats(xs).as_dict()


@app.periodic_task("@every 1h")
def heartbeat():
    return "ok"
"""

EXPLORATION = """\
import matplotlib.pyplot as plt
samples = [score(x) for x in range(5)]
plt.plot(samples)
print("mean", statistics.mean(samples))
big = sum(i * i for i in range(10**7))
"""

UNRESOLVABLE = """\
from math import *
for name in ["x"]:
    LABEL = name.upper()
exec("MAGIC = 42")
files = !ls
OFFSETS.update(c=3)


@app.task
def labelled(x):
    return f"{LABEL}{MAGIC}{sqrt(x)}{len(files)}"
"""

INPUTS = """\
values = [1, 2, 3, 4]
threshold = 1
"""

CELL_TASK = """\
%%task weighted -o weighted_out --retry-count 2
import math
%who
weights = [scaled(v) for v in values if v > threshold]
round(math.fsum(weights) / len(weights), 3)
"""

UNRESOLVED = {"LABEL", "MAGIC", "OFFSETS", "files", "sqrt"}


def write_notebook(path: Path, *cells: str) -> Path:
    """Cells starting with '# ' are markdown, the others code."""
    nb = new_notebook(cells=[new_markdown_cell(c[2:]) if c.startswith("# ") else new_code_cell(c) for c in cells])
    nbformat.write(nb, path)
    return path


@pytest.fixture
def notebook(tmp_path) -> Path:
    return write_notebook(tmp_path / "analysis.ipynb", "# Scores", IMPORTS, HELPERS, TASKS, EXPLORATION, UNRESOLVABLE,
                          INPUTS, CELL_TASK)


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbqueue", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def top_level_names(text: str) -> set[str]:
    """Names the module binds at top level."""
    names = set()
    for stmt in ast.parse(text).body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in stmt.names}
        else:
            names |= {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return names


# -- what is exported ------------------------------------------------------------------------------------

def test_tasks_keep_the_imports_helpers_classes_and_constants_they_need_and_nothing_else(notebook, tmp_path):
    result = nbexport.export(notebook, module="mytasks")
    text = result.text
    defined = top_level_names(text)
    # the tasks, under the names the notebook registered them with
    assert result.tasks == ["score", "total", "describe", "heartbeat", "labelled", "weighted"]
    assert '@app.task(name="score")\ndef score(x):' in text
    assert '@app.task(name="total", retry_count=1)\ndef total_of(xs):' in text
    assert '@app.task(name="describe")\ndef describe(xs):' in text
    assert '@app.periodic_task("@every 1h", name="heartbeat")\ndef heartbeat():' in text
    # what they need, followed transitively: scaled -> SCALE, OFFSETS; Stats -> statistics, LETTERS -> Counter
    assert {"app", "nbqueue", "scaled", "Stats", "SCALE", "OFFSETS", "LETTERS", "statistics", "Counter"} <= defined
    assert '    """Mean and size.\n\n    A docstring on several lines stays as written.\n    """' in text
    # the exploration is not exported, nor an import nothing needs
    code = ast.unparse(ast.parse(text))      # without comments
    for left_out in ("matplotlib", "plt", "samples", "big", "print(", "10 ** 7", "import os"):
        assert left_out not in code, left_out
    assert not {"plt", "samples", "big", "os", "values", "threshold", "name"} & defined
    # notebook order is kept: the App before the tasks, helpers before their use at import time
    assert text.index("app = nbqueue.App.from_env()") < text.index("SCALE = 10") < text.index("def score")


def test_a_task_cell_becomes_a_function_task_of_its_captured_inputs(notebook):
    text = nbexport.export(notebook, module="mytasks").text
    assert '@app.task(name="weighted", retry_count=2)\ndef weighted(values, threshold):' in text
    assert "    import math\n" in text
    assert "    weights = [scaled(v) for v in values if v > threshold]\n" in text
    assert "    return round(math.fsum(weights) / len(weights), 3)\n" in text     # the cell's value is returned
    assert "weighted_out" not in top_level_names(text)


def test_ipython_lines_in_exported_cells_are_dropped_with_a_note(notebook):
    result = nbexport.export(notebook, module="mytasks")
    text = result.text
    assert "# nbqueue export: dropped the IPython line `%matplotlib inline`" in text
    assert "    pass  # nbqueue export: dropped the IPython line `%who`" in text   # inside the %%task body
    assert "get_ipython" not in text.replace("# nbqueue export", "")
    assert "cell 2, line 1: dropped the IPython line `%matplotlib inline`" in result.notes
    assert "cell 8, line 3: dropped the IPython line `%who`" in result.notes
    assert "#   cell 2, line 1: dropped the IPython line `%matplotlib inline`" in text


def test_a_constant_computed_by_a_call_is_copied_and_flagged(notebook):
    result = nbexport.export(notebook, module="mytasks")
    assert ("# nbqueue export: computed by a call; runs when the module is imported\n"
            'LETTERS = sorted(Counter("hello world"))  # computed by a call\n') in result.text
    assert any(n.startswith("cell 3, line 3: `LETTERS = sorted(Counter('hello world'))` is computed by a call")
               for n in result.notes)
    assert not any("SCALE" in n or "OFFSETS = " in n for n in result.notes)   # literals are not flagged


def test_unresolved_names_are_listed_with_why_and_left_undefined(notebook):
    result = nbexport.export(notebook, module="mytasks")
    assert set(result.unresolved) == UNRESOLVED
    assert result.unresolved["LABEL"] == ("set by a `for` statement (cell 6, line 2), which is not exported "
                                          "[needed by labelled]")
    assert result.unresolved["files"] == "set by the IPython line `files = !ls` (cell 6, line 5) [needed by labelled]"
    for name in ("MAGIC", "sqrt"):
        assert result.unresolved[name].startswith(
            "not defined in the notebook; it may come from `from math import *` (cell 6, line 1), "
            "`exec(\"MAGIC = 42\")` (cell 6, line 4)")
    assert result.unresolved["OFFSETS"] == ("changed by `OFFSETS.update(c=3)` (cell 6, line 6), which is not exported "
                                            "[needed by score, total, weighted]")
    # never guessed: none of them is bound by the module (OFFSETS keeps its exported definition only)
    defined = top_level_names(result.text)
    assert not (UNRESOLVED - {"OFFSETS"}) & defined
    code = ast.unparse(ast.parse(result.text))      # without comments
    assert "from math import *" not in code and "exec(" not in code and "OFFSETS.update" not in code
    header = result.text.split("\n\n# -- cell")[0]
    for name, why in result.unresolved.items():
        assert f"#   {name}: {why}" in header


def test_export_is_deterministic_and_compiles(notebook, tmp_path):
    first = nbexport.export(notebook, module="mytasks").text
    assert nbexport.export(notebook, module="mytasks").text == first
    out = tmp_path / "mytasks.py"
    with pytest.warns(nbexport.ExportWarning, match="5 name"):
        assert nbqueue.export_notebook(notebook, out=out) == first
    assert out.read_text() == first
    compiled = subprocess.run([sys.executable, "-m", "py_compile", str(out)], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr


def test_cli_writes_the_module_warns_and_checks_that_it_imports(notebook, tmp_path):
    done = cli(tmp_path, "export", notebook.name, "-o", "mytasks.py", "--check",
               NBQUEUE_BROKER=f"sqlite:///{tmp_path}/check.db")
    assert done.returncode == 0, done.stderr
    assert "wrote mytasks.py: 6 task(s) from analysis.ipynb" in done.stdout
    assert "mytasks:app imports; registered tasks: describe, heartbeat, labelled, score, total, weighted" in done.stdout
    assert "schedules: heartbeat" in done.stdout
    assert "5 name(s) the exported tasks read could not be resolved" in done.stderr
    for name in UNRESOLVED:
        assert f"\n  {name}: " in done.stderr
    assert (tmp_path / "mytasks.py").read_text() == nbexport.export(notebook, module="mytasks").text
    # without -o the module goes to stdout, the warnings to stderr
    printed = cli(tmp_path, "export", notebook.name)
    assert printed.returncode == 0 and printed.stdout == nbexport.export(notebook).text
    assert "could not be resolved" in printed.stderr


def test_cli_check_fails_when_the_module_cannot_import(tmp_path):
    """The App's URL comes from a loop: it is listed, not guessed, so the module cannot import."""
    nb = write_notebook(tmp_path / "broken.ipynb",
                        "import nbqueue\nfor url in ['sqlite://']:\n    URL = url\napp = nbqueue.App(URL)",
                        "@app.task\ndef ping():\n    return 'pong'")
    done = cli(tmp_path, "export", nb.name, "-o", "broken_tasks.py", "--check")
    assert done.returncode == 1
    assert "URL: set by a `for` statement (cell 1, line 2)" in done.stderr
    assert "importing broken_tasks.py failed" in done.stderr and "NameError: name 'URL' is not defined" in done.stderr
    assert cli(tmp_path, "export", nb.name, "--check").returncode == 2       # --check needs the module's file
    missing = cli(tmp_path, "export", "nothing-here.ipynb")
    assert missing.returncode == 2 and "no notebook at 'nothing-here.ipynb'" in missing.stderr


EDGE_CELLS = (
    "import nbqueue\napp = nbqueue.App.from_env()\ntry:\n    import orjson as fastjson\nexcept ImportError:\n"
    "    fastjson = None\nif True:\n    MODE = 'fast'\nelse:\n    MODE = 'slow'",
    "CONFIG = {}\nCONFIG['k'] = 2\nLIMIT = 5; print(LIMIT)\nN = 1",
    "N = N + 1\nfor i in range(3):\n    CONFIG['loop'] = i",
    "@app.task(\n    retry_count=1,  # a trailing comma and a comment\n)\ndef uses_all(x):\n"
    "    return [fastjson is None, MODE, CONFIG['k'], LIMIT, N, x]",
    "@app.periodic_task('@daily', timezone='UTC')\n@app.task\ndef stacked():\n    return 1",
    "square = lambda v: v * v\nimport math as m",
    "%%task poem\ntext = '''line one\n    indented line\nend'''\n"
    "n = square(len(text.splitlines()))\nm.sqrt(n) + len(text)",
    "def outer():\n    %time x = 1\n    return 2\n\napp.register_task('outer_task', outer)\n"
    "app.periodic('@hourly', app.signature('outer_task'), name='hourly_outer')",
    "@app.task\ndef shows():\n    return display(1)",
)


def test_blocks_partial_assignments_rebindings_and_registrations_are_followed(tmp_path, monkeypatch):
    nb = write_notebook(tmp_path / "edge.ipynb", *EDGE_CELLS)
    result = nbexport.export(nb, module="edge_tasks")
    text = result.text
    # a try/except import and an if block of assignments are exported whole; CONFIG['k'] = 2 too;
    # N = N + 1 brings the N = 1 it reads; the print sharing LIMIT's line stays behind
    assert "try:\n    import orjson as fastjson\nexcept ImportError:\n    fastjson = None\n" in text
    assert "if True:\n    MODE = 'fast'\nelse:\n    MODE = 'slow'\n" in text
    assert "CONFIG = {}\nCONFIG['k'] = 2\nLIMIT = 5\n" in text and "print" not in ast.unparse(ast.parse(text))
    assert text.index("N = 1") < text.index("N = N + 1")
    # name= goes after the last argument, also before a trailing comma and comment; stacked decorators both get it
    assert '    retry_count=1, name="uses_all",  # a trailing comma and a comment\n)' in text
    assert "@app.periodic_task('@daily', timezone='UTC', name=\"stacked\")\n@app.task(name=\"stacked\")\n" in text
    # the %%task cell reads a lambda and a module: exported as code, not parameters; its string keeps its lines
    assert "def poem():\n" in text and "square = lambda v: v * v\nimport math as m\n" in text
    assert "    text = '''line one\n    indented line\nend'''\n" in text
    # app.register_task / app.periodic are task definitions; an IPython line inside a function becomes pass
    assert "    pass  # nbqueue export: dropped the IPython line `%time x = 1`\n    return 2\n" in text
    assert "app.register_task('outer_task', outer)\napp.periodic(" in text
    assert result.tasks == ["uses_all", "stacked", "poem", "outer_task", "hourly_outer", "shows"]
    assert result.unresolved == {
        "CONFIG": "changed by `CONFIG['loop'] = i` (cell 3, line 3), which is not exported [needed by uses_all]",
        "display": "not defined in the notebook; IPython provides it in a notebook; a module needs "
                   "`from IPython.display import display` [needed by shows]",
    }
    # the module behaves as the notebook did
    (tmp_path / "edge_tasks.py").write_text(text)
    assert nbexport.check_module(tmp_path / "edge_tasks.py") == {
        "tasks": ["outer_task", "poem", "shows", "stacked", "uses_all"], "schedules": ["hourly_outer", "stacked"]}
    monkeypatch.setenv("NBQUEUE_BROKER", f"sqlite:///{tmp_path}/edge.db")
    monkeypatch.syspath_prepend(str(tmp_path))
    import edge_tasks

    try:
        assert edge_tasks.uses_all(7) == [False, "fast", 2, 5, 2, 7]      # orjson is a dependency of nbqueue
        assert edge_tasks.poem() == 3.0 + len("line one\n    indented line\nend")
    finally:
        edge_tasks.app.close()
        sys.modules.pop("edge_tasks", None)


def test_future_imports_go_first_and_postponed_annotations_are_not_read_at_import(tmp_path):
    """With ``from __future__ import annotations`` a forward reference in an annotation is only text."""
    nb = write_notebook(tmp_path / "future.ipynb",
                        "from __future__ import annotations\nimport nbqueue\napp = nbqueue.App.from_env()",
                        "@app.task\ndef make(x: Later) -> int:\n    return Later(x).x",
                        "class Later:\n    def __init__(self, x):\n        self.x = x")
    result = nbexport.export(nb, module="future_tasks")
    assert not result.unresolved
    body = ast.parse(result.text).body
    assert isinstance(body[1], ast.ImportFrom) and body[1].module == "__future__"     # right after the docstring
    assert "class Later:" in result.text
    (tmp_path / "future_tasks.py").write_text(result.text)
    assert nbexport.check_module(tmp_path / "future_tasks.py")["tasks"] == ["make"]


# -- the App ------------------------------------------------------------------------------------------------

def test_without_an_app_in_the_notebook_the_module_takes_one_from_the_environment(tmp_path):
    """``%load_ext nbqueue`` made ``app``: the module uses App.from_env(); unnamed and -o-only cells get names."""
    nb = write_notebook(tmp_path / "cells.ipynb", "%load_ext nbqueue", "base = 10",
                        "%%task square\nbase * base", "%%task -o doubled\nbase * 2", "%%task\n41 + 1")
    result = nbexport.export(nb, module="cells_tasks")
    assert ("import nbqueue\n\napp = nbqueue.App.from_env()  # nbqueue export: no App is created in the notebook\n"
            in result.text)
    assert result.tasks == ["square", "doubled", "cell5"]
    assert '@app.task(name="square")\ndef square(base):\n' in result.text
    assert '@app.task(name="cell5")\ndef cell5():\n' in result.text
    assert not result.unresolved
    (tmp_path / "cells_tasks.py").write_text(result.text)
    found = nbexport.check_module(tmp_path / "cells_tasks.py")
    assert found == {"tasks": ["cell5", "doubled", "square"], "schedules": []}


def test_an_app_variable_with_another_name_is_also_bound_to_app(tmp_path):
    nb = write_notebook(tmp_path / "other.ipynb", "from nbqueue import App\nqueue_app = App.from_env()",
                        "@queue_app.task\ndef ping():\n    return 'pong'")
    result = nbexport.export(nb, module="other_tasks")
    assert result.text.endswith("\napp = queue_app  # nbqueue export: for nbqueue worker --app other_tasks:app\n")
    (tmp_path / "other_tasks.py").write_text(result.text)
    assert nbexport.check_module(tmp_path / "other_tasks.py")["tasks"] == ["ping"]


def test_a_task_defined_twice_is_exported_once_the_last_way(tmp_path):
    nb = write_notebook(tmp_path / "twice.ipynb", "import nbqueue\napp = nbqueue.App.from_env()",
                        "@app.task\ndef f(x):\n    return x", "@app.task\ndef f(x):\n    return 2 * x")
    result = nbexport.export(nb)
    assert result.text.count("def f(x)") == 1 and "return 2 * x" in result.text
    assert "cell 2, line 1: task 'f' is defined again in cell 3; only the last one is exported" in result.notes


# -- the exported module in production ------------------------------------------------------------------------

def test_exported_tasks_run_on_a_cli_worker_without_allow_cells(notebook, tmp_path):
    out = tmp_path / "mytasks.py"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nbexport.ExportWarning)
        nbqueue.export_notebook(notebook, out=out)
    url = f"sqlite:///{tmp_path}/nbqueue.db"
    elsewhere = tmp_path / "run"          # the worker finds the module through PYTHONPATH, not its cwd
    elsewhere.mkdir()
    env = {**os.environ, "NBQUEUE_BROKER": url, "NBQUEUE_LOG_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    env.pop("NBQUEUE_BACKEND", None)
    env.pop("NBQUEUE_DEFAULT_QUEUE", None)
    app = nbqueue.App(url)
    log = tmp_path / "worker.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "nbqueue", "worker", "--app", "mytasks:app", "-c", "2"],
                                cwd=elsewhere, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        def serving():
            assert proc.poll() is None, f"worker exited early:\n{log.read_text()}"
            return any(w.get("pid") == proc.pid for w in app.backend.workers())
        wait_for(serving, 30, message="worker serving")
        score = app.send_task(Signature("score", args=[3]))
        total = app.send_task(Signature("total", args=[[1, 2]]))
        described = app.send_task(Signature("describe", args=[[1, 2, 3]]))
        weighted = app.send_task(Signature("weighted", kwargs={"values": [1, 2, 3, 4], "threshold": 1}))
        beat = app.send_task(Signature("heartbeat"))
        labelled = app.send_task(Signature("labelled", args=[4]))
        assert score.get(timeout=60) == 31                      # 3 * SCALE + OFFSETS["a"]
        assert total.get(timeout=60) == 32                      # score(1) + score(2)
        assert described.get(timeout=60) == {"mean": 2, "n": 3, "letters": 8}
        assert weighted.get(timeout=60) == 31.0                 # mean of scaled(2), scaled(3), scaled(4)
        assert beat.get(timeout=60) == "ok"
        with pytest.raises(TaskFailed, match="NameError: name 'LABEL' is not defined"):
            labelled.get(timeout=60)                            # listed, not guessed: it fails plainly
        assert labelled.state == states.FAILURE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        app.close()


# -- in a notebook -------------------------------------------------------------------------------------------

@pytest.fixture
def shell(tmp_path, monkeypatch):
    from nbqueue.notebook import magics as nbmagics

    from conftest import ipython_shell

    ipython = ipython_shell(monkeypatch)
    ipython.reset(new_session=False)
    app = nbqueue.App(f"sqlite:///{tmp_path}/nb.db")
    ipython.user_ns["app"] = app
    state = nbmagics.load_ipython_extension(ipython, start_worker=False)
    yield ipython, state
    nbmagics.unload_ipython_extension(ipython)
    app.close()


def test_percent_nbqueue_export_uses_the_notebook_file_the_kernel_knows(notebook, tmp_path, shell, monkeypatch, capsys):
    ipython, state = shell
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="does not know its notebook's file"):
        state.nbqueue("export")
    ipython.user_ns["__session__"] = str(notebook)          # what ipykernel sets under Jupyter
    out = tmp_path / "from_magic.py"
    state.nbqueue(f"export -o {out}")
    assert out.read_text() == nbexport.export(notebook, module="from_magic").text
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "6 task(s)" in printed and "could not be resolved" in printed
    del ipython.user_ns["__session__"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JPY_SESSION_NAME", f"some/dir/{notebook.name}")   # relative to the server: found in cwd
    state.nbqueue("export")
    assert "def weighted(values, threshold):" in capsys.readouterr().out


@pytest.mark.slow
def test_export_notebook_runs(tmp_path):
    from test_notebooks import assert_no_errors, cell_text, execute

    nb = execute("05-export.ipynb", tmp_path)
    assert_no_errors(nb)
    text = "".join(cell_text(c) for c in nb.cells if c.cell_type == "code")
    assert "registered tasks: clean_mean, normalise" in text
    assert "results from the worker process: {'clean_mean': 2.5, 'normalise': [0.0, 0.5, 1.0]}" in text
    pid = re.search(r"worker process (\d+) is up", text).group(1)
    assert re.search(rf"ran on: \['[^']*:{pid}:[0-9a-f]+'\] \| worker pid {pid}", text)
    assert "def normalise(readings):" in text and "big = " not in text.split('"""Tasks exported')[1]
    assert "worker exited with 0" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["05-export.ipynb", "executed-05-export.ipynb"]


def test_a_name_read_before_the_notebook_binds_it_is_listed(tmp_path):
    nb = write_notebook(tmp_path / "order.ipynb", "import nbqueue\napp = nbqueue.App.from_env()",
                        "@app.task(retry_count=RETRIES)\ndef f():\n    return 1", "RETRIES = 2")
    result = nbexport.export(nb)
    assert result.unresolved == {"RETRIES": "read before the notebook binds it (cell 3, line 1) [needed by f]"}
    assert "RETRIES = 2" not in result.text


def test_a_comprehension_variable_is_not_a_notebook_name(tmp_path):
    """Python 3.12 inlines comprehensions; their variables still belong to them, not to the notebook."""
    nb = write_notebook(tmp_path / "comp.ipynb", "import nbqueue\napp = nbqueue.App.from_env()", "x = 99",
                        "SQUARES = [x * x for x in range(4)]", "@app.task\ndef squares():\n    return SQUARES")
    result = nbexport.export(nb)
    assert "x = 99" not in result.text and "SQUARES = [x * x for x in range(4)]" in result.text
    assert not result.unresolved
