"""The import-linter contracts in pyproject.toml hold, and they catch an import that runs upward."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed")


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contracts on the packages under ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=src, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_layers_hold() -> None:
    proc = lint_imports(REPO / "src")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 kept, 0 broken" in proc.stdout


# (module added to a copy of src/, its one line, the contract it breaks, the import reported)
UPWARD_IMPORTS = [
    ("semseg/models/upward.py", "import semseg.engine.trainer", "semseg layers",
     "semseg.models.upward -> semseg.engine.trainer"),
    ("semseg/data/upward.py", "from semseg.cli import compose", "semseg layers",
     "semseg.data.upward -> semseg.cli"),
    ("semseg/errors_upward.py", "import semseg_bench", "never imports the benchmark",
     "semseg.errors_upward -> semseg_bench"),
]  # fmt: skip


def test_each_upward_import_breaks_its_contract(tmp_path: Path) -> None:
    # All three in one copy and one lint run: the report lists every broken import on its own line.
    src = tmp_path / "src"
    for package in ("semseg", "semseg_bench"):
        shutil.copytree(REPO / "src" / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for module, line, _, _ in UPWARD_IMPORTS:
        (src / module).write_text(f"{line}\n")
    proc = lint_imports(src)
    assert proc.returncode != 0
    assert "0 kept, 2 broken" in proc.stdout
    for _, _, contract, reported in UPWARD_IMPORTS:
        assert contract in proc.stdout and reported in proc.stdout, reported
