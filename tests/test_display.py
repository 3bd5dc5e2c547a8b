"""What results look like without a live view: the static HTML and text of every result
type (what GitHub, nbconvert and a terminal show), rendered by the notebook layer from the
results' snapshots, and the task frames, whose column types must not depend on the other
rows. On every app kind.
"""
from __future__ import annotations

import html.parser
import re

import pandas as pd
import pytest

import nbqueue
from nbqueue import Signature, chord, group
from nbqueue.notebook import display, widgets

#: the dtypes of app.tasks() and to_frame(), whatever the rows
FRAME_DTYPES = {
    "id": "object", "name": "object", "state": "object", "args": "object", "kwargs": "object", "result": "object",
    "error": "object", "retries": "int64", "queue": "object", "created": "datetime64[ns, UTC]",
    "started": "datetime64[ns, UTC]", "finished": "datetime64[ns, UTC]", "runtime": "float64", "worker": "object",
    "progress_done": "float64", "progress_total": "float64", "progress_note": "object",
}
#: app.tasks() adds where each task came from (provenance.py)
TASKS_DTYPES = {**FRAME_DTYPES, "notebook": "object", "cell": "Int64", "code_hash": "object", "cached_from": "object"}


class _Tables(html.parser.HTMLParser):
    """The rows (lists of cell texts) of every <table> in a piece of HTML."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(text: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def dtypes(frame) -> dict:
    return {col: str(dtype) for col, dtype in frame.dtypes.items()}


def maths(app):
    @app.task(name="add")
    def add(x, y):
        return x + y

    @app.task(name="total")
    def total(values):
        return sum(values)

    @app.task(name="fail")
    def fail(x):
        raise ValueError(f"no {x}")

    return add, total, fail


RUNTIME = re.compile(r"^\d+(ms|\.\d+s)$")


def test_static_html_of_groups_chords_and_chains_shows_a_row_per_task(app):
    add, total, fail = maths(app)
    g = app.send(group(add.s(1, 1), add.s(2, 2), add.s(3, 3)))
    c = app.send(chord(group(add.s(1, 2), add.s(3, 4)), total.s()))
    ch = app.send(add.s(1, 2) | add.s(10) | add.s(100))
    bad = app.send(group(add.s(5, 5), fail.s("way")))
    app.start_worker(concurrency=2)
    assert g.get(timeout=30) == [2, 4, 6] and c.get(timeout=30) == 10 and ch.get(timeout=30) == 113
    with pytest.raises(nbqueue.TaskFailed):
        bad.get(timeout=30)
    assert bad.wait(timeout=30) and all(r.ready() for r in bad.results)

    header = ["name", "state", "args", "result", "error", "runtime"]
    expected = {
        "group": (
            g,
            [
                ["add", "SUCCESS", "[1, 1]", "2", ""],
                ["add", "SUCCESS", "[2, 2]", "4", ""],
                ["add", "SUCCESS", "[3, 3]", "6", ""],
            ],
        ),
        "chord": (
            c,
            [
                ["add", "SUCCESS", "[1, 2]", "3", ""],
                ["add", "SUCCESS", "[3, 4]", "7", ""],
                ["total", "SUCCESS", "[]", "10", ""],
            ],
        ),
        "chain": (
            ch,
            [
                ["add", "SUCCESS", "[1, 2]", "3", ""],
                ["add", "SUCCESS", "[10]", "13", ""],
                ["add", "SUCCESS", "[100]", "113", ""],
            ],
        ),
        "failed group": (
            bad,
            [["add", "SUCCESS", "[5, 5]", "10", ""], ["fail", "FAILURE", "['way']", "", "ValueError: no way"]],
        ),
    }
    for label, (result, rows) in expected.items():
        text = display.html(result)
        assert "no table" not in text, (label, text)
        [table] = tables(text)
        assert table[0] == header, label
        assert [row[:5] for row in table[1:]] == rows, label
        assert all(RUNTIME.match(row[5]) for row in table[1:]), (label, table)
    assert "SUCCESS" in display.html(g) and "3/3 done: 3 succeeded" in display.html(g)
    assert "1 failed" in display.html(bad)


def test_static_html_of_a_large_group_shows_the_first_rows_and_says_how_many_more(app):
    add, _, _ = maths(app)
    g = app.send(group([add.s(i, 0) for i in range(25)]))
    app.start_worker(concurrency=2)
    g.get(timeout=60)
    text = display.html(g)
    [table] = tables(text)
    assert [row[3] for row in table[1:]] == [str(i) for i in range(20)]
    assert "… 5 more rows: .to_frame()" in text


def test_long_values_are_cut_in_the_static_table_and_html_is_escaped(app):
    @app.task(name="echo")
    def echo(value):
        return value

    g = app.send(group(echo.s("<b>" + "x" * 200), echo.s([1, 2])))
    app.start_worker()
    g.get(timeout=30)
    [table] = tables(display.html(g))
    args, value = table[1][2], table[1][3]
    assert value.startswith("'<b>xxx") and value.endswith("…") and len(value) == 60
    assert args.startswith("['<b>xxx") and len(args) == 60
    assert "<b>xxx" not in display.html(g)          # escaped, not markup
    assert table[2][3] == "[1, 2]"


def test_text_reprs_of_every_result_type(app):
    add, total, _ = maths(app)
    one = add.delay(20, 22)
    g = app.send(group(add.s(1, 1), add.s(2, 2)))
    c = app.send(chord(group(add.s(1, 2), add.s(3, 4)), total.s()))
    ch = app.send(add.s(1, 2) | add.s(10))
    app.start_worker(concurrency=2)
    for r in (one, g, c, ch):
        r.get(timeout=30)
    assert repr(one) == f"<AsyncResult add {one.id} SUCCESS>"
    assert repr(g) == f"<GroupResult {g.id} 2 members SUCCESS>"
    assert repr(c) == "<ChordResult 2 members SUCCESS>"
    assert repr(ch) == "<ChainResult 2 steps SUCCESS>"
    # outside a kernel the display data is a text line (the live view's text mode)
    assert re.fullmatch(r"\[nbqueue\] add \w{8}: SUCCESS in \S+ → 42", widgets.mimebundle(one)["text/plain"])
    assert re.fullmatch(r"\[nbqueue\] group of 2 SUCCESS 100% \(2/2 done: 2 succeeded\) in \S+ → \[2, 4\]",
                        widgets.mimebundle(g)["text/plain"])
    assert re.fullmatch(r"\[nbqueue\] chord of 2 SUCCESS 100% \(2/2 done: 2 succeeded\), callback SUCCESS in \S+ → 10",
                        widgets.mimebundle(c)["text/plain"])
    assert re.fullmatch(r"\[nbqueue\] chain of 2 steps SUCCESS 100% \(2/2 steps\) in \S+ → 13",
                        widgets.mimebundle(ch)["text/plain"])
    [table] = tables(display.html(one))
    assert dict((row[0], row[1]) for row in table)["result"] == "42"


# -- frames --------------------------------------------------------------------------------------

def test_task_frame_column_types_do_not_depend_on_the_other_rows(app, qname):
    add, _, fail = maths(app)
    assert dtypes(app.tasks()) == TASKS_DTYPES                    # no rows yet
    ok = add.delay(40, 2)
    app.start_worker()
    ok.get(timeout=30)
    alone = app.tasks()
    assert dtypes(alone) == TASKS_DTYPES and alone.iloc[0]["result"] == 42 and type(alone.iloc[0]["result"]) is int
    assert alone.iloc[0]["error"] is None
    pending = app.send_task(Signature("add", args=[1, 1], queue=qname("nobody")))   # no worker serves it: PENDING
    bad = fail.delay("luck")
    with pytest.raises(nbqueue.TaskFailed):
        bad.get(timeout=30)
    assert dtypes(app.tasks()) == TASKS_DTYPES
    frame = app.tasks().set_index("id")
    assert type(frame.loc[ok.id, "result"]) is int and frame.loc[ok.id, "result"] == 42     # not 42.0
    assert frame.loc[ok.id, "error"] is None and frame.loc[pending.id, "error"] is None      # not NaN
    assert frame.loc[pending.id, "result"] is None and frame.loc[bad.id, "result"] is None
    assert frame.loc[bad.id, "error"] == "ValueError: no luck"
    assert frame.loc[pending.id, "worker"] is None and frame.loc[pending.id, "state"] == "PENDING"
    assert pd.isna(frame.loc[pending.id, "started"]) and pd.isna(frame.loc[pending.id, "runtime"])
    assert frame.loc[ok.id, "args"] == [40, 2] and frame.loc[ok.id, "kwargs"] == {}


def test_to_frame_has_the_same_column_types_and_keeps_list_results_whole(app):
    @app.task(name="pair")
    def pair(x):
        return [x, x]

    g = app.send(group(pair.s(1), pair.s(2)))
    assert dtypes(g.to_frame()) == FRAME_DTYPES                   # nothing ran yet
    app.start_worker()
    g.get(timeout=30)
    frame = g.to_frame()
    assert dtypes(frame) == FRAME_DTYPES
    assert list(frame["result"]) == [[1, 1], [2, 2]]
