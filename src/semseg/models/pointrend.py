"""PointRend (Kirillov et al., CVPR 2020) as mmsegmentation's ``pointrend_r50`` builds it: the
Semantic FPN encoder-decoder whose decode head is a cascade (:class:`CascadeDecodeHead`) of
:class:`~semseg.models.semantic_fpn.FPNHead` (coarse logits at stride 4) and :class:`PointHead`,
which re-predicts chosen points from the finest FPN level and the coarse logits there.

Training: the point head predicts ``num_points`` points per image, most of them where the coarse
prediction is uncertain; its loss samples the labels there (:func:`point_sample`, nearest) and
adds to the coarse head's (:meth:`CascadeDecodeHead.loss_by_feat`).
Inference: ``subdivision_steps`` times, the logits are upsampled by ``scale_factor`` and the
``subdivision_num_points`` most uncertain pixels replaced by the point head's prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semseg.errors import ConfigError
from semseg.losses import SegCrossEntropy
from semseg.models.decoders import DecodeHead, HeadFactory


def point_sample(
    inputs: Tensor, points: Tensor, align_corners: bool = False, mode: str = "bilinear"
) -> Tensor:
    """``inputs`` (N x C x H x W) at ``points`` (N x P x 2, (x, y) in [0, 1]): N x C x P, as
    mmcv's ``point_sample`` (``grid_sample`` with zero padding)."""
    grid = (points * 2.0 - 1.0).unsqueeze(2)
    return F.grid_sample(inputs, grid, mode=mode, align_corners=align_corners).squeeze(3)


def uncertainty(logits: Tensor) -> Tensor:
    """Second-highest minus highest logit per location (N x 1 x ...): highest where unsure."""
    top2 = torch.topk(logits, k=2, dim=1)[0]
    return (top2[:, 1] - top2[:, 0]).unsqueeze(1)


def pixel_centres(height: int, width: int, device: torch.device) -> Tensor:
    """(x, y) of each pixel's centre in [0, 1], row-major (H*W x 2), computed as mmseg's
    ``get_points_test`` does (``step / 2 + index * step``)."""
    w_step, h_step = 1.0 / width, 1.0 / height
    xs = w_step / 2.0 + torch.arange(width, device=device).float() * w_step
    ys = h_step / 2.0 + torch.arange(height, device=device).float() * h_step
    return torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)], -1).view(
        -1, 2
    )


class PointHead(DecodeHead):
    """mmseg's ``PointHead``: per point, the fine-grained features of the maps ``in_index`` and
    the coarse logits, through ``num_fcs`` 1x1 Conv1d + ReLU (the coarse logits appended again
    after each with ``coarse_pred_each_layer``), then a Conv1d classifier (mmseg's ``fc_seg``).

    ``num_points``, ``oversample_ratio``, ``importance_sample_ratio``: mmseg's ``train_cfg``;
    ``subdivision_steps``, ``subdivision_num_points``, ``scale_factor``: its ``test_cfg``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        num_fcs: int = 3,
        coarse_pred_each_layer: bool = True,
        in_index: Sequence[int] = (0,),
        dropout: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        align_corners: bool = False,
        num_points: int = 2048,
        oversample_ratio: float = 3,
        importance_sample_ratio: float = 0.75,
        subdivision_steps: int = 2,
        subdivision_num_points: int = 8196,
        scale_factor: float = 2,
    ) -> None:
        """``norm_layer``: unused (mmseg's point head has no norm; taken as every head is)."""
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = [int(i) for i in in_index]
        self.coarse_pred_each_layer = coarse_pred_each_layer
        extra = num_classes if coarse_pred_each_layer else 0
        fc_in = sum(in_channels[i] for i in self.in_index) + num_classes
        self.fcs = nn.ModuleList()
        for _ in range(num_fcs):
            self.fcs.append(nn.Sequential(nn.Conv1d(fc_in, channels, 1), nn.ReLU()))
            fc_in = channels + extra
        self.dropout = nn.Dropout(dropout)  # on N x C x P point features
        self.classifier = nn.Conv1d(fc_in, num_classes, 1)
        self.num_points, self.oversample_ratio = int(num_points), float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.subdivision_steps = int(subdivision_steps)
        self.subdivision_num_points = int(subdivision_num_points)
        self.scale_factor = scale_factor

    def init_weights(self) -> None:
        """mmcv's ConvModule init (Kaiming-normal, fan-out, zero bias), the classifier N(0, 0.01)."""
        for fc in self.fcs:
            nn.init.kaiming_normal_(fc[0].weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(fc[0].bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def features(self, inputs: list[Tensor]) -> Tensor:
        """``inputs``: the fine-grained and the coarse point features (N x C x P each)."""
        fine, coarse = inputs
        x = torch.cat([fine, coarse], 1)
        for fc in self.fcs:
            x = fc(x)
            if self.coarse_pred_each_layer:
                x = torch.cat([x, coarse], 1)
        return x

    def loss_by_feat(
        self, outputs: Mapping[str, Tensor], target: Tensor, pixel_loss: SegCrossEntropy
    ) -> Tensor:
        """mmseg's ``PointHead.loss_by_feat``: the loss of the point logits (``"points"``,
        N x classes x P) on the labels at their coordinates (``"point_coords"``), sampled nearest
        as mmseg samples them."""
        points = outputs["point_coords"]
        labels = point_sample(target[:, None].float(), points, mode="nearest")[:, 0].long()
        return self.loss_weight * self.loss_of(outputs["points"], labels, pixel_loss)

    def point_logits(self, inputs: list[Tensor], coarse: Tensor, points: Tensor) -> Tensor:
        """N x classes x P logits at ``points`` (N x P x 2 in [0, 1])."""
        fine = [point_sample(inputs[i], points, self.align_corners) for i in self.in_index]
        coarse_points = point_sample(coarse, points, self.align_corners)
        return self([torch.cat(fine, 1) if len(fine) > 1 else fine[0], coarse_points])

    def training_points(self, coarse: Tensor) -> Tensor:
        """mmseg's ``get_points_train``: of ``oversample_ratio x num_points`` random points, the
        ``importance_sample_ratio`` most uncertain, the rest random again (N x P x 2)."""
        batch = coarse.shape[0]
        sampled = int(self.num_points * self.oversample_ratio)
        points = torch.rand(batch, sampled, 2, device=coarse.device)
        scores = uncertainty(point_sample(coarse, points))
        num_uncertain = int(self.importance_sample_ratio * self.num_points)
        idx = torch.topk(scores[:, 0, :], k=num_uncertain, dim=1)[1]
        idx = idx + sampled * torch.arange(batch, dtype=torch.long, device=coarse.device)[:, None]
        points = points.view(-1, 2)[idx.view(-1), :].view(batch, num_uncertain, 2)
        if self.num_points > num_uncertain:
            rest = torch.rand(batch, self.num_points - num_uncertain, 2, device=coarse.device)
            points = torch.cat((points, rest), dim=1)
        return points

    def subdivide(self, inputs: list[Tensor], coarse: Tensor) -> Tensor:
        """mmseg's ``PointHead.predict`` before its final resize: the refined logits."""
        refined = coarse
        for _ in range(self.subdivision_steps):
            refined = F.interpolate(
                refined,
                scale_factor=self.scale_factor,
                mode="bilinear",
                align_corners=self.align_corners,
            )
            n, c, h, w = refined.shape
            num_points = min(h * w, self.subdivision_num_points)
            idx = uncertainty(refined).view(n, h * w).topk(num_points, dim=1)[1]
            points = pixel_centres(h, w, refined.device)[idx]
            logits = self.point_logits(inputs, coarse, points)
            refined = refined.reshape(n, c, h * w).scatter(
                2, idx[:, None].expand(-1, c, -1), logits
            )
            refined = refined.view(n, c, h, w)
        return refined


class CascadeDecodeHead(nn.ModuleList):
    """mmseg's cascade of decode heads (``CascadeEncoderDecoder``, ``decode_head.0``, ``.1``):
    the first predicts coarse logits, the point head refines them.

    Returns the refined logits in eval mode; in training the first head's logits as ``"out"``,
    the point head's ``"points"`` (N x classes x P) and their ``"point_coords"`` (N x P x 2 in
    [0, 1]), on which the point head's loss samples the labels (:meth:`loss_by_feat`).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        coarse_head: HeadFactory,
        point_head: HeadFactory,
        **kwargs: Any,
    ) -> None:
        """``coarse_head``, ``point_head``: their configs (partials), each called with
        ``in_channels``, ``num_classes`` and ``kwargs`` (norm_layer, align_corners)."""
        super().__init__(
            head(in_channels, num_classes=num_classes, **kwargs)
            for head in (coarse_head, point_head)
        )
        if not isinstance(self[1], PointHead):
            raise ConfigError(f"point_head must be a PointHead, not {type(self[1]).__name__}")
        self.num_classes = self[1].num_classes

    def init_weights(self) -> None:
        for head in self:
            head.init_weights()

    def loss_by_feat(
        self, outputs: Mapping[str, Tensor], target: Tensor, pixel_loss: SegCrossEntropy
    ) -> Tensor:
        """The coarse head's loss plus the point head's, each head's own (weight 1 in the zoo's
        configs, as mmseg's)."""
        coarse = self[0].loss_by_feat(outputs, target, pixel_loss)
        return coarse + self[1].loss_by_feat(outputs, target, pixel_loss)

    def forward(self, inputs: list[Tensor]) -> Tensor | dict[str, Tensor]:
        coarse = self[0](inputs)
        point_head: PointHead = self[1]
        if not self.training:
            return point_head.subdivide(inputs, coarse)
        with torch.no_grad():
            points = point_head.training_points(coarse)
        return {
            "out": coarse,
            "points": point_head.point_logits(inputs, coarse, points),
            "point_coords": points,
        }
