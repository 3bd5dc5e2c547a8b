"""What a ``%%task`` cell reads, and how each value travels to the worker.

:func:`free_names` walks the cell's syntax tree in execution order and returns the
names the cell loads before it has (definitely) bound them itself: those are the
notebook variables it depends on. Names bound only in a branch, a loop body or a
``try`` count as possibly unbound afterwards, so a later read still captures the
notebook's value; reads inside functions, lambdas, classes and comprehensions count
too unless the name is local there. Over-capturing is harmless: a captured value the
cell overwrites is simply not used.

:func:`capture` then sorts each name the user namespace holds:

- modules, and functions or classes importable by module and qualified name, become
  *imports* (re-imported on the worker);
- values the App's serializer encodes become *inputs* (encoded now, so changing the
  variable afterwards does not change the submitted cell);
- anything else (a function defined in the notebook, an open file, a model object) is
  *local*: passed as the live object (deep-copied when possible) to a worker thread of
  this kernel, and an error naming the variable when the cell must go to another process.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import sys
import types
from typing import Any, Iterable

from ..errors import SerializationError

# -- which names a cell reads ---------------------------------------------------------------------

class _Reads(ast.NodeVisitor):
    def __init__(self, bound: set[str] | None = None):
        self.bound: set[str] = set(bound or ())
        self.reads: list[str] = []

    def _read(self, name: str) -> None:
        if name not in self.bound and name not in self.reads:
            self.reads.append(name)

    def _bind_target(self, target: ast.AST) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.bound.add(node.id)
            elif isinstance(node, ast.Starred):
                continue
        # loads inside targets (a[i] = ..., x.attr = ...) are reads
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                self._read(node.id)

    def _scoped(self, body: Iterable[ast.AST]) -> None:
        """Statements whose bindings may not happen (branches, loops, try): bindings are dropped after."""
        saved = set(self.bound)
        for stmt in body:
            self.visit(stmt)
        self.bound = saved

    # expressions
    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Load, ast.Del)):
            self._read(node.id)
        else:
            self.bound.add(node.id)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.bound.add(node.target.id)

    def _function_reads(self, args: ast.arguments | None, body: list, extra_locals: Iterable[str] = ()) -> None:
        local: set[str] = set(extra_locals)
        if args is not None:
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None:
                    local.add(a.arg)
        declared_global: set[str] = set()
        for stmt in body:
            for node in ast.walk(stmt):
                if isinstance(node, (ast.Global, ast.Nonlocal)):
                    declared_global.update(node.names)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    local.add(node.id)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    local.add(node.name)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    local.update((a.asname or a.name).split(".")[0] for a in node.names)
                elif isinstance(node, ast.ExceptHandler) and node.name:
                    local.add(node.name)
        local -= declared_global
        for stmt in body:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Load, ast.Del)) and node.id not in local:
                    self._read(node.id)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(d)
        self._function_reads(node.args, [ast.Expr(node.body)])

    def _comprehension(self, node, elts: list[ast.AST]) -> None:
        self.visit(node.generators[0].iter)  # evaluated in the enclosing scope
        local = set()
        for gen in node.generators:
            for n in ast.walk(gen.target):
                if isinstance(n, ast.Name):
                    local.add(n.id)
        first = node.generators[0]     # its iterable is read outside the comprehension's scope
        parts = [g for gen in node.generators
                 for g in ([gen.target] + gen.ifs + ([gen.iter] if gen is not first else []))]
        self._function_reads(None, [ast.Expr(e) for e in parts + elts], extra_locals=local)

    def visit_ListComp(self, node):
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node):
        self._comprehension(node, [node.key, node.value])

    # statements
    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self._bind_target(t)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self._bind_target(node.target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self._read(node.target.id)
            self.bound.add(node.target.id)
        else:
            self.visit(node.target)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.bound.add((alias.asname or alias.name).split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self.bound.add(alias.asname or alias.name)

    def _def(self, node) -> None:
        for d in node.decorator_list:
            self.visit(d)
        args = node.args
        for d in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.visit(d)
        self.bound.add(node.name)
        self._function_reads(args, node.body)

    visit_FunctionDef = visit_AsyncFunctionDef = _def

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(d)
        self.bound.add(node.name)
        self._function_reads(None, node.body)

    def visit_For(self, node) -> None:
        self.visit(node.iter)
        saved = set(self.bound)
        self._bind_target(node.target)
        for stmt in node.body + node.orelse:
            self.visit(stmt)
        self.bound = saved

    visit_AsyncFor = visit_For

    def visit_While(self, node: ast.While) -> None:
        self.visit(node.test)
        self._scoped(node.body + node.orelse)

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self._scoped(node.body)
        self._scoped(node.orelse)

    def visit_With(self, node) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self._bind_target(item.optional_vars)
        for stmt in node.body:
            self.visit(stmt)

    visit_AsyncWith = visit_With

    def visit_Try(self, node) -> None:
        self._scoped(node.body)
        for handler in node.handlers:
            if handler.type is not None:
                self.visit(handler.type)
            saved = set(self.bound)
            if handler.name:
                self.bound.add(handler.name)
            for stmt in handler.body:
                self.visit(stmt)
            self.bound = saved
        self._scoped(node.orelse)
        self._scoped(node.finalbody)

    visit_TryStar = visit_Try

    def visit_Match(self, node) -> None:
        self.visit(node.subject)
        for case in node.cases:
            saved = set(self.bound)
            for n in ast.walk(case.pattern):
                for field in ("name", "rest"):
                    value = getattr(n, field, None)
                    if isinstance(value, str):
                        self.bound.add(value)
                if isinstance(n, ast.MatchValue):
                    self.visit(n.value)
            if case.guard is not None:
                self.visit(case.guard)
            for stmt in case.body:
                self.visit(stmt)
            self.bound = saved

    def visit_Global(self, node) -> None:
        pass

    visit_Nonlocal = visit_Global


def free_names(source: str) -> list[str]:
    """Names the code reads before binding them itself, in order of first read."""
    tree = ast.parse(source)
    visitor = _Reads()
    for stmt in tree.body:
        visitor.visit(stmt)
    return visitor.reads


# -- how each value travels -----------------------------------------------------------------------

@dataclasses.dataclass
class Captured:
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)        # name -> serializer-encoded value
    imports: dict[str, list] = dataclasses.field(default_factory=dict)      # name -> [module, attribute | None]
    local: dict[str, Any] = dataclasses.field(default_factory=dict)         # name -> live object (this kernel only)
    local_reasons: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [*self.inputs, *self.imports, *self.local]


def import_spec(value: Any) -> list | None:
    """``[module, attribute]`` when ``value`` can be re-imported elsewhere, else None."""
    if isinstance(value, types.ModuleType):
        name = getattr(value, "__name__", None)
        if not isinstance(name, str) or name == "__main__" or sys.modules.get(name) is not value:
            return None
        return [name, None]
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qualname, str)) or "<" in qualname or module.startswith("__"):
        return None
    mod = sys.modules.get(module)
    if mod is None:
        return None
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return [module, qualname] if obj is value else None


_CODE = (types.FunctionType, types.ModuleType, type, types.BuiltinFunctionType, types.MethodType)


def _describe(value: Any) -> str:
    if isinstance(value, (types.FunctionType, types.LambdaType)):
        return "a function defined in the notebook"
    if isinstance(value, type):
        return "a class defined in the notebook"
    if isinstance(value, types.ModuleType):
        return "a module that cannot be imported elsewhere"
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def capture(names: Iterable[str], namespace: dict, serializer, *, allow_local: bool,
            skip: Iterable[str] = ()) -> Captured:
    """Sort the namespace's values of ``names`` into inputs, imports and local objects.

    Raises SerializationError naming the first variable that cannot leave the kernel
    when ``allow_local`` is false.
    """
    out = Captured()
    skip = set(skip)
    for name in names:
        if name in skip or name not in namespace:
            continue
        value = namespace[name]
        spec = import_spec(value)
        if spec is not None:
            out.imports[name] = spec
            continue
        if isinstance(value, _CODE):
            reason = "code cannot be serialized; only importable functions, classes and modules travel (as imports)"
        else:
            try:
                out.inputs[name] = serializer.encode(value, f"variable {name!r}")
                continue
            except SerializationError as exc:
                reason = str(exc)
        if not allow_local:
            raise SerializationError(
                f"the cell reads variable {name!r} ({_describe(value)}), which cannot be sent to a worker process: "
                f"{reason}. Define it inside the cell, import it from a module, or run the cell on this kernel's "
                f"worker (%nbqueue worker start, and no --queue)")
        out.local_reasons[name] = reason
        if isinstance(value, _CODE):
            out.local[name] = value          # functions and modules are passed live
        else:
            try:
                out.local[name] = copy.deepcopy(value)   # a snapshot, so later edits do not leak in
            except Exception:
                out.local[name] = value
    return out
