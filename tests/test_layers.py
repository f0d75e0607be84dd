"""The package's layers, as docs/design.md draws them: each module imports only from its own
layer or those below it, and the import graph has no cycle. Read from the source with `ast`
(imports under `if TYPE_CHECKING:` are annotations, not imports, and are left out)."""

from __future__ import annotations

import ast
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


def imports(path: Path) -> set[str]:
    """The asapcli modules `path` imports, wherever in the file (function-level imports too)."""
    name, tree = module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
        for node in ast.walk(guard)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "asapcli"}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "asapcli":
                continue
            for alias in node.names:  # `from . import display` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else target)
    # A package's __init__ runs before any of its modules: importing it from inside is no cycle.
    return {target for target in found if not (name + ".").startswith(target + ".")}


GRAPH = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py") if "tasks" not in path.parts}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{module} ({LAYERS[rank(module)][0]}) imports {target} ({LAYERS[rank(target)][0]})"
        for module, targets in GRAPH.items()
        for target in targets
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
