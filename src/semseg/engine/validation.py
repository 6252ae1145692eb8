"""Validation during training: the official metric of the model and of its EMA, on every rank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from semseg.data import build_eval_loader
from semseg.distributed import DistEnv, broadcast_buffers
from semseg.engine.ema import EMA_PREFIX
from semseg.errors import ConfigError
from semseg.evaluation.inference import EvalResult, evaluate_model


class Validator:
    """Evaluates weights on the validation set; the loader is built at the first evaluation."""

    def __init__(
        self,
        val_set: Dataset,
        data_cfg: Mapping[str, Any],
        inference_cfg: Mapping[str, Any],
        meta: Mapping[str, Any],
        env: DistEnv,
        precision: str,
    ) -> None:
        self.val_set, self.data_cfg, self.inference_cfg = val_set, data_cfg, inference_cfg
        self.meta, self.env, self.precision = meta, env, precision
        self._loader = None

    def __call__(
        self, model: nn.Module, ema_model: nn.Module | None, num_examples: int
    ) -> tuple[dict[str, float], EvalResult]:
        """``val/*`` metrics of ``model`` (and ``val_ema/*`` of ``ema_model``), and the model's
        result (confusion matrix, ``num_examples`` predictions)."""
        result = self.evaluate(model, num_examples)
        metrics = {f"val/{k}": float(v) for k, v in result.metrics.items()}
        if ema_model is not None:
            ema_metrics = self.evaluate(ema_model, 0).metrics
            metrics.update({f"{EMA_PREFIX}{k}": float(v) for k, v in ema_metrics.items()})
        return metrics, result

    def evaluate(self, model: nn.Module, num_examples: int) -> EvalResult:
        """The official metric of ``model`` on the validation set (every rank takes part)."""
        broadcast_buffers(model)
        if self._loader is None:
            self._loader = build_eval_loader(
                self.val_set,
                self.data_cfg.eval_batch_size,
                self.data_cfg.num_workers,
                rank=self.env.rank,
                world_size=self.env.world_size,
            )
        with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG stream
            return evaluate_model(
                model,
                self._loader,
                self.meta["num_classes"],
                self.meta["ignore_index"],
                self.meta["class_names"],
                self.env.device,
                self.inference_cfg,
                precision=self.precision,
                num_examples=num_examples,
            )


def check_best_metric_present(best_metric: str, metrics: Mapping[str, float]) -> None:
    """``trainer.best_metric`` must name one of the evaluation's metrics."""
    if best_metric not in metrics:
        raise ConfigError(
            f"trainer.best_metric={best_metric} is not an evaluation metric; "
            f"available: {sorted(metrics)}"
        )
