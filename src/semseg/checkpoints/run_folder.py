"""A run folder's checkpoints: which files ``checkpoints/`` holds, which one a resume reads, and
which ones are kept.

    checkpoints/iter_XXXXXX.pt   every checkpoint step (the ``trainer.keep_last`` written last are kept)
    checkpoints/last.pt          a copy of the newest iter_XXXXXX.pt: what ``trainer.resume=auto`` reads
    checkpoints/best.pt          the best ``trainer.best_metric`` so far

Each is a checkpoint file of :mod:`semseg.checkpoints.file`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from semseg.checkpoints.file import copy_checkpoint, load_checkpoint, save_checkpoint
from semseg.errors import CheckpointError
from semseg.files import remove_stale_temp_files

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last"
BEST = "best"
_ITER_RE = re.compile(r"iter_(\d+)\.pt$")


def checkpoint_path(run_dir: str | os.PathLike, name: str) -> Path:
    """``<run_dir>/checkpoints/<name>.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"{name}.pt"


def iteration_name(iteration: int) -> str:
    """The name of the checkpoint written at ``iteration``: ``iter_XXXXXX``."""
    return f"iter_{iteration:06d}"


def save_iteration_checkpoint(
    state: Mapping[str, Any], run_dir: str | os.PathLike, keep_last: int
) -> Path:
    """Write ``iter_XXXXXX.pt`` of ``state["iteration"]``, copy it to ``last.pt`` and keep the
    newest ``keep_last`` iteration checkpoints; returns the iteration checkpoint's path."""
    path = save_checkpoint(state, checkpoint_path(run_dir, iteration_name(state["iteration"])))
    copy_checkpoint(path, checkpoint_path(run_dir, LAST))
    prune_checkpoints(run_dir, keep_last)
    return path


def _iter_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``iter_*.pt`` files, oldest first by when they were written (the iteration number breaks
    ties): a run resumed from an earlier checkpoint writes lower numbers after higher ones, and
    its own newest files are the ones to keep and to resume from."""

    def written(path: Path) -> tuple[int, int]:
        return path.stat().st_mtime_ns, int(_ITER_RE.search(path.name).group(1))

    stamped = []
    for path in ckpt_dir.glob("iter_*.pt"):
        try:
            stamped.append((written(path), path))
        except FileNotFoundError:  # pruned meanwhile (another process's run in this folder)
            continue
    return [path for _, path in sorted(stamped)]


def load_latest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, dict | None]:
    """``(path, state)`` of the checkpoint to resume a run folder from, ``(None, None)`` if there
    is none. A damaged ``last.pt`` (zero bytes, truncated) falls back to the newest loadable
    ``iter_*.pt`` with a one-line warning naming both files."""
    last = checkpoint_path(run_dir, LAST)
    candidates = ([last] if last.is_file() else []) + _iter_checkpoints(last.parent)[::-1]
    first_error: CheckpointError | None = None
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            log.warning("%s; resuming from %s instead", first_error, path)
        return path, state
    if first_error is not None:
        raise first_error
    return None, None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the ``keep_last`` ``iter_*.pt`` files written last, whatever their
    iteration numbers (``last.pt``, a copy of the newest, and ``best.pt`` stay; ``keep_last=0``
    leaves only those)."""
    iters = _iter_checkpoints(Path(run_dir) / CHECKPOINT_DIR)
    for old in iters[: max(0, len(iters) - keep_last)]:
        old.unlink(missing_ok=True)


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete the temporary files of checkpoint writes that a kill interrupted (rank 0, at start)."""
    for stale in remove_stale_temp_files(Path(run_dir) / CHECKPOINT_DIR):
        log.info("removed %s, left by a checkpoint write that was interrupted", stale)
