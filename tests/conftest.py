"""Shared fixtures: a tiny generated dataset in the BDD100K layout and a way to run the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train / 4 val / 2 test street scenes of 64x128, written once per test session."""
    from semseg.data.toy import make_toy_bdd100k

    root = tmp_path_factory.mktemp("toy") / "bdd100k"
    make_toy_bdd100k(
        root, num_train=8, num_val=4, num_test=2, height=64, width=128, seed=0, progress=False
    )
    return root


def run_entry(
    script: str, *overrides: str, timeout: float = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``src/<script>`` with Hydra overrides in a subprocess; fail the test with its output."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / script), *overrides],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script} {' '.join(overrides)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def smoke_overrides(toy_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A seconds-long CPU training run on the tiny dataset, writing into ``run_dir``."""
    return ["experiment=smoke", f"dataset.root={toy_root}", f"hydra.run.dir={run_dir}", *extra]
