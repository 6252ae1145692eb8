"""Hydra multirun sweeps of the smoke experiment."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .configs import CPU_PINNED
from .processes import SINGLE_THREAD_ENV, run_entry

SWEEP_LRS = (0.01, 0.02)


def sweep_args(toy_root: Path, *overrides: str) -> list[str]:
    """The command-line arguments of a smoke sweep after `src/train.py` (fp32, on the CPU)."""
    return [
        "-m",
        "experiment=smoke",
        *CPU_PINNED,
        f"dataset.root={toy_root}",
        "trainer.precision=fp32",
        *overrides,
    ]


def smoke_sweep(
    toy_root: Path, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python src/train.py -m experiment=smoke dataset.root=<toy> <overrides>`."""
    return run_entry(
        "train.py", *sweep_args(toy_root, *overrides), env={**SINGLE_THREAD_ENV, **(env or {})}
    )
