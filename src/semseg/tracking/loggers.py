"""Experiment loggers built from `conf/logger/*.yaml` with `hydra.utils.instantiate`.

The engine calls, on every rank (ranks other than 0 get a `NullLogger`)::

    logger = build_logger(cfg.logger, run_dir, resolved_config_dict, is_main=rank == 0)
    logger.log_metrics({"train/loss": 0.9, "train/lr": 0.01}, step=10)
    logger.log_predictions(examples, palette, step=100)
    logger.log_summary({"val/mIoU": 0.41})
    logger.finish()  # at the end of every job: each multirun job is its own W&B run

A logger is any class with these four methods whose constructor takes `run_dir` and `config`
(`NullLogger`, `WandbLogger`, `TensorBoardLogger`, `MultiLogger`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


class NullLogger:
    """Logs nothing (`logger=none`, and every rank but 0)."""

    def __init__(self, **kwargs: Any) -> None:
        # Accepts (and ignores) run_dir / config so the engine can instantiate any logger alike.
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """No-op."""

    def log_predictions(self, examples: list[dict[str, Any]], palette: list, step: int) -> None:
        """No-op."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """No-op."""

    def finish(self) -> None:
        """No-op."""


def build_logger(
    logger_cfg: Any, run_dir: str | os.PathLike, config: dict[str, Any], is_main: bool = True
) -> Any:
    """Instantiate `cfg.logger` (conf/logger/*.yaml) with the run folder and the resolved config.

    Not `instantiate(cfg.logger, config=...)`: `config` is the name of instantiate's own first
    parameter, so the keyword clashes; a partial takes it instead.
    """
    if not is_main:
        return NullLogger()
    from hydra.utils import instantiate

    return instantiate(logger_cfg, _partial_=True)(run_dir=str(run_dir), config=config)


class MultiLogger:
    """Several loggers at once (`logger=many`: W&B and TensorBoard); each call goes to all of them.

    Args:
        run_dir, config: passed on to every logger.
        loggers: name -> logger config (each with its `_target_`), built with :func:`build_logger`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict[str, Any] | None = None,
        loggers: Mapping[str, Any] | None = None,
    ) -> None:
        self.loggers = [
            build_logger(cfg, run_dir, dict(config or {})) for cfg in (loggers or {}).values()
        ]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_predictions(self, examples: list[dict[str, Any]], palette: list, step: int) -> None:
        for logger in self.loggers:
            logger.log_predictions(examples, palette, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_summary(summary)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()
