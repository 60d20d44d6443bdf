"""The package's layering: no import circles, no import from a lower floor to a higher one.

The contract is `[tool.importlinter]` in pyproject.toml; docs/ARCHITECTURE.md explains the floors.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_layers_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is missing: install the test extra (`make test` does)")
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_contract_names_every_subpackage():
    """A new top-level module or package must be placed on a floor, or the contract silently ignores it."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    placed = {name.strip().removeprefix("llamaherd.") for row in layers for name in row.split("|")}
    present = {
        p.stem if p.is_file() else p.name
        for p in (ROOT / "llamaherd").iterdir()
        if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
        and p.name not in {"__init__.py", "__main__.py"}
    }
    assert present <= placed, f"place these on a floor in pyproject's [tool.importlinter]: {sorted(present - placed)}"
