"""The options of the ``%%task`` cell magic, shared by the magic (magics.py) and the exporter
(export.py), which reads them from a saved notebook's cells."""
from __future__ import annotations

import argparse
from typing import Callable

from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring


def task_options(fn: Callable) -> Callable:
    """Decorate a cell magic function with the ``%%task`` options (its help shows them)."""
    options = [
        argument(
            "name",
            nargs="?",
            default=None,
            help="a name for the cell's task (re-running replaces it; --after refers to it)",
        ),
        argument(
            "-o", "--output", dest="var", default=None, help="bind the cell's value to this variable when it succeeds"
        ),
        argument(
            "--queue", default=None, help="send to this queue (a worker started with --allow-cells must serve it)"
        ),
        argument("--retry-count", type=int, default=0, help="retry a failing cell up to N times"),
        argument(
            "--after",
            nargs="+",
            default=[],
            metavar="NAME_OR_VAR",
            help="run only after these cell tasks (or results) succeed",
        ),
        argument(
            "--cache",
            nargs="?",
            const=True,
            default=False,
            metavar="EXPIRY",
            help="reuse the stored result of this source with the same inputs (EXPIRY: e.g. 7d; see nbqueue.cache)",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return magic_arguments()(fn)


@task_options
def task(line: str, cell: str) -> None:
    """%%task [NAME] [-o VAR] [--queue Q] [--retry-count N] [--after NAME_OR_VAR ...] [--cache [EXPIRY]]:
    the parser's holder (its name is the one errors show)."""


def parse(line: str) -> argparse.Namespace:
    """The options of a ``%%task`` line (``name``, ``var``, ``queue``, ``retry_count``, ``after``,
    ``cache``);
    raises IPython's UsageError on a bad one."""
    return parse_argstring(task, line)
