"""The package's import graph, imports inside functions included: no cycles, and every arrow points down
the layer order (entrypoints -> training -> evaluation -> states -> data -> models -> decoding -> bridges ->
leaf modules). Built from the source with `ast`, so it sees imports that never run in the tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llm_modules"
# lowest first; a module may import its own layer's modules and lower layers' only
LAYERS = [
    {"llm_modules.errors", "llm_modules.version", "llm_modules.devices", "llm_modules.tensors",
     "llm_modules.losses"},
    {"llm_modules.bridges"},
    {"llm_modules.decoding"},
    {"llm_modules.models"},
    {"llm_modules.data"},
    {"llm_modules.states"},
    {"llm_modules.evaluation"},
    {"llm_modules.training"},
    {"llm_modules.entrypoints"},
    {"llm_modules", "llm_modules.cli"},  # the package's face: its one re-export and `python -m llm_modules.cli`
]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that `name` imports anywhere in its file (module level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def layer_of(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_every_module_has_a_layer():
    for name in package_modules():
        layer_of(name)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "llm_modules" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "llm_modules"


def test_the_checks_catch_a_cycle_made_by_an_import_inside_a_function(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/composed.py": "def generate():\n    from ..evaluation.harness import evaluate\n",
        "evaluation/__init__.py": "",
        "evaluation/harness.py": "from llm_modules.models import composed\n",
    })
    graph = import_graph(root)
    assert graph["llm_modules.models.composed"] == {"llm_modules.evaluation.harness"}
    assert graph["llm_modules.evaluation.harness"] == {"llm_modules.models.composed"}
    assert find_cycle(graph) in (
        ["llm_modules.evaluation.harness", "llm_modules.models.composed", "llm_modules.evaluation.harness"],
        ["llm_modules.models.composed", "llm_modules.evaluation.harness", "llm_modules.models.composed"],
    )
    assert upward_imports(graph) == ["llm_modules.models.composed -> llm_modules.evaluation.harness"]


def test_the_real_graph_has_the_arrows_it_should():
    graph = import_graph()
    # a sample of known arrows, so that a resolver that finds nothing cannot pass the tests above
    assert "llm_modules.models.composed" in graph["llm_modules.training.objectives"] or any(
        "llm_modules.models.composed" in graph[m] for m in graph if m.startswith("llm_modules.training.objectives"))
    assert "llm_modules.decoding.engine" in graph["llm_modules.decoding.generation"]
    assert "llm_modules.errors" in graph["llm_modules.bridges.base"]


@pytest.mark.parametrize("old", ["llm_modules.model", "llm_modules.serving.app", "llm_modules.models.drafting",
                                 "llm_modules.models.config", "llm_modules.models.stepping", "llm_modules._moved"])
def test_old_import_paths_are_gone(old):
    """An unreleased package keeps no shims: the paths of earlier layouts do not import."""
    import importlib

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


def test_no_shims_and_at_most_six_top_level_modules():
    """No import finder, no module-level __getattr__, no names kept only as re-exports (`noqa: F401`), and the
    package's top level holds at most six modules beside its sub-packages."""
    top = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 6, top
    for name, path in package_modules().items():
        text = path.read_text()
        assert "meta_path" not in text, name
        assert "noqa: F401" not in text, f"{name} re-exports names"
        tree = ast.parse(text)
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), name


def test_each_module_name_says_one_thing():
    """No two modules share a file name or a near-twin of one (drafter/drafting, stepping/steppers), except a
    registry's per-method module named after what it registers (objectives/drafter.py beside the drafter's
    record, PEFT-style), each registry's `base.py`, and `python -m llm_modules.cli` beside the command line it
    runs."""
    from llm_modules.bridges import BRIDGES
    from llm_modules.training.objectives import METHODS

    def stem(name: str) -> str:
        return re.sub(r"(ing|ers|er|s)$", "", name)

    allowed = set(METHODS) | set(BRIDGES) | {"base", "cli"}
    names: dict[str, list[str]] = {}
    for name, path in package_modules().items():
        if path.name != "__init__.py" and path.stem not in allowed:
            names.setdefault(stem(path.stem), []).append(name)
    assert {s: where for s, where in names.items() if len(where) > 1} == {}


def private_reads(root: Path = PACKAGE) -> list[str]:
    """`obj._name` read in one module where `_name` is a private attribute that only other modules of the
    package set (`self._name = ...`): a module reaching into another's internals."""
    modules = package_modules(root)
    owned: dict[str, set[str]] = {}
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    for name, tree in trees.items():
        owned[name] = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                       and isinstance(node.ctx, ast.Store) and node.attr.startswith("_")
                       and not node.attr.startswith("__")}
    found = []
    for name, tree in trees.items():
        others = set().union(*(attrs for other, attrs in owned.items() if other != name))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in others - owned[name]
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and not (isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "super")):
                found.append(f"{name}:{node.lineno} reads {ast.unparse(node)}")
    return found


def test_no_module_reads_another_modules_private_attributes():
    assert private_reads() == []


def test_the_private_read_check_catches_one(tmp_path):
    root = _write(tmp_path, {"a.py": "class A:\n    def __init__(self):\n        self._taps = [1]\n",
                             "b.py": "def taps(model):\n    return model._taps\n"})
    assert private_reads(root) == ["llm_modules.b:2 reads model._taps"]
