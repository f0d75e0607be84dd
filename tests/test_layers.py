"""The package's layers, as docs/design.md draws them: each module imports only from its own
layer or those below it, and the import graph has no cycle. Read from the source with `ast`,
every import wherever it is (in a function too). A name taken from a package's facade
(`from ..engine import install`, whose __init__ imports it lazily) counts as an import of the
module that defines it, and so does a name read off the root package (`import asapcli;
asapcli.pruned`). Imports under `if TYPE_CHECKING:` count for the layers (an annotation names a
type of the layer it comes from) but not for cycles (they never run)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import asapcli

PACKAGE = Path(asapcli.__file__).parent

# Lowest first: a module may import from a layer of its rank or below.
LAYERS = [
    ("errors", ["asapcli.errors"]),
    ("engine", ["asapcli.engine"]),
    ("records", ["asapcli.records"]),
    ("runtime", ["asapcli.runtime", "asapcli.demo"]),
    ("measure", ["asapcli.measure"]),
    ("report", ["asapcli.report"]),
    ("api", ["asapcli.api"]),
    ("cli", ["asapcli.cli", "asapcli.commands", "asapcli.lmms_eval", "asapcli.__main__", "asapcli"]),
]


def rank(module: str) -> int:
    for index, (_, prefixes) in reversed(list(enumerate(LAYERS))):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes if prefix != "asapcli"):
            return index
    assert module == "asapcli", f"{module} is in no layer of tests/test_layers.py"
    return len(LAYERS) - 1


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def defined_in(package: str, attribute: str) -> str:
    """The module that defines `package.attribute` (a class or function its facade hands on);
    the package itself for anything else (a constant), or for a module that needs an optional
    extra to import (asapcli.lmms_eval.plugin needs lmms-eval, which the core suite runs without)."""
    if is_module(f"{package}.{attribute}"):
        return f"{package}.{attribute}"
    try:
        value = getattr(importlib.import_module(package), attribute, None)
    except ImportError:
        return package
    where = getattr(value, "__module__", None)
    return where if isinstance(where, str) and where.split(".")[0] == "asapcli" else package


def imports(name: str, source: str, is_package: bool = False) -> tuple[set[str], set[str]]:
    """The asapcli modules a module imports: (those it imports when it runs, those under
    TYPE_CHECKING), each name resolved to the module that defines it."""
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    typing = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
        for node in ast.walk(guard)
    }
    running, annotating = set(), set()
    for node in ast.walk(tree):
        found = annotating if id(node) in typing else running
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "asapcli"}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] == "asapcli":
                found |= {defined_in(target, alias.name) for alias in node.names}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "asapcli":
            found.add(defined_in("asapcli", node.attr))  # the root package's lazy names
    # A package's __init__ runs before any of its modules: importing it from inside is no cycle.
    inside = {target for target in running | annotating if (name + ".").startswith(target + ".")}
    return running - inside, annotating - inside


EDGES = {
    module_name(path): imports(module_name(path), path.read_text(), path.name == "__init__.py")
    for path in PACKAGE.rglob("*.py")
    if "tasks" not in path.parts
}
GRAPH = {module: running for module, (running, _) in EDGES.items()}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{module} ({LAYERS[rank(module)][0]}) imports {target} ({LAYERS[rank(target)][0]})"
        for module, (running, annotating) in EDGES.items()
        for target in running | annotating
        if rank(target) > rank(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_rule_sees_an_upward_import():
    assert rank("asapcli.engine.decoder") < rank("asapcli.runtime.loading") < rank("asapcli.commands.run")
    assert "asapcli.engine.session" in GRAPH["asapcli.runtime.generation"]
    assert "asapcli.report.display" in GRAPH["asapcli.commands.run"]  # `from ..report import display`


def test_the_rule_sees_through_facades_the_root_package_and_annotations():
    """Probe modules of the engine's layer, as the checks above read the package's own."""
    through_facade = imports("asapcli.engine.probe", "from . import PrunedDecoder, install\n")[0]
    assert through_facade == {"asapcli.engine.decoder", "asapcli.engine.wiring"}
    off_the_root = imports("asapcli.engine.probe", "import asapcli\n\ndef f(m):\n    return asapcli.pruned(m)\n")[0]
    assert "asapcli.api" in off_the_root and rank("asapcli.api") > rank("asapcli.engine.probe")
    annotation = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..runtime.loading import Loaded\n"
    assert imports("asapcli.engine.probe", annotation) == (set(), {"asapcli.runtime.loading"})
