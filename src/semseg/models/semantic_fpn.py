"""Semantic FPN (Kirillov et al., CVPR 2019) as mmsegmentation builds it: an
:class:`~semseg.models.decoders.EncoderDecoder` with the FPN neck (:class:`~semseg.models.necks.FPN`)
and :class:`FPNHead` (``conf/model/semantic_fpn.yaml``).

Checkpoints saved before Semantic FPN was an encoder-decoder (``fpn.*``, ``heads.*``,
``classifier.*`` keys; config ``_target_`` :func:`semantic_fpn`) still load: their keys are renamed
on loading (:func:`semseg.models.build.upgrade_legacy_keys`), their config builds through
:func:`semantic_fpn`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semseg.models.base import IMAGENET_MEAN, IMAGENET_STD
from semseg.models.decoders import (
    ConvLayer,
    DecodeHead,
    EncoderDecoder,
    conv_norm_act,
    encoder_decoder,
)
from semseg.models.necks import FPN

NormLayer = Callable[[int], nn.Module]


def group_norm(num_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm taking the channel count first, like BatchNorm2d (for ``norm_layer`` partials)."""
    return nn.GroupNorm(num_groups, num_channels)


class FPNHead(DecodeHead):
    """mmseg's ``FPNHead``: one head per FPN level of ``log2(stride / stride_0)`` (at least 1)
    3x3 ConvModules, each followed by 2x bilinear upsampling except at the finest level; the levels
    summed at the finest one's size. ``conv_layer``: the 3x3 convs' class (mmseg's ``conv_cfg``;
    the zoo's GN + DCN rows: :class:`~semseg.models.ops.ModulatedDeformConv2dPack`).

    Not initialised here: :func:`~semseg.models.decoders.encoder_decoder` initialises it after
    the neck (mmseg's order), so call :meth:`init_weights` when building one alone.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 128,
        feature_strides: Sequence[int] = (4, 8, 16, 32),
        in_index: Sequence[int] = (0, 1, 2, 3),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = [int(i) for i in in_index]
        strides = [int(s) for s in feature_strides]
        self.scale_heads = nn.ModuleList()
        for i, stride in zip(self.in_index, strides):
            layers: list[nn.Module] = []
            for k in range(max(1, round(math.log2(stride / strides[0])))):
                in_ch = in_channels[i] if k == 0 else channels
                layers.append(conv_norm_act(in_ch, channels, 3, norm_layer, conv_layer=conv_layer))
                if stride != strides[0]:
                    layers.append(
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners)
                    )
            self.scale_heads.append(nn.Sequential(*layers))

    def features(self, inputs: list[Tensor]) -> Tensor:
        out = self.scale_heads[0](inputs[self.in_index[0]])
        for i, head in zip(self.in_index[1:], self.scale_heads[1:]):
            y = head(inputs[i])
            # Odd input sizes: the 2x upsampling overshoots. In an ONNX export always resized, so
            # that the graph follows the input's size, not the example's.
            if y.shape[-2:] != out.shape[-2:] or torch.onnx.is_in_onnx_export():
                y = F.interpolate(
                    y, size=out.shape[-2:], mode="bilinear", align_corners=self.align_corners
                )
            out = out + y
        return out


def semantic_fpn(
    backbone: nn.Module,
    num_classes: int,
    fpn_channels: int = 256,
    head_channels: int = 128,
    dropout: float = 0.1,
    norm_layer: NormLayer = nn.BatchNorm2d,
    pixel_mean: Sequence[float] = IMAGENET_MEAN,
    pixel_std: Sequence[float] = IMAGENET_STD,
    weights: str | os.PathLike | None = None,
) -> EncoderDecoder:
    """Semantic FPN on ``backbone`` in one call (what ``conf/model/semantic_fpn.yaml`` builds);
    also the ``_target_`` of the configs in checkpoints saved before that config named
    :func:`~semseg.models.decoders.encoder_decoder`, which rebuild through it."""
    return encoder_decoder(
        backbone,
        num_classes,
        decode_head=partial(FPNHead, channels=head_channels, dropout=dropout),
        neck=partial(FPN, out_channels=fpn_channels),
        norm_layer=norm_layer,
        weights=weights,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
    )
