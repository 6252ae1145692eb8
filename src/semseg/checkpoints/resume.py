"""What resuming from a checkpoint restores besides the weights: the loop's counters, the optimizer
(moments from the checkpoint, hyper-parameters from this run), the position in the data stream,
and the config changes since the checkpoint, reported key by key (changes the checkpoint cannot
serve stop the run). The random streams are :mod:`semseg.checkpoints.rng`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semseg.errors import UserError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Counters


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


# --------------------------------------------------------------------------------------------
# Config changes

# Keys that differ between any two invocations of the same run and mean nothing for it.
_VOLATILE = ("trainer.resume", "trainer.progress_bar", "paths.", "task_name")
# The new config wins for these: the learning rate continues on the new curve.
SCHEDULE_KEYS = ("schedule.", "optimizer.lr")
# Changes that make the checkpoint's weights unusable for this run.
_ARCHITECTURE = ("model.", "backbone.", "dataset.num_classes")
_NOT_ARCHITECTURE = ("model.weights", "backbone.pretrained", "backbone.weights")
# A head's loss settings (``semseg.models.decoders.DecodeHead``): the weights serve any of them, and
# a checkpoint saved before the heads owned their losses has none.
_HEAD_LOSS_SETTINGS = ("loss_weight", "sample_pixels")


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
    if key.rsplit(".", 1)[-1] in _HEAD_LOSS_SETTINGS:
        return False
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
