"""Pixel losses (``conf/loss/*.yaml``): cross-entropy as the reference defines it, OHEM, class weights.

The loss group says which pixel loss and its settings; a model's heads apply it to their own
outputs (:meth:`semseg.models.decoders.DecodeHead.loss_by_feat`, mmseg's ``loss_by_feat``): a
head with the pixel sampler (the decode head) calls the loss, OHEM included; a head without it
(mmseg's auxiliary heads) takes its plain :meth:`~SegCrossEntropy.cross_entropy`. Pure torch, so
that the models may use it; ``class_weight: auto`` is resolved from the training data by
:func:`semseg.engine.losses.build_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semseg.errors import ConfigError

log = logging.getLogger(__name__)


class SegCrossEntropy(nn.Module):
    """Cross-entropy with an ignore index and optional per-class weights.

    ``normalize="all"`` divides the summed loss by ALL pixels, ignored ones included, as mmseg does
    (the reference); ``"valid"`` divides by the non-ignored pixels (mmseg's ``avg_non_ignore``; with
    class weights this is a count of pixels, not PyTorch's sum of their weights).
    Called on N x C x ... logits and N x ... labels; which outputs of a model it applies to, with
    which weight, the model's heads say (see the module).
    """

    def __init__(
        self,
        ignore_index: int = 255,
        normalize: str = "all",
        class_weight: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if normalize not in ("all", "valid"):
            raise ConfigError(f"loss.normalize must be 'all' or 'valid', got {normalize!r}")
        self.ignore_index, self.normalize = ignore_index, normalize
        weight = (
            None if class_weight is None else torch.tensor(list(class_weight), dtype=torch.float)
        )
        self.register_buffer("class_weight", weight, persistent=False)

    def denominator(self, target: torch.Tensor) -> torch.Tensor | int:
        """What the summed per-pixel loss is divided by (stays on the device: no host sync)."""
        if self.normalize == "all":
            return target.numel()
        return (target != self.ignore_index).sum().clamp_min(1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss with the group's pixel sampler (none here: the plain cross-entropy)."""
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
    be kept: a warning, once, and the batch is plain cross-entropy. A head without the pixel
    sampler (the zoo's auxiliary heads) takes :meth:`~SegCrossEntropy.cross_entropy`, without
    OHEM. The threshold stays on the device: no host sync.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        normalize: str = "all",
        class_weight: Sequence[float] | None = None,
        thresh: float = 0.7,
        min_kept: int = 100000,
    ) -> None:
        super().__init__(ignore_index, normalize, class_weight)
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
