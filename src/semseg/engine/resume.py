"""What exact resume needs besides the weights: every rank's RNG streams and the config check.

A resumed run continues as if it had never stopped (bit for bit on CPU, any number of ranks): each
rank saves and restores its own torch / numpy / python RNG states, and its position in the data
stream is a pure function of the iteration (``semseg.data.loader``). A config that changed since
the checkpoint is reported key by key; changes the checkpoint cannot serve stop the run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semseg.errors import UserError

log = logging.getLogger(__name__)

# Keys that differ between any two invocations of the same run and mean nothing for it.
_VOLATILE = ("trainer.resume", "trainer.progress_bar", "paths.", "task_name")
# The new config wins for these: the learning rate continues on the new curve.
SCHEDULE_KEYS = ("schedule.", "optimizer.lr")
# Changes that make the checkpoint's weights unusable for this run.
_ARCHITECTURE = ("model.", "backbone.", "dataset.num_classes")
_NOT_ARCHITECTURE = ("model.weights", "backbone.pretrained", "backbone.weights")


class ResumeConfigError(UserError):
    """The run's config asks for a model the checkpoint cannot provide."""


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
# RNG streams


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy (legacy global) and python RNG states, as tensors and lists
    (loadable with ``torch.load(weights_only=True)``)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": np.random.get_state()[2],
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rank_rng(
    ckpt: Mapping[str, Any], rank: int, world_size: int, source: Path
) -> str | None:
    """Restore this rank's RNG streams from a checkpoint; the warning to log when it holds none
    for this rank (an older checkpoint, or a different number of processes), else None."""
    per_rank = ckpt.get("rng_per_rank") or []
    if len(per_rank) == world_size:
        set_rng_state(per_rank[rank])
        return None
    if rank == 0 and ckpt.get("rng") and world_size == 1:
        set_rng_state(ckpt["rng"])
        return None
    return (
        f"{source} holds no RNG state for rank {rank} of {world_size} processes: this rank's "
        "random streams start fresh (the resumed run is not bit-exact)"
    )


# --------------------------------------------------------------------------------------------
# Config changes


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
