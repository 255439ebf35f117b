"""The README's Layout section matches the tree: every module of `pipeline/` and `assets/` and every
top-level folder of the repository is named there, and every `.py` file it names exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def layout_section(readme: str) -> str:
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert match, "README has no '## Layout' section"
    return match.group(1)


def unnamed_modules(layout: str, root: Path = ROOT) -> list[str]:
    """Modules under pipeline/ and assets/ whose file name the layout does not name."""
    return [
        str(path.relative_to(root))
        for folder in ("pipeline", "assets")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name != "__init__.py" and f"`{path.name}`" not in layout
    ]


def named_files_missing(layout: str, root: Path = ROOT) -> list[str]:
    """`.py` names in the layout that no file of the repository has."""
    names = {name.rsplit("/", 1)[-1] for name in re.findall(r"`([\w/.]+\.py)`", layout)}
    present = {path.name for path in root.rglob("*.py") if ".venv" not in path.parts}
    return sorted(names - present)


def test_every_module_is_named_and_every_named_file_exists() -> None:
    layout = layout_section((ROOT / "README.md").read_text())
    assert unnamed_modules(layout) == []
    assert named_files_missing(layout) == []


def test_every_top_level_folder_is_named() -> None:
    layout = layout_section((ROOT / "README.md").read_text())
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    folders = sorted({line.split("/", 1)[0] for line in tracked.splitlines() if "/" in line})
    assert folders, "git ls-files listed nothing"
    assert [f for f in folders if f"`{f}/" not in layout] == []


def test_the_check_sees_a_module_left_out(tmp_path: Path) -> None:
    """Negative control: a module the layout leaves out, and a named file that is gone, are found."""
    (tmp_path / "pipeline" / "core").mkdir(parents=True)
    (tmp_path / "assets").mkdir()
    for name in ("pipeline/core/scoring.py", "pipeline/core/new_thing.py", "assets/io.py"):
        (tmp_path / name).write_text("")
    layout = "- `scoring.py`: formulas\n- `io.py`\n- `gone.py`: removed long ago\n"
    assert unnamed_modules(layout, tmp_path) == ["pipeline/core/new_thing.py"]
    assert named_files_missing(layout, tmp_path) == ["gone.py"]
