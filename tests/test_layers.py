"""The package's shape (ARCHITECTURE.md): imports point down the layers, never up, and nothing imports
in a circle - function-local imports included, since a local import that closes a loop still is one.

Layers, bottom to top; a module may import its own layer and the ones below it:
errors < runtime < data < config < core < artifacts < evaluation < training < embeddings < clusters < api < cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "swavkit"
LAYERS = ["errors", "_moved", "runtime", "data", "config", "core", "artifacts", "evaluation", "training", "embeddings",
          "clusters", "api", "cli", "__main__", "__init__"]
RANK = {name: LAYERS.index(name) for name in LAYERS}
RANK["_moved"] = RANK["errors"]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("swavkit",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """swavkit modules that ``module`` imports anywhere in its file (top level and inside functions)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == "swavkit" and t != module)
    return found


def import_graph() -> dict[str, set[str]]:
    known = module_names()
    graph = {}
    for module, path in known.items():
        deps = set()
        for target in imports_of(module, path, known):
            while target not in known and "." in target:  # a name imported from a module
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                deps.add(target)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in graph.items():
        for dep in deps:
            if module == "swavkit" and dep in ("swavkit._moved",):
                continue
            if layer_of(module) == "__init__":  # the package's lazy table names modules as strings only
                continue
            if RANK[layer_of(dep)] > RANK[layer_of(module)]:
                bad.append(f"{module} -> {dep}")
    return sorted(bad)


def test_every_module_belongs_to_a_documented_layer():
    strays = sorted(m for m in module_names() if layer_of(m) not in RANK)
    assert not strays, f"modules outside the layers of ARCHITECTURE.md: {strays}"


def test_no_import_points_up_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_the_checks_can_fail():
    """The same checks on a made-up graph with a circle and an upward import."""
    graph = {"swavkit.core.model": {"swavkit.training.step"}, "swavkit.training.step": {"swavkit.core.model"}}
    assert find_cycle(graph) == ["swavkit.core.model", "swavkit.training.step", "swavkit.core.model"]
    assert upward_imports(graph) == ["swavkit.core.model -> swavkit.training.step"]


@pytest.mark.parametrize("old, new", [("swavkit.knn", "swavkit.evaluation.knn"),
                                      ("swavkit.checkpoint", "swavkit.artifacts.checkpoint"),
                                      ("swavkit.evaluation.embed", "swavkit.embeddings.embed"),
                                      ("swavkit.cluster", "swavkit.clusters.explorer")])
def test_old_module_paths_still_import_and_name_the_new_home(old, new):
    import importlib
    import sys
    import warnings

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(new in str(w.message) and issubclass(w.category, DeprecationWarning) for w in caught)


def test_every_old_path_names_an_existing_module_directly():
    """An alias points at a module that exists, never at another old path (one hop, one warning)."""
    from swavkit._moved import MOVED

    known = module_names()
    assert sorted(new for new in MOVED.values() if new not in known) == []
    assert sorted(old for old, new in MOVED.items() if new in MOVED) == []
    assert sorted(old for old in MOVED if old in known) == []  # an old path that still exists is no alias


# Python's default warning filters (what a user's script runs under): DeprecationWarning shown only where it
# is attributed to __main__.
DEFAULT_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None)]


def _import_as_a_users_script(code: str, old: str) -> list:
    """Run ``code`` as the main script of a user (file user_script.py) under the default filters, the old
    module path not yet imported; the warnings it shows."""
    import sys
    import warnings

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        for action, category, module in reversed(DEFAULT_FILTERS):
            warnings.filterwarnings(action, category=category, module=module or "")
        exec(compile(code, "user_script.py", "exec"), {"__name__": "__main__"})
    return caught


@pytest.mark.parametrize("code, old", [
    ("import os\nfrom swavkit.presets import CPU_BACKBONE\n", "swavkit.presets"),  # a data folder of that name too
    ("import os\nimport swavkit.knn\n", "swavkit.knn"),
    ("import importlib\nimportlib.import_module('swavkit.checkpoint')\n", "swavkit.checkpoint"),
])
def test_an_old_path_warns_at_the_users_own_import_line(code, old):
    caught = _import_as_a_users_script(code, old)
    assert [(w.filename, w.lineno, w.category) for w in caught] == [("user_script.py", 2, DeprecationWarning)]
    assert old in str(caught[0].message)


def test_old_presets_path_is_the_presets_module():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from swavkit.presets import CPU_BACKBONE
        from swavkit.training.presets import CPU_BACKBONE as NEW

    assert CPU_BACKBONE == NEW


def test_aliasing_alters_no_module_and_reload_still_reloads():
    import importlib
    import sys
    import warnings

    import swavkit.evaluation.floors as floors  # stdlib only, no classes: safe to reload here

    spec = floors.__spec__
    sys.modules.pop("swavkit.floors", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert importlib.import_module("swavkit.floors") is floors
    assert floors.__spec__ is spec and floors.__name__ == "swavkit.evaluation.floors"
    original = floors.add_floors
    floors.add_floors = None  # reload must re-execute the module, restoring it
    assert importlib.reload(floors) is floors and callable(floors.add_floors) and floors.add_floors is not original
