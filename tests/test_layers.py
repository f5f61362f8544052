"""Imports point one way: each part of the package imports only the parts below it.

Read from the source with ``ast``, so imports inside functions (the lazy ones that keep the
CLI fast) count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlflow_tg"

# Bottom first. A module imports its own part, and the parts of lower layers; parts that share
# a layer do not import each other.
LAYERS = [
    {"keys", "errors"},
    {"config"},
    {"tracking"},
    {"train"},
    {"graph", "prune"},
    {"predictor"},
    {"serve"},
    {"integrations"},
    {"job"},
]
LAYER = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """``mlflow_tg.graph.capture`` → ``graph``; ``mlflow_tg.keys`` → ``keys``."""
    return module.split(".")[1]


def is_part(name: str) -> bool:
    """Whether ``mlflow_tg.<name>`` is a module or subpackage, not a name the package defines."""
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def package_imports(path: Path) -> set[str]:
    """The ``mlflow_tg.*`` modules a source file imports, wherever the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # From the package itself, only its modules count: __version__ is no part.
            names = (
                [node.module]
                if node.module != "mlflow_tg"
                else [f"mlflow_tg.{alias.name}" for alias in node.names if is_part(alias.name)]
            )
            found.update(name for name in names if name.startswith("mlflow_tg."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mlflow_tg."))
    return found


def test_every_part_has_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()}
    parts -= {"__init__", "__pycache__"}
    assert parts == set(LAYER), f"parts without a layer: {sorted(parts - set(LAYER))}"


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if relative.name == "__init__" and len(relative.parts) == 2:
            continue  # the package's face: its lazy mlflow_tg.watch
        importer = relative.parts[1]
        for imported in package_imports(path):
            target = part_of(imported)
            if target != importer and LAYER[target] >= LAYER[importer]:
                upward.append(f"{'/'.join(relative.parts)} imports {imported}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text(
        "from mlflow_tg import keys\n"
        "def f():\n"
        "    from mlflow_tg.serve.cli import quiet\n"
        "    import mlflow_tg.graph.capture\n"
    )
    assert package_imports(source) == {
        "mlflow_tg.keys",
        "mlflow_tg.serve.cli",
        "mlflow_tg.graph.capture",
    }
