"""The package layout is the architecture (docs/architecture.md): each layer imports only the
layers below it, and nothing imports the test builders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ragws"

#: What each part of ragws may import from ragws. Leaves (errors, config, logs) import nothing.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": set(),
    "logs": set(),
    "runtime": {"errors"},
    "engine": {"runtime", "errors"},
    "models": {"engine", "config", "errors"},
    "metrics": {"engine", "runtime"},
    "pipeline": {"models", "engine", "runtime", "metrics", "config", "errors"},
    "serving": {"pipeline", "engine", "runtime", "metrics", "config", "errors", "__init__"},
    "bootstrap": {
        "serving",
        "pipeline",
        "models",
        "engine",
        "runtime",
        "metrics",
        "config",
        "__init__",
    },
    # The client speaks the protocol over a socket; only its splitting of long documents
    # reuses the server's assembly (imported when a document is split).
    "client": {"pipeline", "serving"},
    "cli": {"bootstrap", "client", "pipeline", "config", "logs", "__init__"},
    "__main__": {"cli"},
    "__init__": set(),
    "testing": {"models", "engine", "runtime", "config", "errors"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1].startswith("__version"):
        return "__init__"  # the package itself (its version)
    return parts[1]


def _imports() -> list[tuple[str, str, str]]:
    """(file, importing part, imported part) for every import of ragws inside ragws."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module == "ragws":
                    names = [f"ragws.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "ragws" or name.startswith("ragws."):
                    found.append((str(relative), _part(module), _part(name)))
    return found


def test_every_part_of_the_package_has_a_place_in_the_layers():
    parts = {_part(".".join(("ragws", p.stem))) for p in PACKAGE.iterdir() if p.suffix == ".py"}
    parts |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert parts <= set(ALLOWED), sorted(parts - set(ALLOWED))


def test_no_relative_imports():
    relative = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                relative.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not relative, relative


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_point_down(part):
    wrong = [
        f"{file} imports ragws.{target}"
        for file, source, target in _imports()
        if source == part and target != part and target not in ALLOWED[part]
    ]
    assert not wrong, wrong
