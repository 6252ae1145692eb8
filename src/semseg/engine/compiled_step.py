"""The part of a training step that torch.compile captures: forward and loss of one micro-batch.

``trainer.compile=true`` compiles it (inductor kernels); ``trainer.cuda_graphs=true`` compiles it
with ``mode="reduce-overhead"``, which also records the forward and backward kernels as CUDA
graphs and replays them: one launch per graph instead of hundreds per step, what a small
per-GPU batch (launch-bound) needs. Backward, gradient clipping, the optimizer, EMA and the
GradScaler stay in eager PyTorch around it, so resume, the NaN stop and DDP work as uncompiled.
Compiled kernels are cached on disk (``TORCHINDUCTOR_CACHE_DIR``): a second run of the same
config compiles in a fraction of the first run's time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from semseg.errors import ConfigError
from semseg.models.base import unwrap_model
from semseg.runtime import autocast

log = logging.getLogger(__name__)

__all__ = ["StepForward", "build_step_forward", "forward_loss", "inductor_cache_dir"]


def forward_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """The loss of ``model`` on one micro-batch under the run's autocast: the model's heads apply
    the loss group's ``loss_fn`` to their outputs (``EncoderDecoder.loss``). ``model`` may be
    wrapped (DDP): the forward runs through the wrapper, the loss, which uses no parameters, on
    its outputs."""
    with autocast(device, precision):
        return unwrap_model(model).loss(model(images), target, loss_fn)


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels and graphs (``TORCHINDUCTOR_CACHE_DIR`` when set)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


class StepForward:
    """:func:`forward_loss`, eager or compiled (``mode``: torch.compile's, None for eager).

    ``compile_s``: the wall time of the first compiled call up to the start of the next one, i.e.
    the first step, which compiles forward and backward (NaN before two calls; None when eager).
    """

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode
        self.fn = forward_loss if mode is None else torch.compile(forward_loss, mode=mode)
        self._first_start: float | None = None
        self._compile_s: float | None = None

    @property
    def compile_s(self) -> float | None:
        if self.mode is None:
            return None
        return float("nan") if self._compile_s is None else self._compile_s

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.mode is None:
            return self.fn(*args)
        if self._first_start is None:
            self._first_start = time.perf_counter()
        elif self._compile_s is None:  # once per run: the sync after the first step
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._compile_s = time.perf_counter() - self._first_start
            log.info(
                "torch.compile (mode %s): the first step took %.1f s with compiling; compiled "
                "kernels are cached in %s (TORCHINDUCTOR_CACHE_DIR) for the next run",
                self.mode,
                self._compile_s,
                inductor_cache_dir(),
            )
        if self.mode == "reduce-overhead":  # a new step: the graphs' outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(*args)


def build_step_forward(
    compile: bool, cuda_graphs: bool, device: torch.device, sync_bn: bool
) -> StepForward:
    """The forward of ``trainer.compile`` / ``trainer.cuda_graphs``; a ConfigError for what
    CUDA graphs cannot serve (no CUDA device; SyncBatchNorm, which breaks the graph)."""
    if not cuda_graphs:
        return StepForward("default" if compile else None)
    if device.type != "cuda":
        raise ConfigError(
            f"trainer.cuda_graphs=true needs a CUDA device (this run has {device.type}); "
            "use trainer.compile=true for compiled kernels without CUDA graphs"
        )
    if sync_bn:
        raise ConfigError(
            "trainer.cuda_graphs=true with SyncBatchNorm (trainer.sync_bn=true under DDP): its "
            "all-reduce breaks the graph at every norm layer; set trainer.sync_bn=false"
        )
    return StepForward("reduce-overhead")
