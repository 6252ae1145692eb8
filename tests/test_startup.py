"""Printing a config or the help never imports torch (seconds of start-up); torchrun's
variables are read first, and torch comes in only when several processes run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, child_env

COMMANDS = {
    "train --cfg job": ["src/train.py", "--cfg", "job"],
    "train --help": ["src/train.py", "--help"],
    "evaluate --cfg job": ["src/evaluate.py", "--cfg", "job"],
    "predict --cfg job": ["src/predict.py", "--cfg", "job"],
    "model_zoo_row --cfg job": ["scripts/model_zoo_row.py", "--cfg", "job"],
}


def imported_modules(args: list[str], env: dict[str, str] | None = None) -> set[str]:
    """Every module ``python args`` imported (``-X importtime``); the command must succeed."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip()  # the config or the help
    return {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_printing_a_config_or_the_help_does_not_import_torch(name: str) -> None:
    modules = imported_modules(COMMANDS[name])
    assert "hydra" in modules and "semseg.cli" in modules
    assert "torch" not in modules and "semseg.distributed" not in modules


def test_one_process_of_a_launcher_skips_torch() -> None:
    # torchrun with --nproc_per_node=1 sets WORLD_SIZE=1: still a single process.
    modules = imported_modules(COMMANDS["train --cfg job"], {"WORLD_SIZE": "1", "RANK": "0"})
    assert "torch" not in modules
