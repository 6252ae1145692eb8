"""Timing with ``torch.utils.benchmark``: N calls between two synchronisations, the device's
matrix-multiply peak, and the share of that peak a measured row reached.

Every clock read goes through ``torch.utils.benchmark.timer``, which synchronises the accelerator
first, so a timed window includes its queued GPU work; the calls inside it do not wait for each
other, as in training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.benchmark import timer as synced_clock

from semseg_bench.memory import PeakMemory


@dataclass(frozen=True)
class StepCounts:
    """Untimed warm-up calls, then timed calls."""

    warmup: int
    steps: int


@dataclass(frozen=True)
class Setting:
    """How the model runs while it is measured: autocast precision, memory layout, torch.compile
    (False, True, or ``"cuda_graphs"``: mode reduce-overhead, as ``trainer.cuda_graphs``)."""

    precision: str
    channels_last: bool
    compile: bool | str

    def row(self) -> dict[str, Any]:
        """The setting's columns of a result row."""
        return {"precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile}  # fmt: skip

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def runnable(self, model: nn.Module) -> nn.Module:
        """``model`` (already in :attr:`memory_format`) compiled when the setting says so."""
        if not self.compile:
            return model
        return torch.compile(model, mode="reduce-overhead" if self.cuda_graphs else None)

    @property
    def cuda_graphs(self) -> bool:
        return self.compile == "cuda_graphs"


def time_calls(
    fn: Callable[[], Any], counts: StepCounts, device: torch.device
) -> tuple[dict[str, Any], Any]:
    """Call ``fn`` ``counts.warmup`` times, each timed (the first one compiles and autotunes),
    then ``counts.steps`` times between two synchronisations; the timings, the peak memory of the
    two phases, and the last result.

    ``s_per_step`` is the timed window over ``steps``: no sync between the calls, so the device's
    queue stays full as in training. ``warmup_peak_mem_mb`` is the warm-up's peak (cuDNN's
    autotuning workspaces, compiling), ``peak_mem_mb`` the steady state's.
    ``cpu_share``: this process's CPU time over wall time x torch threads in the window. Well
    below 1 on a CPU run means other processes took cores: the numbers are then pessimistic.
    """
    warmup_times: list[float] = []
    out = None
    with PeakMemory(device) as warmup_mem:
        for _ in range(counts.warmup):
            start = synced_clock()
            out = fn()
            warmup_times.append(synced_clock() - start)
    with PeakMemory(device) as mem:
        cpu0, start = time.process_time(), synced_clock()
        for _ in range(counts.steps):
            out = fn()
        window = synced_clock() - start
        cpu_share = (time.process_time() - cpu0) / (window * torch.get_num_threads())
    stats = {
        "first_call_s": warmup_times[0] if warmup_times else float("nan"),
        "warmup_s": warmup_times,
        "s_per_step": window / counts.steps,
        "timed_window_s": window,
        "cpu_share": cpu_share,
        "peak_mem_mb": mem.peak_mb,
        "warmup_peak_mem_mb": warmup_mem.peak_mb if warmup_times else float("nan"),
        "mem_kind": mem.kind,
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
