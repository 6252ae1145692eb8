"""Checkpoints: atomic writes, safe loads, and finding the one to resume from."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from semseg.errors import UserError

CHECKPOINT_DIR = "checkpoints"
_ITER_RE = re.compile(r"iter_(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a written checkpoint (e.g. ``iter_004000.pt`` -> ``last.pt``) with the same atomicity."""
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint without executing code (``weights_only=True``), with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (pass an existing file, e.g. checkpoint=outputs/.../checkpoints/last.pt)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, foreign pickle, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return state


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume a run folder from: ``last.pt`` if present, else the newest ``iter_*.pt``."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    last = ckpt_dir / "last.pt"
    if last.is_file():
        return last
    iters = sorted(ckpt_dir.glob("iter_*.pt"), key=lambda p: int(_ITER_RE.search(p.name).group(1)))
    return iters[-1] if iters else None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``iter_*.pt`` files (``last.pt``/``best.pt`` stay)."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    iters = sorted(ckpt_dir.glob("iter_*.pt"), key=lambda p: int(_ITER_RE.search(p.name).group(1)))
    for old in iters[: max(0, len(iters) - keep_last)]:
        old.unlink(missing_ok=True)
