"""Semantic FPN (Kirillov et al., CVPR 2019) as mmsegmentation's FPN neck + FPNHead build it."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from semseg.models.base import IMAGENET_MEAN, IMAGENET_STD, SegmentationModel
from semseg.models.build import load_start_weights

NormLayer = Callable[[int], nn.Module]


def group_norm(num_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm taking the channel count first, like BatchNorm2d (for ``norm_layer`` partials)."""
    return nn.GroupNorm(num_groups, num_channels)


class SemanticFPN(SegmentationModel):
    """Backbone (C2..C5) -> FPN (P2..P5) -> per-level conv heads summed at stride 4 -> classifier.

    Takes RGB images with values 0..255 (float or uint8) and normalises them inside with the
    ``pixel_mean``/``pixel_std`` buffers, so a checkpoint predicts from raw images.
    Returns logits ``N x num_classes x H x W`` at the input size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        fpn_channels: int = 256,
        head_channels: int = 128,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(pixel_mean, pixel_std)
        strides = [int(s) for s in backbone.out_strides]
        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(list(backbone.out_channels), fpn_channels)
        # One head per level: log2(stride / stride_0) blocks (at least 1) of conv-norm-ReLU, each
        # followed by 2x bilinear upsampling except at the finest level (1, 1, 2, 3 for P2..P5).
        self.heads = nn.ModuleList()
        for stride in strides:
            num_blocks = max(1, round(math.log2(stride / strides[0])))
            layers: list[nn.Module] = []
            for k in range(num_blocks):
                layers.append(
                    Conv2dNormActivation(
                        fpn_channels if k == 0 else head_channels,
                        head_channels,
                        kernel_size=3,
                        norm_layer=norm_layer,
                        activation_layer=nn.ReLU,
                        bias=False,
                    )
                )
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, kernel_size=1)
        self.num_classes = num_classes
        self._init_weights()

    def _init_weights(self) -> None:
        """mmseg's initialisation: Xavier FPN, Kaiming head convs, N(0, 0.01) classifier."""
        for m in self.fpn.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.heads.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the input size for RGB images with values 0..255."""
        features = self.backbone(self.normalize(images))
        pyramid = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())
        out = self.heads[0](pyramid[0])
        for head, level in zip(self.heads[1:], pyramid[1:]):
            y = head(level)
            if y.shape[-2:] != out.shape[-2:]:  # odd input sizes: 2x upsampling overshoots
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        # NCHW logits: the full-size log_softmax of the loss is ~1.5x faster than on channels_last.
        logits = self.classifier(self.dropout(out)).contiguous()
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def semantic_fpn(
    backbone: nn.Module, num_classes: int, weights: str | os.PathLike | None = None, **kwargs: Any
) -> SemanticFPN:
    """Build a :class:`SemanticFPN` (``kwargs`` as its constructor); ``weights``: a checkpoint of
    this project to start from (fine-tuning, ``model.weights=PATH``, a model folder or hf://)."""
    model = SemanticFPN(backbone, int(num_classes), **kwargs)
    if weights is not None:
        load_start_weights(model, weights)
    return model
