"""Building the loss group (``conf/loss/*.yaml``) for a run: ``class_weight: auto`` is replaced by
weights computed from the training split's class pixel counts (``semseg.data.class_pixel_counts``,
cached next to the data). The pixel losses themselves are :mod:`semseg.losses`'.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from semseg.data import class_pixel_counts
from semseg.errors import ConfigError

log = logging.getLogger(__name__)

# ENet weighting (Paszke et al., 2016): w_c = 1 / ln(ENET_C + p_c); bounded by 1 / ln(1.02) ~ 50.5.
ENET_C = 1.02


def enet_class_weights(class_pixels: Sequence[int] | np.ndarray) -> list[float]:
    """w_c = 1 / ln(1.02 + p_c), p_c the class's share of labelled pixels, scaled to mean 1."""
    pixels = np.asarray(class_pixels, dtype=np.float64)
    share = pixels / max(pixels.sum(), 1.0)
    weight = 1.0 / np.log(ENET_C + share)
    return (weight * len(weight) / weight.sum()).tolist()


def resolve_class_weight(
    value: Any,
    train_set: Dataset,
    cache_dirs: Sequence[str | os.PathLike],
    is_main: bool = True,
) -> list[float]:
    """``auto`` -> weights from the train split's pixel counts; a list is checked and passed on."""
    num_classes = int(train_set.num_classes)
    if value == "auto":
        weights = enet_class_weights(class_pixel_counts(train_set, cache_dirs, is_main))
        log.info("class weights (loss.class_weight=auto): %s", [round(w, 3) for w in weights])
        return weights
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    allowed = f"auto or a list of {num_classes} numbers > 0 (dataset.num_classes)"
    if not isinstance(value, list | tuple):
        raise ConfigError(f"loss.class_weight={value!r} must be {allowed}")
    try:
        weights = [float(w) for w in value]
    except (TypeError, ValueError):
        raise ConfigError(f"loss.class_weight={value!r} must be {allowed}") from None
    if len(weights) != num_classes or not all(w > 0 and math.isfinite(w) for w in weights):
        raise ConfigError(f"loss.class_weight has {len(weights)} values; it must be {allowed}")
    return weights


def build_loss(
    loss_cfg: DictConfig,
    train_set: Dataset,
    run_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    is_main: bool = True,
) -> nn.Module:
    """Instantiate ``cfg.loss`` on ``device``, resolving ``class_weight`` when the config has one.

    ``train_set`` (its labels, split, ``num_classes``) is read only for ``class_weight: auto``;
    the counts are cached in its root, else in ``run_dir``.
    """
    overrides: dict[str, Any] = {}
    if loss_cfg.get("class_weight") is not None:
        overrides["class_weight"] = resolve_class_weight(
            loss_cfg.class_weight, train_set, [train_set.root, run_dir], is_main
        )
    return instantiate(loss_cfg, **overrides).to(device)
