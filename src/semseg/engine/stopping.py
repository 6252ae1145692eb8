"""Why a run stops before ``schedule.max_iters``: a preemption signal, a non-finite loss, no memory.

Preemption is a clean stop (checkpoint, then exit 0); the other two are one-line user errors.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Any

import torch

from semseg.distributed import DistEnv, all_reduce_max
from semseg.errors import UserError


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; the last good checkpoint is left untouched."""


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM, Kubernetes, ``kill``); the loop checks it after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. some launchers)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, env: DistEnv, at_log: bool) -> bool:
        """Whether to stop after this step; every rank gets the same answer."""
        if not env.distributed:
            return self.signum is not None
        # Ranks agree (one tiny all-reduce) at log steps, so that all of them stop at the same step.
        return at_log and all_reduce_max(float(self.signum or 0), env.device) > 0


class NonFiniteGuard:
    """Remembers the first iteration whose loss was NaN/inf, on the device: the loop reads it only
    at log, evaluation and checkpoint steps, so the steps in between need no sync."""

    def __init__(self, device: torch.device, checkpoint_dir: Path) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.checkpoint_dir = checkpoint_dir

    def see(self, loss: torch.Tensor, iteration: int) -> None:
        bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(bad, iteration, self.first_bad)

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` when a loss since the start was NaN/inf."""
        bad = int(self.first_bad.item())
        if bad >= 0:
            raise NonFiniteLossError(
                f"the loss became NaN/inf at iteration {bad}; stopped without writing a checkpoint "
                f"(the last good one is in {self.checkpoint_dir}). Lower optimizer.lr or use "
                f"trainer.precision=fp32"
            )


def out_of_memory_error(iteration: int, batch_size: int, crop_h: int, crop_w: int) -> UserError:
    """The one line for a CUDA out-of-memory at ``iteration``: what to lower, what to raise."""
    return UserError(
        f"CUDA out of memory at iteration {iteration} with dataset.batch_size={batch_size} and "
        f"crop {crop_h}x{crop_w}: lower dataset.batch_size (and raise trainer.accumulate "
        f"to keep the global batch) or use trainer.precision=bf16"
    )
