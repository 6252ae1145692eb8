"""Segmentation losses (``conf/loss/*.yaml``): cross-entropy as the reference defines it, OHEM, class weights.

``build_loss`` instantiates ``cfg.loss``; ``class_weight: auto`` is replaced by weights computed from
the training split's class pixel counts (``semseg.data.class_pixel_counts``, cached next to the data).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from semseg.data import class_pixel_counts
from semseg.errors import ConfigError
from semseg.models.pointrend import point_sample

log = logging.getLogger(__name__)

# ENet weighting (Paszke et al., 2016): w_c = 1 / ln(ENET_C + p_c); bounded by 1 / ln(1.02) ~ 50.5.
ENET_C = 1.02


class SegCrossEntropy(nn.Module):
    """Cross-entropy with an ignore index and optional per-class weights.

    ``normalize="all"`` divides the summed loss by ALL pixels, ignored ones included, as mmseg does
    (the reference); ``"valid"`` divides by the non-ignored pixels (mmseg's ``avg_non_ignore``; with
    class weights this is a count of pixels, not PyTorch's sum of their weights).
    Called with the ``{"out", "aux"}`` outputs of a model with an auxiliary head (training), it
    returns ``loss(out) + aux_weight * cross_entropy(aux)``: as in mmseg, where each head has its
    own loss, a pixel sampler (OHEM) applies to the decode head only; PointRend's ``"points"``
    add their :meth:`point_loss`, DANet's ``"pam"`` and ``"cam"`` logits the decode loss.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        normalize: str = "all",
        class_weight: Sequence[float] | None = None,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        if normalize not in ("all", "valid"):
            raise ConfigError(f"loss.normalize must be 'all' or 'valid', got {normalize!r}")
        self.ignore_index, self.normalize = ignore_index, normalize
        weight = (
            None if class_weight is None else torch.tensor(list(class_weight), dtype=torch.float)
        )
        self.register_buffer("class_weight", weight, persistent=False)
        self.aux_weight = float(aux_weight)

    def __call__(self, outputs: torch.Tensor | Mapping[str, torch.Tensor], target: torch.Tensor):
        if not isinstance(outputs, Mapping):
            return super().__call__(outputs, target)
        loss = super().__call__(outputs["out"], target)
        if "aux" in outputs:  # a model with an auxiliary head, in training
            loss = loss + self.aux_weight * self.cross_entropy(outputs["aux"], target)
        if "points" in outputs:  # PointRend's point head (mmseg's loss weight 1)
            loss = loss + self.point_loss(outputs["points"], outputs["point_coords"], target)
        # DANet's head (mmseg DAHead.loss_by_feat): the decode loss (OHEM included) on the logits
        # of its position- and channel-attention branches too, weight 1 each.
        for branch in ("pam", "cam"):
            if branch in outputs:
                loss = loss + super().__call__(outputs[branch], target)
        return loss

    def point_loss(self, logits: torch.Tensor, points: torch.Tensor, target: torch.Tensor):
        """The loss of N x C x P point logits at ``points`` (N x P x 2 in [0, 1]), on the labels
        there (nearest, as mmseg samples them)."""
        labels = point_sample(target[:, None].float(), points, mode="nearest")[:, 0].long()
        return super().__call__(logits, labels)

    def denominator(self, target: torch.Tensor) -> torch.Tensor | int:
        """What the summed per-pixel loss is divided by (stays on the device: no host sync)."""
        if self.normalize == "all":
            return target.numel()
        return (target != self.ignore_index).sum().clamp_min(1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(logits, target)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The plain (weighted) cross-entropy over every valid pixel, normalised."""
        loss = F.cross_entropy(
            logits.float(),
            target,
            weight=self.class_weight,
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        return loss / self.denominator(target)


class OhemCrossEntropy(SegCrossEntropy):
    """Cross-entropy over the hard pixels only, with mmseg's ``OHEMPixelSampler`` semantics.

    A valid pixel is kept when the softmax probability of its true class is below
    ``max(thresh, p_k)``, where p_k is the (``min_kept`` x images)-th smallest of those
    probabilities in the batch (the last one when there are fewer valid pixels): at least
    ``min_kept`` pixels per image take part. The kept pixels' losses are summed and normalised as in
    :class:`SegCrossEntropy`. When ``min_kept`` is at least the pixels of an image every pixel would
    be kept: a warning, once, and the batch is plain cross-entropy. The auxiliary head's loss is
    plain cross-entropy (the zoo's auxiliary heads have no sampler). The threshold stays on the
    device: no host sync.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        normalize: str = "all",
        class_weight: Sequence[float] | None = None,
        thresh: float = 0.7,
        min_kept: int = 100000,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__(ignore_index, normalize, class_weight, aux_weight)
        if not 0 < thresh <= 1:
            raise ConfigError(f"loss.thresh={thresh} must be in (0, 1]")
        if min_kept < 1:
            raise ConfigError(f"loss.min_kept={min_kept} must be >= 1")
        self.thresh, self.min_kept = float(thresh), int(min_kept)
        self._warned = False

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch_kept = self.min_kept * target.shape[0]
        if batch_kept >= target.numel():  # shapes only: no host sync
            if not self._warned:
                log.warning(
                    "loss.min_kept=%d is not below the %d pixels of an image: every pixel is kept, "
                    "so this run trains with plain cross-entropy (lower loss.min_kept for OHEM)",
                    self.min_kept,
                    target[0].numel(),
                )
                self._warned = True
            return self.cross_entropy(logits, target)
        valid = target != self.ignore_index
        safe_target = target.masked_fill(~valid, 0)
        per_pixel = F.cross_entropy(logits.float(), safe_target, reduction="none")
        with torch.no_grad():
            prob = torch.exp(-per_pixel).masked_fill(~valid, 2.0)  # invalid pixels sort last
            smallest = prob.flatten().topk(batch_kept + 1, largest=False).values
            position = (valid.sum() - 1).clamp(0, batch_kept)
            # gather, not smallest[position]: indexing with a tensor reads it on the host (a sync)
            threshold = smallest.gather(0, position.view(1)).clamp_min(self.thresh)
            kept = valid & (prob < threshold)
        weight = kept.float()
        if self.class_weight is not None:
            weight = weight * self.class_weight[safe_target]
        return (per_pixel * weight).sum() / self.denominator(target)


# --------------------------------------------------------------------------------------------
# Class weights from the training split


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
