"""Rules of DESIGN.md that the import contracts cannot see, checked on the source of nbqueue:
key names of the key-value store are built in one place (workflow.Keys), and no code outside
the drivers asks a broker, backend or engine what it is instead of reading its declared flags."""
import ast
import pathlib

import pytest

import nbqueue

ROOT = pathlib.Path(nbqueue.__file__).parent
#: where stores are implemented: key names there are the store's own
STORE_CODE = ("drivers/", "backend.py", "testing/")
KV_CALLS = {"kv_get", "kv_set", "kv_set_many", "kv_items", "claim_once"}
STORE_OBJECTS = {"broker", "backend", "engine"}


def modules(skip=()):
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(skip):
            yield rel, ast.parse(path.read_text(), rel)


def literal_text(node: ast.AST) -> bool:
    """Whether an expression spells text itself (a string literal or f-string anywhere in it)."""
    return any(isinstance(n, ast.JoinedStr) or isinstance(n, ast.Constant) and isinstance(n.value, str)
               for n in ast.walk(node))


def kv_keys_spelled_in_place(tree: ast.AST) -> list[int]:
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in KV_CALLS
                and node.args and literal_text(node.args[0])):
            found.append(node.lineno)
    return found


def store_probes(tree: ast.AST) -> list[int]:
    """Lines that ask a broker, backend or engine for an attribute by name (hasattr/getattr)."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                and node.args and isinstance(node.args[0], ast.Attribute) and node.args[0].attr in STORE_OBJECTS):
            found.append(node.lineno)
    return found


def test_key_value_store_keys_are_built_by_workflow_keys():
    offenders = {rel: lines for rel, tree in modules(STORE_CODE) if (lines := kv_keys_spelled_in_place(tree))}
    assert offenders == {}


def test_no_module_outside_the_drivers_probes_a_store_for_what_it_can_do():
    offenders = {rel: lines for rel, tree in modules(("drivers/",)) if (lines := store_probes(tree))}
    assert offenders == {}


@pytest.mark.parametrize("source, found", [
    ('app.backend.kv_set(f"nbq:x:{i}", "1")', True),
    ('backend.claim_once("nbq:tick:" + name, 5)', True),
    ("app.backend.kv_set(Keys.limit(gid), None)", False),
])
def test_the_key_rule_sees_a_key_spelled_in_place(source, found):
    assert bool(kv_keys_spelled_in_place(ast.parse(source))) is found


@pytest.mark.parametrize("source, found", [
    ('hasattr(self.app.broker, "publish_reserved")', True),
    ('getattr(self.app.backend, "lists_tasks", "all")', True),
    ("app.broker.capabilities.priority", False),
])
def test_the_probe_rule_sees_a_store_asked_by_attribute_name(source, found):
    assert bool(store_probes(ast.parse(source))) is found
