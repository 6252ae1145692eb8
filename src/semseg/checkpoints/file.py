"""The checkpoint file (``.pt``): its entries (:data:`CHECKPOINT_KEYS`), format version, atomic
writes, and loads that never run code from the file.

The trainer and the mmseg converter both build their checkpoints with :func:`make_checkpoint`,
so that every reader (resume, evaluation, prediction, export) sees the same entries.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from semseg.errors import CheckpointError
from semseg.files import write_atomically

# Version 1: the entries of CHECKPOINT_KEYS. Bump it when an entry changes meaning.
FORMAT_VERSION = 1
CHECKPOINT_KEYS = (
    "format_version",  # FORMAT_VERSION of the writer
    "model",  # the model's state dict
    "optimizer",  # optimizer / scheduler / grad-scaler state dicts (None outside training)
    "scheduler",
    "scaler",
    "iteration",  # training iterations done
    "best_miou",  # best val mIoU so far (-1: none yet)
    "rng",  # RNG states for exact resume ({} outside training)
    "config",  # the resolved config that rebuilds the model (model, backbone, dataset, ...)
    "meta",  # semseg.data.dataset_meta(): class names, palette, ... so that inference needs nothing else
    "metrics",  # the last evaluation's metrics
)
# Module prefixes of the pickled classes that mmcv / mmengine (mmseg 1.x) store in checkpoints.
_MMSEG_MODULES = ("mmcv.", "mmengine.", "mmseg.")
_MAX_LISTED_GLOBALS = 3
_CONVERTER = "scripts/convert_mmseg_checkpoint.py"


def make_checkpoint(
    model_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    iteration: int = 0,
    best_miou: float = -1.0,
    metrics: Mapping[str, float] | None = None,
    optimizer: Mapping | None = None,
    scheduler: Mapping | None = None,
    scaler: Mapping | None = None,
    rng: Mapping | None = None,
    **training_state: Any,
) -> dict[str, Any]:
    """A checkpoint dict with every entry of :data:`CHECKPOINT_KEYS`, plus ``training_state``:
    what the trainer adds (EMA weights, per-rank RNG, ``precision``: the autocast precision its
    validation ran in, which evaluation defaults to)."""
    return training_state | {
        "format_version": FORMAT_VERSION,
        "model": model_state,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "iteration": int(iteration),
        "best_miou": float(best_miou),
        "rng": dict(rng or {}),
        "config": dict(config),
        "meta": dict(meta),
        "metrics": dict(metrics or {}),
    }


# What a failed checkpoint write adds to its one line.
_WRITE_ADVICE = (
    "the checkpoints already there are intact (free space there, then continue with "
    "trainer.resume=auto)"
)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically; a failed write raises a WriteError naming the folder
    and the reason, and leaves the file that was there (and no temporary file)."""
    return write_atomically(path, lambda tmp: _torch_save(state, tmp), "checkpoint", _WRITE_ADVICE)


def _torch_save(state: Mapping[str, Any], path: Path) -> None:
    # Through a Python file object: a failed write() then raises an OSError with its errno (which
    # torch chains to its own RuntimeError), where a path gives only "iostream error".
    with path.open("wb") as f:
        torch.save(state, f)


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a written checkpoint (e.g. ``iter_004000.pt`` -> ``last.pt``) with the same atomicity."""
    return write_atomically(dst, lambda tmp: shutil.copyfile(src, tmp), "checkpoint", _WRITE_ADVICE)


def _refused_globals(path: Path) -> list[str]:
    """The pickled classes/functions in ``path`` that ``weights_only=True`` refuses, read without
    running them; empty for a file that is not a zip-format torch checkpoint."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) or damaged file: nothing can be listed safely
        return []


def refused_pickle_message(label: str, refused: list[str], trust_hint: str | None = None) -> str:
    """One line: ``label`` holds pickled objects that were not loaded, and what to do instead."""
    extra = len(refused) - _MAX_LISTED_GLOBALS
    more = f", ... (+{extra} more)" if extra > 0 else ""
    listed = f" ({', '.join(refused[:_MAX_LISTED_GLOBALS])}{more})" if refused else ""
    text = (
        f"{label} holds pickled objects{listed} that were not loaded, "
        "because loading them could run code"
    )
    if trust_hint is not None:
        return f"{text}; {trust_hint}"
    if any(name.startswith(_MMSEG_MODULES) for name in refused):
        return (
            f"{text}; it looks like an mmseg checkpoint: if you trust its source, convert it with "
            f"{_CONVERTER} --trust-pickle"
        )
    return f"{text}; save plain tensors instead (a state dict, or safetensors)"


def torch_load_weights_only(
    path: str | os.PathLike,
    label: str | None = None,
    map_location: str | torch.device = "cpu",
    trust_hint: str | None = None,
) -> Any:
    """``torch.load(weights_only=True)`` whose failures are one CheckpointError line naming
    ``label`` (default: the path): a refused pickle (with ``trust_hint`` as the advice, if given),
    or an unreadable file."""
    path = Path(path)
    label = label or str(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own text suggests weights_only=False: never pass that on
        refused = _refused_globals(path)
        if refused:
            raise CheckpointError(refused_pickle_message(label, refused, trust_hint)) from e
        # Old (non-zip) files cannot be searched for pickled objects without unpickling them.
        raise CheckpointError(
            f"cannot read checkpoint {label} ({type(e).__name__}): the file is damaged, truncated "
            "or not a torch checkpoint, or an old-format file holding pickled objects that were "
            "not loaded, because loading them could run code"
        ) from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint of this project without running code from the file, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (pass an existing file, e.g. checkpoint=outputs/.../checkpoints/last.pt)"
        )
    state = torch_load_weights_only(path, map_location=map_location)
    if isinstance(state, dict) and "model" not in state and "state_dict" in state:
        raise CheckpointError(
            f"{path} looks like an mmseg checkpoint ('state_dict' entry, no 'model'): convert it "
            f"with {_CONVERTER} first"
        )
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    version = state.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this code's {FORMAT_VERSION}: "
            "update the code"
        )
    return state
