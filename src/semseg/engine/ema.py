"""Exponential moving average of the weights (``trainer.ema``), through timm's ``ModelEmaV3``.

The trainer updates the average after every optimizer step with ``ema.update(model, step=iteration)``
(timm: the first update copies the weights, then ema = decay x ema + (1 - decay) x weights, buffers
included), evaluates it next to the raw model as ``val_ema/*`` and keeps its weights in every
checkpoint under ``"ema"``.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from semseg.errors import ConfigError

log = logging.getLogger(__name__)

EMA_PREFIX = "val_ema/"


def build_ema(ema_cfg: DictConfig | None, model: nn.Module) -> nn.Module | None:
    """Instantiate ``trainer.ema`` around ``model`` (a deep copy on the same device); None when off."""
    if ema_cfg is None or ema_cfg.get("decay") is None:
        return None
    decay = ema_cfg.decay
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
        raise ConfigError(
            f"trainer.ema.decay={decay!r} must be in (0, 1), e.g. 0.999, or null for no EMA"
        )
    return instantiate(ema_cfg, model)


def restore_ema(
    ema: nn.Module | None, checkpoint: dict[str, Any], model: nn.Module, source: str
) -> None:
    """Load the checkpoint's EMA weights; one without them starts the average from ``model``."""
    if ema is None:
        return
    if checkpoint.get("ema") is None:
        log.info("%s holds no EMA weights: the average starts from the resumed weights", source)
        ema.set(model)
        return
    ema.module.load_state_dict(checkpoint["ema"])


def check_best_metric(name: str, ema: nn.Module | None) -> str:
    """``trainer.best_metric`` names a val metric; a ``val_ema/`` one needs the EMA."""
    if not str(name).startswith(("val/", EMA_PREFIX)):
        raise ConfigError(
            f"trainer.best_metric={name!r} must name an evaluation metric: val/mIoU, or "
            f"{EMA_PREFIX}mIoU with trainer.ema.decay set"
        )
    if str(name).startswith(EMA_PREFIX) and ema is None:
        raise ConfigError(
            f"trainer.best_metric={name} needs an EMA: set trainer.ema.decay (e.g. 0.999) or use val/mIoU"
        )
    return str(name)
