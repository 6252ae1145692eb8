"""Diagnostics around the training loop (``trainer.debug``, set by the ``debug`` config group).

- ``overfit_batches``: train on the first N batches over and over (``debug=overfit``);
- ``detect_anomaly``: autograd anomaly detection (``debug=anomaly``);
- ``profile``: a torch.profiler trace of a few steps into ``<run dir>/profile/`` (``debug=profile``);
- ``eval_images``: evaluate on the first N validation images only (``debug=fast``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"


def fixed_batches(batches: Iterator[Any], count: int) -> Iterator[Any]:
    """The first ``count`` batches, repeated forever; ``batches`` itself when ``count`` is 0."""
    if not count:
        return batches
    return itertools.cycle(list(itertools.islice(batches, int(count))))


def first_images(dataset: Dataset, count: int | None) -> Dataset:
    """The first ``count`` items of ``dataset`` (all of them when ``count`` is null)."""
    if not count or count >= len(dataset):
        return dataset
    return Subset(dataset, range(int(count)))


class DebugSession:
    """Anomaly detection and the profiler, entered by :meth:`start` (or ``with``) and left by
    :meth:`close`.

    :meth:`step` is called after every training iteration (it drives the profiler's schedule).
    """

    def __init__(
        self,
        cfg: DictConfig | None,
        run_dir: str | os.PathLike,
        device: torch.device,
        rank: int = 0,
    ) -> None:
        cfg = cfg or {}
        self.detect_anomaly = bool(cfg.get("detect_anomaly", False))
        self.profile_cfg = cfg.get("profile")
        self.trace_dir = Path(run_dir) / PROFILE_DIR
        self.device, self.rank = device, rank
        self.profiler: torch.profiler.profile | None = None
        self.traced = False
        self._stack = contextlib.ExitStack()

    def start(self) -> DebugSession:
        if self.detect_anomaly:
            self._stack.enter_context(torch.autograd.detect_anomaly(check_nan=True))
            log.info(
                "autograd anomaly detection is on (slow): a NaN in backward names its forward op"
            )
        if self.profile_cfg:
            p = self.profile_cfg
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(
                    wait=int(p.get("wait", 1)),
                    warmup=int(p.get("warmup", 1)),
                    active=int(p.get("active", 3)),
                    repeat=1,
                ),
                on_trace_ready=self._trace_ready,
                record_shapes=bool(p.get("record_shapes", False)),
            )
            self._stack.enter_context(self.profiler)
        return self

    def __enter__(self) -> DebugSession:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def _trace_ready(self, prof: torch.profiler.profile) -> None:
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        torch.profiler.tensorboard_trace_handler(
            str(self.trace_dir), worker_name=f"rank{self.rank}"
        )(prof)
        self.traced = True
        if self.rank != 0:
            return
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(
            sort_by=sort_by, row_limit=int(self.profile_cfg.get("row_limit", 15))
        )
        log.info(
            "profile of %d steps (trace: %s, open in Perfetto or `tensorboard --logdir %s`):\n%s",
            int(self.profile_cfg.get("active", 3)),
            self.trace_dir,
            self.trace_dir,
            table,
        )

    def close(self) -> None:
        self._stack.close()
        if self.profiler is not None and not self.traced:
            log.warning(
                "trainer.debug.profile: the run ended before the profiler's wait + warmup + active "
                "steps; raise schedule.max_iters to get a trace"
            )
