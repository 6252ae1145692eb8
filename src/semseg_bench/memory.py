"""Peak memory of a measured block, and a clean slate between measurements."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
from pathlib import Path

import torch


def release_memory(device: torch.device) -> None:
    """Free what the previous measurement left, so the next peak starts from a clean process."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed heap back
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _vm_hwm_mb() -> float | None:
    """The process's peak resident set size since the last reset (Linux), in MiB."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+)\s+kB", status)
    return int(match.group(1)) / 1024 if match else None


class PeakMemory:
    """Peak memory over a block: CUDA max allocated, or the process's peak RSS (MiB).

    ``kind`` says which: ``cuda_max_allocated``, ``rss_peak`` (reset at the block's start) or
    ``rss_peak_process`` (no reset possible: the peak over the process's lifetime).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # Writing 5 to clear_refs resets VmHWM (Linux); else the peak is the process lifetime's.
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        hwm = _vm_hwm_mb()
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.kind = "rss_peak_process"
        self.peak_mb = hwm
