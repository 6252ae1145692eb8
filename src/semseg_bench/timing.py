"""Timing with ``torch.utils.benchmark``: per-step statistics of the measured calls, the device's
matrix-multiply peak, and the share of that peak a measured row reached.

Every clock read goes through ``torch.utils.benchmark.timer``, which synchronises the accelerator
first, so a step's time includes its queued GPU work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Measurement, TaskSpec, Timer
from torch.utils.benchmark import timer as synced_clock


@dataclass(frozen=True)
class StepCounts:
    """Untimed warm-up calls, then timed calls."""

    warmup: int
    steps: int


@dataclass(frozen=True)
class Setting:
    """How the model runs while it is measured: autocast precision, memory layout, torch.compile."""

    precision: str
    channels_last: bool
    compile: bool

    def row(self) -> dict[str, Any]:
        """The setting's columns of a result row."""
        return {"precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile}  # fmt: skip

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def runnable(self, model: nn.Module) -> nn.Module:
        """``model`` (already in :attr:`memory_format`) compiled when the setting says so."""
        return torch.compile(model) if self.compile else model


def time_calls(
    fn: Callable[[], Any], counts: StepCounts, label: str = ""
) -> tuple[dict[str, Any], Any]:
    """Call ``fn`` ``counts.warmup`` then ``counts.steps`` times: statistics of the timed calls
    (a :class:`~torch.utils.benchmark.Measurement` of one call per run) and the last result.

    A fixed number of calls rather than ``Timer.blocked_autorange``: a training step takes
    seconds, and ``Timer.timeit`` adds warm-up calls of its own.
    ``cpu_share``: this process's CPU time over wall time x torch threads while timed. Well
    below 1 on a CPU run means other processes took cores: the numbers are then pessimistic.
    """
    times: list[float] = []
    first = float("nan")
    cpu0 = wall0 = 0.0
    out = None
    for i in range(counts.warmup + counts.steps):
        if i == counts.warmup:
            cpu0, wall0 = time.process_time(), synced_clock()
        start = synced_clock()
        out = fn()
        elapsed = synced_clock() - start
        first = elapsed if i == 0 else first
        if i >= counts.warmup:
            times.append(elapsed)
    cpu_share = (time.process_time() - cpu0) / ((synced_clock() - wall0) * torch.get_num_threads())
    spec = TaskSpec(stmt=label or "fn()", setup="pass", num_threads=torch.get_num_threads())
    measured = Measurement(number_per_run=1, raw_times=times, task_spec=spec)
    stats = {
        "first_call_s": first,
        "s_per_step": measured.mean,
        "s_per_step_median": measured.median,
        "s_per_step_min": min(measured.times),
        "s_per_step_max": max(measured.times),
        "step_times": measured.times,
        "cpu_share": cpu_share,
    }
    return stats, out


def flops_per_second(fn: Callable[[], Any], flops: float, min_time: float) -> float:
    """``flops`` over the mean time of ``fn`` (``Timer.blocked_autorange``, all torch threads)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return flops / timer.blocked_autorange(min_run_time=min_time).mean


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, size: int, min_time: float = 0.5
) -> dict[str, float]:
    """FLOP/s of a ``size`` x ``size`` x ``size`` matrix multiply in ``dtype``, two ways.

    ``mm``: torch.mm (BLAS; on CPUs MKL may not use AVX-512 on AMD); ``conv1x1``: the same GEMM
    as a 1x1 convolution, i.e. through the library the model's convolutions use (oneDNN/cuDNN).
    The peak is the faster of the two.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    side = max(1, int(size**0.5))
    x = torch.randn(1, size, side, side, device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(size, size, 1, 1, device=device).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = {
            "mm": flops_per_second(lambda: torch.mm(a, b), 2 * size**3, min_time),
            "conv1x1": flops_per_second(
                lambda: torch.conv2d(x, w), 2 * size * size * side * side, min_time
            ),
        }
    return {**out, "peak": max(out.values())}


def add_utilisation(row: dict[str, Any], flops_per_image: float, peaks: dict[str, float]) -> None:
    """Add the achieved TFLOP/s of ``row`` and its fraction of the matmul peak at its precision."""
    achieved = flops_per_image * row["img_per_s"]
    row["achieved_tflops"] = achieved / 1e12
    peak = peaks.get(row["precision"])
    row["peak_fraction"] = achieved / peak if peak else float("nan")
