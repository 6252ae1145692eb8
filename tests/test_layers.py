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


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("semseg/models/upward.py", "import semseg.engine.trainer", "semseg layers"),
        ("semseg/data/upward.py", "from semseg.cli import compose", "semseg layers"),
        ("semseg/errors_upward.py", "import semseg_bench", "never imports the benchmark"),
    ],
)
def test_an_upward_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    src = tmp_path / "src"
    for package in ("semseg", "semseg_bench"):
        shutil.copytree(REPO / "src" / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (src / module).write_text(f"{line}\n")
    proc = lint_imports(src)
    assert proc.returncode != 0
    broken = [row for row in proc.stdout.splitlines() if row.endswith("BROKEN")]
    assert broken and contract in proc.stdout
