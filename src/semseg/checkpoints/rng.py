"""The random streams a checkpoint carries, so that a resumed run continues bit for bit (on CPU,
any number of ranks): each rank saves and restores its own torch / numpy / python states, and its
own GPU's."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
