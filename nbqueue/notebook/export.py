"""Export a notebook's tasks to an importable module: ``nbqueue export nb.ipynb -o mytasks.py``.

The module holds the notebook's task definitions and, followed by name, the imports,
functions, classes and constants they need, in notebook order, and nothing else: cells
that explore (print, plot, compute) stay behind. ``nbqueue worker --app mytasks:app``
then runs the tasks in production, with no notebook code shipped (no ``--allow-cells``).

Task definitions:

- functions decorated with ``@app.task``, ``@app.task(...)`` or ``@app.periodic_task(...)``
  and the calls ``app.register_task(...)``, ``app.register_tasks(...)``, ``app.periodic(...)``.
  A notebook function is registered under its plain name (``task_name``), a module's under
  ``module.name``, so ``name="..."`` is added to decorators that have none: producers keep
  sending the names the notebook used;
- ``%%task NAME`` cells: each becomes a function task registered as NAME (else its ``-o``
  variable, else ``cell<N>``), on the App in ``app`` as the magic does. Its body is the
  cell's, returning the cell's last expression; its parameters are the cell's captured
  inputs (the notebook variables holding data it reads, in order of first read), while
  the modules, functions and classes it reads are exported like any task's helpers.

How names are followed: each top-level statement of a code cell binds and reads names
(stdlib ``symtable``). A name read while the statement runs (decorators, defaults, class
bodies, right-hand sides) resolves to its last binding before that statement; a name read
inside a function body resolves to its last binding in the notebook, the value it has at
call time once the notebook ran top to bottom. Imports, ``def``/``class``, assignments to
names (``X = ...``, ``X[k] = ...``, ``X.attr = ...``, ``X += ...``) and ``if``/``try``
blocks made only of those are exported; anything else is not, and a needed name bound
only by it is *unresolved*.

Never guessed: a needed name bound only by a statement that is not exported (a loop, a
``with``, an IPython line or cell magic, a ``%%task``'s ``-o``) or by nothing the export
can see (``exec``, a star-import, a ``global`` inside a function) is left undefined; a
needed value changed in place by a statement that is not exported (``data.append(x)``,
``data[k] = v`` in a loop) keeps only its exported definition. Both are listed, with why
and which tasks need them, in a comment block at the top of the module and in
:attr:`Export.unresolved` (``nbqueue export`` prints them as a warning). IPython lines
(``%magic``, ``!shell``) in exported cells are dropped with a note; constants computed by
calls are copied as written and flagged, since they run when the module is imported.

The App: the construction found in the notebook (``app = nbqueue.App(...)``,
``App.from_env()``, ``from mymodule import app``...) is exported like any name; with none
(``%load_ext nbqueue`` made it) the module uses ``nbqueue.App.from_env()``. When the tasks'
App variable is not called ``app``, ``app = <it>`` is added for ``--app module:app``.

Cells are numbered from 1 in notebook order, markdown cells included; lines from 1
within a cell. The output depends only on the notebook's code and the module name, and
is checked to compile.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import io
import json
import keyword
import os
import re
import subprocess
import symtable
import sys
import textwrap
import tokenize
import warnings
from pathlib import Path
from typing import Any

from ..errors import NbqueueError
from . import cellvars

#: names a plain module sees without importing them (not those an IPython shell adds to builtins, such as display)
_BUILTINS = frozenset(n for n in dir(builtins) if n not in ("display", "get_ipython", "__IPYTHON__"))

TASK_DECORATORS = ("task", "periodic_task")
REGISTRATIONS = ("register_task", "register_tasks", "periodic")
APP_FACTORIES = ("from_env", "from_yaml", "from_config")
COMPREHENSIONS = ("listcomp", "setcomp", "dictcomp", "genexpr")
#: method calls that change their object in place (a statement calling one is a visible change)
MUTATORS = frozenset({"append", "extend", "insert", "remove", "pop", "popitem", "clear", "update", "add", "discard",
                      "setdefault", "sort", "reverse", "__setitem__", "__delitem__"})
#: line magics that may define names in the namespace
DEFINING_MAGICS = ("run", "load", "store")
#: names IPython puts in a notebook's namespace, with the import a module needs instead
IPYTHON_NAMES = {"display": "from IPython.display import display", "get_ipython": "from IPython import get_ipython"}
EXPORTED_KINDS = frozenset({"import", "def", "assign", "partial", "block", "registration", "celltask"})
MARK = "nbqueue export"


class ExportError(NbqueueError):
    """The notebook cannot be read or exported (the message says why)."""


class ExportWarning(UserWarning):
    """Names the exported tasks read could not be resolved; they are listed, not guessed."""


@dataclasses.dataclass
class Export:
    """The result of an export: the module's text and what the export could not do."""

    text: str
    module: str
    tasks: list[str]                 # registered task names, in module order
    unresolved: dict[str, str]       # name -> why it could not be resolved, and the tasks that read it
    notes: list[str]                 # dropped IPython lines, constants computed by calls, App notes

    def warning(self) -> str:
        lines = [f"{len(self.unresolved)} name(s) the exported tasks read could not be resolved "
                 "(listed at the top of the module):"]
        lines += [f"  {name}: {why}" for name, why in self.unresolved.items()]
        return "\n".join(lines)


# -- cells ------------------------------------------------------------------------------------------

class CellCode:
    """One cell's Python source (IPython syntax already transformed) and its syntax tree."""

    def __init__(self, number: int, source: str, line_offset: int, tree: ast.Module):
        self.number = number
        self.source = source
        self.line_offset = line_offset               # line in the cell = line in source + line_offset
        self.tree = tree
        self.lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, col: int) -> int:
        """Character offset of an ast position (``col`` counts UTF-8 bytes)."""
        line = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "ignore"))

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def cell_line(self, lineno: int) -> int:
        return lineno + self.line_offset


@dataclasses.dataclass
class CellTaskSpec:
    header: str                  # the "%%task ..." line
    label: str                   # the registered task name
    var: str | None
    queue: str | None
    retry_count: int
    after: list[str]
    body: CellCode
    reads: list[str]
    fn_name: str = ""
    params: list[str] = dataclasses.field(default_factory=list)
    cache: "bool | str" = False  # --cache [EXPIRY]: the task's cache= option


@dataclasses.dataclass(eq=False)
class Unit:
    """A top-level statement (or a ``%%task`` cell): what it binds, what it reads, whether it is exported."""

    order: int
    cell: int
    pos: int                     # statement index within its cell
    line: int                    # first line within the cell
    kind: str
    code: CellCode | None = None
    node: ast.stmt | None = None
    binds: set = dataclasses.field(default_factory=set)
    now: set = dataclasses.field(default_factory=set)       # read while the statement runs
    later: set = dataclasses.field(default_factory=set)     # read inside function bodies, at call time
    why: str = ""                # for a statement that is not exported: why its names are unresolved
    flag: str = ""               # why an exported assignment is flagged ("computed by a call")
    magic: str = ""              # the IPython line, for a statement transformed from one
    task: str | None = None      # registered task name, for task definitions
    app_name: str | None = None
    celltask: CellTaskSpec | None = None
    root: bool = False

    @property
    def where(self) -> str:
        return f"cell {self.cell}, line {self.line}"


def _lit(text: str) -> str:
    """A double-quoted Python string literal."""
    return json.dumps(text, ensure_ascii=False)


def _short(text: str, width: int = 60) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 3] + "..."


def _root_name(node: ast.AST) -> str | None:
    """``x`` for ``x``, ``x.a``, ``x[k].b``..."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _simple_target(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return True
    if isinstance(node, ast.Starred):
        return _simple_target(node.value)
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(_simple_target(e) for e in node.elts)
    return False


def _targets(stmt: ast.stmt) -> list[ast.AST]:
    if isinstance(stmt, ast.Assign):
        return list(stmt.targets)
    if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        return [stmt.target]
    return []


def _walk_code(node: ast.AST):
    """ast.walk without descending into function, lambda and class bodies."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if n is node or not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(reversed(list(ast.iter_child_nodes(n))))


def _magic_call(node: ast.AST) -> str | None:
    """The IPython line a ``get_ipython().xxx(...)`` call was transformed from, else None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    owner = node.func.value
    if not (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "get_ipython"):
        return None
    args = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else "..." for a in node.args]
    method = node.func.attr
    if method in ("system", "getoutput") and args:
        return f"!{args[0]}"
    if method == "run_line_magic" and args:
        return f"%{args[0]} {args[1] if len(args) > 1 else ''}".rstrip()
    if method == "run_cell_magic" and args:
        return f"%%{args[0]} {args[1] if len(args) > 1 else ''}".rstrip()
    return f"get_ipython().{method}(...)"


def _magic_stmt(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, ast.Expr):
        return _magic_call(stmt.value)
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
        text = _magic_call(stmt.value)
        if text is not None:
            return f"{', '.join(ast.unparse(t) for t in _targets(stmt))} = {text}"
    return None


def _is_app_construction(value: ast.AST | None) -> bool:
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    if isinstance(func, ast.Attribute) and func.attr in APP_FACTORIES:
        func = func.value
    return (isinstance(func, ast.Name) and func.id == "App") or (isinstance(func, ast.Attribute) and func.attr == "App")


def _task_decorator(dec: ast.expr) -> tuple[str, str, ast.Call | None] | None:
    """``(app variable, "task" | "periodic_task", the call or None)`` for ``@X.task``, ``@X.task(...)``,
    ``@X.periodic_task(...)``; None for other decorators."""
    call = dec if isinstance(dec, ast.Call) else None
    target = call.func if call is not None else dec
    if (isinstance(target, ast.Attribute) and target.attr in TASK_DECORATORS and isinstance(target.value, ast.Name)
            and (call is not None or target.attr == "task")):
        return target.value.id, target.attr, call
    return None


def _registration(stmt: ast.stmt) -> tuple[str, str, ast.Call] | None:
    """``(app variable, method, call)`` for ``X.register_task(...)``, ``X.register_tasks(...)``, ``X.periodic(...)``."""
    value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
    if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in REGISTRATIONS
            and isinstance(value.func.value, ast.Name)):
        return value.func.value.id, value.func.attr, value
    return None


def _keyword(call: ast.Call | None, name: str) -> ast.keyword | None:
    return next((k for k in call.keywords if k.arg == name), None) if call is not None else None


def _str_value(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _namespace_call(node: ast.AST, names: tuple[str, ...] = ("globals", "locals", "vars")) -> bool:
    """``globals()``, ``exec(...)``...: code that binds names no syntax shows."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names


def _definitions_only(stmts: list[ast.stmt]) -> bool:
    """Statements that only bind names (imports, defs, assignments, and if/try blocks of those)."""
    for stmt in stmts:
        if _magic_stmt(stmt) is not None:
            return False
        if isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names):
            return False
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Pass,
                             ast.Raise)):
            continue
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            if all(_simple_target(t) or _root_name(t) for t in _targets(stmt)):
                continue
            return False
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue
        if isinstance(stmt, ast.If) and _definitions_only(stmt.body) and _definitions_only(stmt.orelse):
            continue
        blocks = (stmt.body, stmt.orelse, stmt.finalbody, *[h.body for h in stmt.handlers]) \
            if isinstance(stmt, (ast.Try, getattr(ast, "TryStar", ast.Try))) else None
        if blocks is not None and all(_definitions_only(b) for b in blocks):
            continue
        return False
    return True


def _has_call(stmt: ast.stmt) -> bool:
    """Whether an assignment (or a block of them) computes its value with a call."""
    for node in _walk_code(stmt):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            if _is_app_construction(node.value):
                continue
            if any(isinstance(n, ast.Call) for n in _walk_code(node.value)):
                return True
    return False


class _DropMagics(ast.NodeTransformer):
    """Replaces IPython lines nested in code by ``pass``: what they read is not the code's."""

    def visit(self, node):
        if isinstance(node, ast.stmt) and _magic_stmt(node) is not None:
            if isinstance(node, ast.Expr):
                return ast.copy_location(ast.Pass(), node)
            node.value = ast.copy_location(ast.Constant(None), node.value)   # x = !ls still binds x
            return node
        return super().visit(node)


def _without_magics(source: str) -> str:
    return ast.unparse(_DropMagics().visit(ast.parse(source)))


_COMPREHENSION_NODES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _comprehension_variables(stmt: ast.stmt) -> set[str]:
    """Names that are only comprehension variables in a statement's module-level code.

    Python 3.12 inlines comprehensions (PEP 709), so symtable shows their variables as
    module names; they are neither bound nor read by the statement.
    """
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return set()
    variables: set[str] = set()
    outside: set[str] = set()
    stack: list[tuple[ast.AST, bool]] = [(stmt, False)]
    while stack:
        node, inside = stack.pop()
        if isinstance(node, _COMPREHENSION_NODES):
            first = node.generators[0]
            for gen in node.generators:
                variables |= {n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
            stack.append((first.iter, inside))                 # evaluated in the enclosing scope
            stack += [(child, True) for child in ast.iter_child_nodes(node) if child is not first]
            stack += [(child, True) for child in ast.iter_child_nodes(first) if child is not first.iter]
            continue
        if isinstance(node, ast.Name) and not inside:
            outside.add(node.id)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack += [(child, inside) for child in ast.iter_child_nodes(node)]
    return variables - outside


def _scopes(stmt: ast.stmt, futures: tuple[str, ...] = ()) -> tuple[set, set, set, set]:
    """``(binds, now, later, globals set inside functions)`` of one top-level statement.

    ``futures``: the ``from __future__`` imports in force (IPython keeps them for later cells).
    """
    prefix = "".join(f"{line}\n" for line in futures)
    table = symtable.symtable(prefix + _without_magics(ast.unparse(stmt)) + "\n", "<cell>", "exec")
    prefixed = {a.asname or a.name for line in futures for a in ast.parse(line).body[0].names}
    comprehension_only = _comprehension_variables(stmt)
    binds = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()} - prefixed
    binds -= comprehension_only
    now = {s.get_name() for s in table.get_symbols() if s.is_referenced()} - comprehension_only
    later: set[str] = set()
    set_in_functions: set[str] = set()

    def visit(parent, deferred: bool) -> None:
        for child in parent.get_children():
            is_function = str(child.get_type()) in ("function", "SymbolTableType.FUNCTION")
            lazy = deferred or (is_function and child.get_name() not in COMPREHENSIONS)
            for sym in child.get_symbols():
                if sym.is_global() and sym.is_referenced():
                    (later if lazy else now).add(sym.get_name())
                if sym.is_declared_global() and sym.is_assigned():
                    set_in_functions.add(sym.get_name())
            visit(child, lazy)

    visit(table, False)
    return binds, now, later, set_in_functions


def _indent(code: str, prefix: str = "    ") -> str:
    """Indent every line except blank ones and the continuation lines of multi-line strings."""
    keep: set[int] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.end[0] > tok.start[0] and tok.type not in (tokenize.NEWLINE, tokenize.NL):
                keep.update(range(tok.start[0] + 1, tok.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        pass
    return "".join(line if (i in keep or not line.strip()) else prefix + line
                   for i, line in enumerate(code.splitlines(keepends=True), start=1))


def _apply(text: str, base: int, edits: list[tuple[int, int, str]]) -> str:
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[: start - base] + replacement + text[end - base:]
    return text


# -- the exporter -----------------------------------------------------------------------------------

def _classify_registration(unit: Unit, app_name: str, method: str, call: ast.Call) -> None:
    """A statement registering a task on an App (``app.register_task(...)``, ``app.periodic(...)``)."""
    unit.kind, unit.root, unit.app_name = "registration", True, app_name
    if method == "register_task" and call.args:
        unit.task = _str_value(call.args[0])
    elif method == "periodic":
        unit.task = _str_value(getattr(_keyword(call, "name"), "value", None))


def _changes_namespace(stmt: ast.Expr) -> bool:
    """Whether an expression statement may set names no reading can see (``exec``, ``eval``, ``globals()[...]``)."""
    return any(_namespace_call(n, ("exec", "eval")) or isinstance(n, ast.Attribute) and _namespace_call(n.value)
               for n in ast.walk(stmt))


def _classify_def(unit: Unit, stmt: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
    """A definition; a function decorated as a task is a root (its task name from ``name=`` or its own)."""
    unit.kind = "def"
    decorators = [d for d in map(_task_decorator, getattr(stmt, "decorator_list", [])) if d]
    if decorators and not isinstance(stmt, ast.ClassDef):
        unit.root = True
        unit.app_name = decorators[-1][0]
        names = [_str_value(getattr(_keyword(call, "name"), "value", None)) for _, _, call in decorators]
        explicit = [_keyword(call, "name") for _, _, call in decorators]
        unit.task = next((n for n in reversed(names) if n), None) or (stmt.name if not any(explicit) else None)


class _Exporter:
    def __init__(self, notebook_name: str, module: str):
        from IPython.core.inputtransformer2 import TransformerManager

        self.notebook_name = notebook_name
        self.module = module
        self.transformer = TransformerManager()
        self.units: list[Unit] = []
        self.bindings: dict[str, list[Unit]] = {}
        self.notes: list[tuple[int, int, str]] = []          # (cell, line, text)
        self.hints: list[str] = []                           # places an undefined name may come from
        self.set_in_functions: dict[str, str] = {}
        self.mutations: dict[str, list[tuple[int, str]]] = {}  # name -> [(order, "`text` (cell, line)")]
        self.magic_lines: list[Unit] = []                    # top-level IPython lines (kind "magic")
        self.app_names: list[str] = []
        self.unresolved: dict[str, dict] = {}
        self.synthesized: list[str] = []
        self.futures: list[str] = []                         # `from __future__` imports, hoisted to the top

    # -- reading cells ----------------------------------------------------------------------------
    def _transform(self, source: str) -> str:
        return self.transformer.transform_cell(source)

    def _unit(self, **fields) -> Unit:
        unit = Unit(order=len(self.units), **fields)
        self.units.append(unit)
        return unit

    def read(self, cells: list[tuple[int, str]]) -> None:
        parsed: list[tuple[str, Any]] = []
        for number, raw in cells:
            source = raw.replace("\r\n", "\n").replace("\r", "\n")
            lines = source.split("\n")
            skipped = 0
            while skipped < len(lines) and not lines[skipped].strip():
                skipped += 1
            source = "\n".join(lines[skipped:])
            if not source.strip():
                continue
            if source.startswith("%%"):
                parsed.append(("magic", self._read_cell_magic(number, source, skipped)))
                continue
            try:
                code = self._parse(number, source, skipped)
            except SyntaxError as exc:
                self.notes.append((number, skipped + (exc.lineno or 1), f"not valid Python, skipped: {exc.msg}"))
                self.hints.append(f"cell {number} (not valid Python)")
                continue
            parsed.append(("code", code))
        self._collect_app_names(parsed)
        for kind, item in parsed:
            if kind == "code":
                self._read_code(item)
            elif item is not None:
                item()

    def _parse(self, number: int, source: str, line_offset: int) -> CellCode:
        text = self._transform(source)
        return CellCode(number, text, line_offset, ast.parse(text))

    def _read_cell_magic(self, number: int, source: str, skipped: int):
        first, _, body = source.partition("\n")
        name, _, line = first[2:].partition(" ")
        name = name.strip()
        if name == "task":
            return self._read_task_cell(number, first, line, body, skipped)
        try:
            code = self._parse(number, body, skipped + 1)
        except SyntaxError:
            return None

        def record() -> None:
            binds = set()
            for stmt in code.tree.body:
                try:
                    binds |= _scopes(stmt)[0]
                except SyntaxError:
                    pass
            if binds:
                self._bind(self._unit(cell=number, pos=0, line=skipped + 1, kind="cellmagic", binds=binds,
                                      why=f"set in a %%{name} cell (cell {number})"))
        return record

    def _read_task_cell(self, number: int, header: str, line: str, body: str, skipped: int):
        from IPython.core.error import UsageError

        from . import taskargs

        try:
            args = taskargs.parse(line)
        except (UsageError, SystemExit, ValueError) as exc:
            self.notes.append((number, skipped + 1, f"cannot read the %%task options ({exc}); not exported"))
            return None
        try:
            code = self._parse(number, body, skipped + 1)
        except SyntaxError as exc:
            line_number = skipped + 1 + (exc.lineno or 1)
            self.notes.append((number, line_number, f"the %%task body is not valid Python, not exported: {exc.msg}"))
            return None
        label = args.name or args.var or f"cell{number}"
        spec = CellTaskSpec(header=header.strip(), label=label, var=args.var, queue=args.queue,
                            retry_count=args.retry_count, after=list(args.after), body=code,
                            reads=cellvars.free_names(_without_magics(code.source)), cache=args.cache)

        def record() -> None:
            self._unit(cell=number, pos=0, line=skipped + 1, kind="celltask", celltask=spec, task=label, root=True)
            if args.var:
                self._bind(self._unit(cell=number, pos=1, line=skipped + 1, kind="output", binds={args.var},
                                      why=f"the -o output of the `{spec.header}` cell (cell {number})"))
        return record

    def _collect_app_names(self, parsed) -> None:
        names: list[str] = []
        for kind, item in parsed:
            if kind != "code":
                continue
            for stmt in item.tree.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names += [found[0] for found in map(_task_decorator, stmt.decorator_list) if found]
                elif isinstance(stmt, ast.Assign) and _is_app_construction(stmt.value):
                    names += [t.id for t in stmt.targets if isinstance(t, ast.Name)]
                registration = _registration(stmt)
                if registration is not None and registration[1] != "periodic":
                    names.append(registration[0])
        self.app_names = list(dict.fromkeys(names))

    def _bind(self, unit: Unit) -> None:
        for name in unit.binds:
            self.bindings.setdefault(name, []).append(unit)

    def _read_code(self, code: CellCode) -> None:
        for pos, stmt in enumerate(code.tree.body):
            if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                if ast.unparse(stmt) not in self.futures:
                    self.futures.append(ast.unparse(stmt))
                continue
            line = code.cell_line(min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])]))
            unit = self._unit(cell=code.number, pos=pos, line=line, kind="other", code=code, node=stmt)
            try:
                unit.binds, unit.now, unit.later, set_inside = _scopes(stmt, tuple(self.futures))
            except SyntaxError:  # e.g. a top-level await: read its names from the tree
                unit.binds = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                unit.now = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
                set_inside = set()
            for name in sorted(set_inside):
                self.set_in_functions.setdefault(name, f"a function of cell {code.number} (line {line}) "
                                                       "that declares it `global`")
            self._classify(unit, stmt)
            self._bind(unit)
            if unit.kind not in EXPORTED_KINDS:
                self._record_mutations(unit, stmt)

    def _classify(self, unit: Unit, stmt: ast.stmt) -> None:
        """Set what kind of statement ``unit`` is (``unit.kind``), and why it is not exported when it is not."""
        text = _short(ast.get_source_segment(unit.code.source, stmt) or ast.unparse(stmt))
        magic = _magic_stmt(stmt)
        if magic is not None:
            self._classify_magic(unit, magic)
            return
        registration = _registration(stmt)
        if registration is not None and registration[0] in self.app_names:
            _classify_registration(unit, *registration)
            return
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            unit.kind = "import"
            if isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names):
                unit.kind = "star"
                self.hints.append(f"`{text}` ({unit.where})")
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            _classify_def(unit, stmt)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            self._classify_assign(unit, stmt, text)
        elif isinstance(stmt, (ast.If, ast.Try, getattr(ast, "TryStar", ast.Try))) and _definitions_only([stmt]):
            unit.kind = "block"
            if _has_call(stmt):
                unit.flag = "computed by a call"
        elif isinstance(stmt, ast.Expr):
            unit.kind = "dynamic" if _changes_namespace(stmt) else "expr"
            if unit.kind == "dynamic":
                self.hints.append(f"`{text}` ({unit.where})")
        if unit.kind not in EXPORTED_KINDS and not unit.why:
            word = type(stmt).__name__.lower().replace("async", "").replace("trystar", "try")
            what = {"expr": "an expression statement", "delete": "a `del` statement"}.get(word, f"a `{word}` statement")
            unit.why = f"set by {what} ({unit.where}), which is not exported"

    def _classify_magic(self, unit: Unit, magic: str) -> None:
        unit.kind = "magic"
        unit.why = f"set by the IPython line `{magic}` ({unit.where})"
        unit.magic = magic
        self.magic_lines.append(unit)
        name = magic[1:].split(" ", 1)[0] if magic.startswith("%") else ""
        if name in DEFINING_MAGICS:
            self.hints.append(f"`{magic}` ({unit.where})")

    def _classify_assign(self, unit: Unit, stmt: ast.Assign | ast.AnnAssign | ast.AugAssign, text: str) -> None:
        targets = _targets(stmt)
        if isinstance(stmt, ast.AnnAssign) and stmt.value is None:
            unit.kind, unit.why = "other", f"only annotated, never assigned ({unit.where})"
        elif any(_namespace_call(n) for t in targets for n in ast.walk(t)):
            unit.kind = "dynamic"
            self.hints.append(f"`{text}` ({unit.where})")
        elif all(_simple_target(t) for t in targets):
            unit.kind = "assign"
        elif all(_simple_target(t) or _root_name(t) for t in targets):
            unit.kind = "partial"
            unit.binds |= {_root_name(t) for t in targets if not _simple_target(t)}
        if unit.kind in ("assign", "partial") and _has_call(stmt):
            unit.flag = "computed by a call"

    def _record_mutations(self, unit: Unit, stmt: ast.stmt) -> None:
        """Note the names a statement that is not exported changes in place (``x.append(...)``, ``x[k] = v``)."""
        code = unit.code
        for node in _walk_code(stmt):
            changed: set[str] = set()
            call = node.value if isinstance(node, ast.Expr) else None
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                inplace = any(k.arg == "inplace" and isinstance(k.value, ast.Constant) and k.value.value is True
                              for k in call.keywords)
                if call.func.attr in MUTATORS or inplace:
                    changed.add(_root_name(call.func.value))
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Delete)):
                targets = node.targets if isinstance(node, ast.Delete) else _targets(node)
                changed |= {_root_name(t.value) for t in targets if isinstance(t, (ast.Subscript, ast.Attribute))}
            text = _short(ast.get_source_segment(code.source, node) or ast.unparse(node)) if changed else ""
            for name in sorted(n for n in changed if n):
                entry = (unit.order, f"`{text}` (cell {code.number}, line {code.cell_line(node.lineno)})")
                if entry not in self.mutations.setdefault(name, []):
                    self.mutations[name].append(entry)

    # -- following names --------------------------------------------------------------------------
    def binding(self, name: str, before: int | None) -> Unit | None:
        for unit in reversed(self.bindings.get(name, ())):
            if before is None or unit.order < before:
                return unit
        return None

    def _is_code(self, name: str, unit: Unit | None, depth: int = 0) -> bool:
        """Whether a binding holds code (a module, function, class, App or task) rather than data."""
        if name in self.app_names or unit is None:
            return True
        if unit.kind in ("import", "def", "registration"):
            return True
        node = unit.node
        if unit.kind == "assign" and isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            if isinstance(value, ast.Lambda) or _is_app_construction(value):
                return True
            alias = _root_name(value) if isinstance(value, (ast.Name, ast.Attribute)) else None
            return bool(alias) and depth < 10 and self._is_code(alias, self.binding(alias, unit.order), depth + 1)
        if unit.kind == "block":
            return any(isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                       and name in _scopes(n)[0] for n in _walk_code(node))
        return False

    def prepare_celltasks(self) -> None:
        taken = set(self.bindings)
        cell_app = "app" if "app" in self.bindings or not self.app_names else self.app_names[0]
        for unit in self.units:
            spec = unit.celltask
            if spec is None:
                continue
            body_binds: set[str] = set()
            for stmt in spec.body.tree.body:
                try:
                    body_binds |= _scopes(stmt)[0]
                except SyntaxError:
                    pass
            for name in spec.reads:
                found = self.binding(name, unit.order)
                if found is None and (name in body_binds or name in _BUILTINS):
                    continue
                if found is None or self._is_code(name, found):
                    unit.later.add(name)
                else:
                    spec.params.append(name)
            unit.app_name = cell_app
            unit.now = {cell_app}
            base = spec.label if spec.label.isidentifier() and not keyword.iskeyword(spec.label) \
                else "task_" + re.sub(r"\W", "_", spec.label).strip("_")
            fn_name, n = base, 1
            while fn_name in taken or fn_name in spec.params:
                fn_name = f"{base}_task" + (str(n) if n > 1 else "")
                n += 1
            spec.fn_name = fn_name
            taken.add(fn_name)

    def task_roots(self) -> list[Unit]:
        roots = [u for u in self.units if u.root]
        last: dict[str, Unit] = {}
        for unit in roots:
            if unit.task is not None and unit.kind in ("def", "celltask"):
                previous = last.get(unit.task)
                if previous is not None:
                    note = f"task {unit.task!r} is defined again in cell {unit.cell}; only the last one is exported"
                    self.notes.append((previous.cell, previous.line, note))
                last[unit.task] = unit
        return [u for u in roots if u.task is None or u.kind not in ("def", "celltask") or last[u.task] is u]

    def _unresolved(self, name: str, why: str, needed_by: str) -> None:
        entry = self.unresolved.setdefault(name, {"why": [], "by": set()})
        if why not in entry["why"]:
            entry["why"].append(why)
        entry["by"].add(needed_by)

    def _undefined(self, name: str) -> str:
        if name in self.bindings:
            first = self.bindings[name][0]
            return f"read before the notebook binds it ({first.where})"
        if name in self.set_in_functions:
            return f"set only inside {self.set_in_functions[name]}, when that function runs"
        parts = ["not defined in the notebook"]
        if name in IPYTHON_NAMES:
            parts.append(f"IPython provides it in a notebook; a module needs `{IPYTHON_NAMES[name]}`")
        if self.hints:
            parts.append("it may come from " + ", ".join(self.hints))
        return "; ".join(parts)

    def follow(self, roots: list[Unit]) -> list[Unit]:
        selected: set[Unit] = set()
        app_vars = set(self.app_names) | {u.app_name for u in roots if u.app_name}
        for root in roots:
            label = root.task or f"the registration in {root.where}"
            seen, stack = {root}, [root]
            while stack:
                unit = stack.pop()
                for mode, names in (("now", unit.now), ("later", unit.later)):
                    for name in sorted(names):
                        found = self.binding(name, unit.order if mode == "now" else None)
                        if found is None:
                            if name in unit.binds or name in _BUILTINS:
                                continue
                            if name in app_vars and name not in self.bindings:
                                if name not in self.synthesized:
                                    self.synthesized.append(name)
                                continue
                            self._unresolved(name, self._undefined(name), label)
                            continue
                        if found.kind not in EXPORTED_KINDS:
                            self._unresolved(name, found.why, label)
                            continue
                        if found.kind in ("assign", "partial") and name not in app_vars:
                            until = unit.order if mode == "now" else len(self.units)
                            for order, text in self.mutations.get(name, ()):
                                if found.order < order < until:
                                    self._unresolved(name, f"changed by {text}, which is not exported", label)
                        if found not in seen:
                            seen.add(found)
                            stack.append(found)
            selected |= seen
        return sorted(selected, key=lambda u: u.order)

    # -- writing ----------------------------------------------------------------------------------
    def _nested_magic_edits(self, code: CellCode, node: ast.AST, outer: ast.AST | None) -> list[tuple[int, int, str]]:
        edits = []
        for stmt in ast.walk(node):
            if stmt is outer or not isinstance(stmt, ast.stmt):
                continue
            magic = _magic_stmt(stmt)
            if magic is not None:
                edits.append((code.start(stmt), code.end(stmt), f"pass  # {MARK}: dropped the IPython line `{magic}`"))
                self.notes.append((code.number, code.cell_line(stmt.lineno), f"dropped the IPython line `{magic}`"))
        return edits

    def _decorator_edits(self, code: CellCode, stmt: ast.stmt) -> list[tuple[int, int, str]]:
        edits = []
        for dec in stmt.decorator_list:
            found = _task_decorator(dec)
            if found is None or _keyword(found[2], "name") is not None:
                continue
            call = found[2]
            if call is None:
                edits.append((code.end(dec), code.end(dec), f"(name={_lit(stmt.name)})"))
            elif call.args or call.keywords:   # after the last argument: a trailing comma or comment stays valid
                last = max(code.end(node) for node in [*call.args, *(k.value for k in call.keywords)])
                edits.append((last, last, f", name={_lit(stmt.name)}"))
            else:
                close = code.end(call) - 1
                edits.append((close, close, f"name={_lit(stmt.name)}"))
        return edits

    def _span(self, unit: Unit) -> tuple[int, int, int, int]:
        """(start offset, end offset, first line, last line) of a statement, whole lines when it has them alone."""
        code, stmt = unit.code, unit.node
        first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
        last = stmt.end_lineno
        neighbours = [s for s in code.tree.body if s is not stmt]
        if any(s.lineno <= last and s.end_lineno >= first for s in neighbours):
            return code.start(stmt), code.end(stmt), first, last
        previous_end = max([s.end_lineno for s in neighbours if s.end_lineno < first], default=0)
        while first - 1 > previous_end and code.lines[first - 2].lstrip().startswith("#"):
            first -= 1
        end = code.starts[last] if last < len(code.lines) else len(code.source)
        return code.starts[first - 1], end, first, last

    def _unit_text(self, unit: Unit) -> str:
        if unit.kind == "celltask":
            return self._celltask_text(unit)
        code = unit.code
        start, end, _, _ = self._span(unit)
        edits = self._nested_magic_edits(code, unit.node, unit.node)
        if unit.kind == "def" and not isinstance(unit.node, ast.ClassDef):
            edits += self._decorator_edits(code, unit.node)
        text = _apply(code.source[start:end], start, edits).rstrip() + "\n"
        if unit.flag:
            self.notes.append((unit.cell, unit.line, f"`{_short(ast.unparse(unit.node))}` is {unit.flag}: copied as "
                                                     "written, it runs when the module is imported"))
            text = f"# {MARK}: {unit.flag}; runs when the module is imported\n" + text
        return text

    def _celltask_text(self, unit: Unit) -> str:
        spec = unit.celltask
        body = spec.body
        edits = []
        for stmt in body.tree.body:
            edits += self._nested_magic_edits(body, stmt, None)
        last = body.tree.body[-1] if body.tree.body else None
        if isinstance(last, ast.Expr) and _magic_stmt(last) is None:
            edits.append((body.start(last), body.start(last), "return "))
        text = _apply(body.source, 0, edits).rstrip()
        options = [f"name={_lit(spec.label)}"]
        if spec.queue:
            options.append(f"queue={_lit(spec.queue)}")
        if spec.retry_count:
            options.append(f"retry_count={spec.retry_count}")
        if spec.cache is not False:
            options.append(f"cache={spec.cache!r}" if isinstance(spec.cache, bool) else f"cache={_lit(spec.cache)}")
        doc = [f"The notebook's ``{spec.header}`` cell (cell {unit.cell})."]
        if spec.params or spec.after:
            doc.append("")
        if spec.params:
            doc.append("Its parameters are the notebook variables the cell read.")
        if spec.after:
            doc.append(f"In the notebook it ran after {', '.join(spec.after)}.")
        text_doc = "\n".join(f"    {line}" if line and i else line for i, line in enumerate(doc))
        text_doc += "\n    " if len(doc) > 1 else ""
        plain = '"""' not in text_doc and "\\" not in text_doc and not text_doc.endswith('"')
        doc_line = f'"""{text_doc}"""' if plain else repr("\n".join(doc))
        lines = [f"@{unit.app_name}.task({', '.join(options)})", f"def {spec.fn_name}({', '.join(spec.params)}):",
                 f"    {doc_line}"]
        if text.strip():
            lines.append(_indent(text + "\n").rstrip("\n"))
        return "\n".join(lines) + "\n"

    def write(self, roots: list[Unit], selected: list[Unit]) -> tuple[str, list[str]]:
        needed_cells = {u.cell for u in selected}
        items = [(u.order, u.cell, u.pos, u) for u in selected]
        items += [(u.order, u.cell, u.pos, u) for u in self.magic_lines if u.cell in needed_cells]
        items.sort(key=lambda item: item[0])
        body: list[str] = []
        previous: tuple[int, int, int] | None = None      # (cell, pos, last line) of the item written before
        for _, cell, pos, unit in items:
            if unit.kind == "magic":
                self.notes.append((unit.cell, unit.line, f"dropped the IPython line `{unit.magic}`"))
                text, first, last = f"# {MARK}: dropped the IPython line `{unit.magic}`\n", unit.line, unit.line
            else:
                text = self._unit_text(unit)
                first, last = (self._span(unit)[2:] if unit.code is not None and unit.kind != "celltask"
                               else (unit.line, unit.line))
                if unit.code is not None and unit.kind != "celltask":
                    first, last = unit.code.cell_line(first), unit.code.cell_line(last)
            if previous is None or previous[0] != cell:
                header = f"# -- cell {cell}" + (f": {unit.celltask.header}" if unit.celltask else "") + " --"
                body.append(("\n\n" if body else "") + header + "\n")
            elif previous[1] + 1 == pos and unit.code is not None and first > previous[2]:
                blank = sum(1 for ln in range(previous[2] + 1, first)
                            if not unit.code.lines[ln - unit.code.line_offset - 1].strip())
                body.append("\n" * min(blank, 2))
            else:
                body.append("\n")
            body.append(text)
            previous = (cell, pos, last)
        tasks = self._task_names(roots)
        return self._assemble(tasks, "".join(body)), tasks

    def _task_names(self, roots: list[Unit]) -> list[str]:
        names = []
        for unit in roots:
            if unit.task:
                names.append(unit.task)
            elif unit.kind == "def":
                names.append(unit.node.name)
        return list(dict.fromkeys(names))

    def primary_app(self, roots: list[Unit]) -> str:
        return next((u.app_name for u in roots if u.app_name), "app")

    def _assemble(self, tasks: list[str], body: str) -> str:
        run = f"Run them with ``nbqueue worker --app {self.module}:app``."
        listed = textwrap.fill(f"Tasks: {', '.join(tasks) if tasks else '(none found)'}.", 100)
        doc = f"Tasks exported from {self.notebook_name} by ``nbqueue export``.\n\n{run}\n{listed}"
        doc_text = f'"""{doc}\n"""' if '"""' not in doc and "\\" not in doc else repr(doc)
        out = [doc_text + "\n"]
        out += [f"{line}\n" for line in self.futures]
        out.append(self._header_comments())
        for name in self.synthesized:
            out.append(f"\nimport nbqueue\n\n{name} = nbqueue.App.from_env()  # {MARK}: "
                       "no App is created in the notebook\n")
        out.append("\n\n" + body if body else "")
        return "".join(out).rstrip("\n") + "\n"

    def _header_comments(self) -> str:
        lines = []
        if self.unresolved:
            lines.append(f"\n# {MARK}: names the tasks read that could not be resolved, not guessed (left undefined; "
                         "a value changed later in the notebook keeps only its exported definition):")
            lines += [f"#   {name}: {why}" for name, why in self.unresolved_text().items()]
        notes = self.note_texts()
        if notes:
            lines.append(f"\n# {MARK}: notes:" if not lines else f"# {MARK}: notes:")
            lines += [f"#   {note}" for note in notes]
        return "\n".join(lines) + ("\n" if lines else "")

    def unresolved_text(self) -> dict[str, str]:
        return {name: "; ".join(entry["why"]) + f" [needed by {', '.join(sorted(entry['by']))}]"
                for name, entry in sorted(self.unresolved.items())}

    def note_texts(self) -> list[str]:
        return [f"cell {cell}, line {line}: {text}" if cell else text for cell, line, text in sorted(set(self.notes))]


# -- public functions --------------------------------------------------------------------------------

def _read_notebook(path: str | os.PathLike) -> list[tuple[int, str]]:
    try:
        import nbformat
    except ImportError:
        raise ExportError("reading notebooks needs nbformat: pip install 'nbqueue[notebook]'") from None
    try:
        nb = nbformat.read(os.fspath(path), as_version=4)
    except FileNotFoundError:
        raise ExportError(f"no notebook at {os.fspath(path)!r}") from None
    except Exception as exc:
        raise ExportError(f"cannot read the notebook {os.fspath(path)!r}: {exc}") from exc
    return [(i, cell.source) for i, cell in enumerate(nb.cells, start=1) if cell.cell_type == "code"]


def export(path: str | os.PathLike, module: str | None = None) -> Export:
    """Export the notebook at ``path``: the module text and what could not be resolved.

    ``module`` is the module's name as shown in its docstring (default ``mytasks``).
    Raises ExportError when the notebook cannot be read.
    """
    module = module or "mytasks"
    exporter = _Exporter(Path(path).name, module)
    exporter.read(_read_notebook(path))
    exporter.prepare_celltasks()
    roots = exporter.task_roots()
    selected = exporter.follow(roots)
    primary = exporter.primary_app(roots)
    apps = list(dict.fromkeys(u.app_name for u in roots if u.app_name))
    if len(apps) > 1:
        exporter.notes.append((0, 0, f"tasks are registered on several Apps ({', '.join(apps)}); "
                                     f"the module's `app` is {'app' if 'app' in apps else primary}"))
    if not roots:
        exporter.notes.append((0, 0, "no task definitions found (@app.task, @app.periodic_task, %%task cells)"))
    text, tasks = exporter.write(roots, selected)
    if primary != "app" and "app" not in apps:
        text += f"\napp = {primary}  # {MARK}: for nbqueue worker --app {module}:app\n"
    try:
        compile(text, f"<{module}>", "exec")
    except SyntaxError as exc:
        raise ExportError(f"the exported module does not compile ({exc}); please report this with the notebook") \
            from exc
    return Export(text=text, module=module, tasks=tasks, unresolved=exporter.unresolved_text(),
                  notes=exporter.note_texts())


def export_notebook(path: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """The text of a module holding the notebook's tasks and the code they need; written to ``out`` if given.

    Unresolved names are listed at the top of the text and in an ExportWarning.
    """
    result = export(path, module=Path(out).stem if out else None)
    if out is not None:
        Path(out).write_text(result.text, encoding="utf-8")
    if result.unresolved:
        warnings.warn(result.warning(), ExportWarning, stacklevel=2)
    return result.text


_CHECK = """
import json, sys
from nbqueue import builtin
from nbqueue.cli import load_app
from nbqueue.schedule import book
app = load_app(sys.argv[1] + ":app")
print(json.dumps({"tasks": sorted(n for n in app.registry if n != builtin.CELL_TASK),
                  "schedules": sorted(book(app).entries)}))
app.close()
"""


def check_module(path: str | os.PathLike, timeout: float = 120.0) -> dict:
    """Import the module at ``path`` in a fresh interpreter, as ``nbqueue worker --app module:app`` does.

    Returns ``{"tasks": [...], "schedules": [...]}`` of its ``app``; raises ExportError
    with the interpreter's output when the import fails.
    """
    path = Path(path).resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHECK, path.stem], cwd=path.parent, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ExportError(f"importing {path.name} failed:\n{(proc.stderr or proc.stdout).strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(args) -> int:
    """``nbqueue export NOTEBOOK [-o FILE] [--check]``."""
    if args.check and not args.output:
        print("nbqueue export: --check needs -o FILE (the module to import)", file=sys.stderr)
        return 2
    try:
        result = export(args.notebook, module=Path(args.output).stem if args.output else None)
    except ExportError as exc:
        print(f"nbqueue export: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(result.text, encoding="utf-8")
        listed = f": {', '.join(result.tasks)}" if result.tasks else ""
        print(f"wrote {args.output}: {len(result.tasks)} task(s) from {args.notebook}{listed}")
    else:
        sys.stdout.write(result.text)
    for note in result.notes:
        print(f"nbqueue export: note: {note}", file=sys.stderr)
    if result.unresolved:
        print(f"nbqueue export: warning: {result.warning()}", file=sys.stderr)
    if args.check:
        try:
            found = check_module(args.output)
        except (ExportError, subprocess.TimeoutExpired) as exc:
            print(f"nbqueue export: --check: {exc}", file=sys.stderr)
            return 1
        print(f"{result.module}:app imports; registered tasks: {', '.join(found['tasks']) or '(none)'}")
        if found["schedules"]:
            print(f"schedules: {', '.join(found['schedules'])}")
    return 0


# -- in a notebook --------------------------------------------------------------------------------------

def notebook_path(shell) -> str | None:
    """This kernel's notebook file, when the front end told it: ``__vsc_ipynb_file__``, ``__session__``
    (ipykernel under Jupyter) or JPY_SESSION_NAME; relative names are also looked for in the working directory."""
    namespace = getattr(shell, "user_ns", {}) or {}
    candidates = [namespace.get("__vsc_ipynb_file__"), namespace.get("__session__"), os.environ.get("JPY_SESSION_NAME")]
    for candidate in candidates:
        if not isinstance(candidate, str) or not candidate.endswith(".ipynb"):
            continue
        for path in (Path(candidate), Path.cwd() / Path(candidate).name):
            if path.is_file():
                return str(path)
    return None


def magic_export(shell, out: str | None) -> None:
    """``%nbqueue export [-o FILE]``: export this notebook as last saved; prints the module, or writes it to FILE."""
    from IPython.core.error import UsageError

    path = notebook_path(shell)
    if path is None:
        raise UsageError("%nbqueue export: this kernel does not know its notebook's file (no __session__, "
                         "__vsc_ipynb_file__ or JPY_SESSION_NAME); use nbqueue.export_notebook('notebook.ipynb', "
                         "out='mytasks.py') or `nbqueue export notebook.ipynb -o mytasks.py`")
    result = export(path, module=Path(out).stem if out else None)
    if out:
        Path(out).write_text(result.text, encoding="utf-8")
        listed = f": {', '.join(result.tasks)}" if result.tasks else ""
        print(f"nbqueue: wrote {out} from {path} as last saved: {len(result.tasks)} task(s){listed}")
    else:
        print(result.text)
    if result.unresolved:
        print(f"nbqueue: warning: {result.warning()}")
