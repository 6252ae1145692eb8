"""The run folder's checkpoints: where they live, which one to resume from, pruning old ones.

The checkpoint file itself (entries, atomic writes, safe loads) is :mod:`semseg.models.checkpoint`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from semseg.errors import CheckpointError
from semseg.models.checkpoint import load_checkpoint
from semseg.tracking.record import CHECKPOINT_DIR

log = logging.getLogger(__name__)

_ITER_RE = re.compile(r"iter_(\d+)\.pt$")


def _iter_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``iter_*.pt`` files, oldest first."""
    return sorted(ckpt_dir.glob("iter_*.pt"), key=lambda p: int(_ITER_RE.search(p.name).group(1)))


def load_latest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, dict | None]:
    """``(path, state)`` of the checkpoint to resume a run folder from, ``(None, None)`` if there
    is none. A damaged ``last.pt`` (zero bytes, truncated) falls back to the newest loadable
    ``iter_*.pt`` with a one-line warning naming both files."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    last = ckpt_dir / "last.pt"
    candidates = ([last] if last.is_file() else []) + _iter_checkpoints(ckpt_dir)[::-1]
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
    """Delete all but the newest ``keep_last`` ``iter_*.pt`` files (``last.pt``/``best.pt`` stay)."""
    iters = _iter_checkpoints(Path(run_dir) / CHECKPOINT_DIR)
    for old in iters[: max(0, len(iters) - keep_last)]:
        old.unlink(missing_ok=True)
