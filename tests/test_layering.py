"""The import graph has a small core that everything else sits on, with no imports running back up:

- `pipeline.core` (the domain) imports nothing from `pipeline.infra`, `assets`, Dagster, DuckDB or
  HTTP clients;
- `pipeline.infra` (warehouse, cache, server clients, viewer, reports) imports nothing from `assets`
  or Dagster;
- nothing in `pipeline` imports `assets`.

Every import statement counts, also one inside a function or under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "pipeline/core": ("pipeline.infra", "assets", "dagster", "duckdb", "openai", "httpx"),
    "pipeline/infra": ("assets", "dagster"),
    "pipeline": ("assets",),
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """The absolute names of every module `path` imports (relative imports resolved; for
    `from X import y`, both X and X.y, since y may be a submodule)."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / folder).rglob("*.py")):
        for name in sorted(imported_modules(path, root)):
            for banned in forbidden:
                if is_under(name, banned):
                    found.append(f"{path.relative_to(root)} imports {name} (not allowed: {banned})")
    return found


@pytest.mark.parametrize("folder", list(FORBIDDEN))
def test_no_import_runs_back_up(folder: str) -> None:
    assert (ROOT / folder).is_dir()
    assert violations(folder, FORBIDDEN[folder]) == []


def test_the_core_and_infrastructure_are_the_only_parts_of_pipeline() -> None:
    """Every module of `pipeline` is in one of the two checked parts."""
    loose = sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py")
    assert loose == []
    assert sorted(p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__") == [
        "core",
        "infra",
    ]


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A forbidden import is found however it is written: top level, inside a function, `from ... import`,
    relative."""
    core = tmp_path / "pipeline" / "core"
    core.mkdir(parents=True)
    cases = {
        "a.py": "import duckdb\n",
        "b.py": "def f():\n    from dagster import asset\n",
        "c.py": "from ..infra import warehouse\n",
        "d.py": "import httpx as h\n",
        "e.py": "from pipeline.infra.llm_openai import OpenAIBackend\n",
        "f.py": "from assets import common\n",
        "ok.py": "import numpy\nfrom pipeline.core import units\nfrom . import scoring\n",
    }
    for name, source in cases.items():
        (core / name).write_text(source)
    found = violations("pipeline/core", FORBIDDEN["pipeline/core"], tmp_path)
    flagged = {line.split(" imports ")[0].rsplit("/", 1)[1] for line in found}
    assert flagged == set(cases) - {"ok.py"}
