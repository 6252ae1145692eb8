"""A run folder's checkpoints and what resuming from them restores.

``checkpoints/`` holds ``iter_XXXXXX.pt`` (the newest ``trainer.keep_last``), ``last.pt`` (a copy of
the newest) and ``best.pt``; the file format itself is :mod:`semseg.models.checkpoint`. A resumed
run continues as if it had never stopped (bit for bit on CPU, any number of ranks): each rank saves
and restores its own torch / numpy / python RNG states (and its own GPU's), its position in the data
stream is a pure function of the iteration (``semseg.data.loader``), and a config that changed since
the checkpoint is reported key by key; changes the checkpoint cannot serve stop the run.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semseg.errors import CheckpointError, UserError
from semseg.files import remove_stale_temp_files
from semseg.models.checkpoint import load_checkpoint
from semseg.tracking.record import CHECKPOINT_DIR

log = logging.getLogger(__name__)

_ITER_RE = re.compile(r"iter_(\d+)\.pt$")


# --------------------------------------------------------------------------------------------
# The files


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


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete the temporary files of checkpoint writes that a kill interrupted (rank 0, at start)."""
    for stale in remove_stale_temp_files(Path(run_dir) / CHECKPOINT_DIR):
        log.info("removed %s, left by a checkpoint write that was interrupted", stale)


# --------------------------------------------------------------------------------------------
# Counters and RNG streams


@dataclass
class TrainState:
    """The loop's counters that a checkpoint restores (weights and optimizer aside)."""

    iteration: int = 0
    best_miou: float = -1.0
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_iteration: int | None = None  # the iteration ``metrics`` were evaluated at

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> TrainState:
        return cls(
            int(ckpt["iteration"]),
            float(ckpt.get("best_miou", -1.0)),
            dict(ckpt.get("metrics", {})),
            ckpt.get("metrics_iteration"),
        )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device) with ``seed``."""
    from timm.utils import random_seed  # here: timm is loaded only once a model is built

    random_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch, numpy (legacy global) and python RNG states, and its own GPU's when
    ``device`` is one, as tensors and lists (loadable with ``torch.load(weights_only=True)``)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": np.random.get_state()[2],
        "python": list(random.getstate()[1]),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> str | None:
    """Restore :func:`rng_state`; the warning to log when the GPU stream cannot be restored."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), None))
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return None
    if isinstance(cuda, list | tuple):  # older checkpoints: every visible GPU's state
        if (device.index or 0) >= len(cuda):
            return (
                "the checkpoint holds no GPU random stream for this process's GPU: it starts fresh"
            )
        cuda = cuda[device.index or 0]
    torch.cuda.set_rng_state(cuda, device)
    return None


def restore_rank_rng(
    ckpt: Mapping[str, Any], rank: int, world_size: int, device: torch.device, source: Path
) -> str | None:
    """Restore this rank's RNG streams from a checkpoint; the warning to log when it holds none
    for this rank (an older checkpoint, or a different number of processes), else None."""
    per_rank = ckpt.get("rng_per_rank") or []
    if len(per_rank) == world_size:
        state = per_rank[rank]
    elif rank == 0 and ckpt.get("rng") and world_size == 1:
        state = ckpt["rng"]
    else:
        return (
            f"{source} holds no RNG state for rank {rank} of {world_size} processes: this rank's "
            "random streams start fresh (the resumed run is not bit-exact)"
        )
    warning = set_rng_state(state, device)
    return f"{source}: {warning}" if warning else None


# --------------------------------------------------------------------------------------------
# Config changes

# Keys that differ between any two invocations of the same run and mean nothing for it.
_VOLATILE = ("trainer.resume", "trainer.progress_bar", "paths.", "task_name")
# The new config wins for these: the learning rate continues on the new curve.
SCHEDULE_KEYS = ("schedule.", "optimizer.lr")
# Changes that make the checkpoint's weights unusable for this run.
_ARCHITECTURE = ("model.", "backbone.", "dataset.num_classes")
_NOT_ARCHITECTURE = ("model.weights", "backbone.pretrained", "backbone.weights")


class ResumeConfigError(UserError):
    """The run's config asks for a model the checkpoint cannot provide."""


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def config_changes(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, run value)}`` for every leaf that differs (missing = None)."""
    before, after = dict(_flatten(old)), dict(_flatten(new))
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and not key.startswith(_VOLATILE)
    }


def _is_architecture(key: str) -> bool:
    return key.startswith(_ARCHITECTURE) and not key.startswith(_NOT_ARCHITECTURE)


def check_resume_config(old: Mapping, new: Mapping, source: str) -> dict[str, tuple[Any, Any]]:
    """Log every change since the checkpoint in one block; stop on changes it cannot serve."""
    changes = config_changes(old, new)
    if not changes:
        return changes
    unusable = [k for k in changes if _is_architecture(k)]
    if unusable:
        listed = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in unusable)
        raise ResumeConfigError(
            f"cannot resume from {source}: the model differs from the checkpoint's ({listed}); "
            "resume with the checkpoint's settings, or start a new run with model.weights="
            f"{source} to fine-tune from it"
        )
    lines = [
        f"  {key}: {was!r} -> {now!r}"
        + (
            "  (new schedule: lr continues on the new curve)"
            if key.startswith(SCHEDULE_KEYS)
            else ""
        )
        for key, (was, now) in changes.items()
    ]
    log.warning(
        "resuming from %s with %d config change(s) (checkpoint -> this run):\n%s",
        source,
        len(changes),
        "\n".join(lines),
    )
    return changes


# --------------------------------------------------------------------------------------------
# Optimizer and data stream


def restore_optimizer(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Moments and step counts from the checkpoint, hyper-parameters from this run's config."""
    config_hparams = [
        {k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups
    ]
    optimizer.load_state_dict(state)
    for group, hparams in zip(optimizer.param_groups, config_hparams):
        group.update(hparams)


def data_position(
    iteration: int, accumulate: int, batch_size: int, world_size: int, seed: int
) -> dict[str, int]:
    """Where each rank is in its data stream (a pure function of these numbers, data/loader.py)."""
    return {
        "batches": iteration * accumulate,
        "batch_size": batch_size,
        "world_size": world_size,
        "seed": seed,
    }


def data_stream_change(
    saved: Mapping[str, int] | None, now: Mapping[str, int], path: Path
) -> str | None:
    """The warning when the checkpoint's data stream (batch size, processes, seed) differs from
    ``now``; None when it does not (the caller logs it, in the run's own log)."""
    if not saved:
        return None
    now = {**now, "batches": saved["batches"]}
    changed = {k: (v, now[k]) for k, v in saved.items() if now.get(k) != v}
    if not changed:
        return None
    return (
        f"{path}: the data stream differs from the checkpoint's "
        f"({', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}): the resumed run "
        "sees other samples than an uninterrupted one would"
    )
