"""DPT (Ranftl et al., ICCV 2021) as mmseg's ``DPTHead`` on its ``VisionTransformer`` (the BDD100K
zoo's ``dpt_vit`` row): the ViT's layers 2, 5, 8, 11 with their class tokens, reassembled into
maps at strides 4, 8, 16 and 32, fused top-down, one 3x3 ConvModule, the classifier; no auxiliary
head.

Every layer is mmseg's, in mmseg's order, under mmseg's names (``reassemble_blocks``, ``convs``,
``fusion_blocks``, ``project``), so that an mmseg checkpoint converts by renaming
(:mod:`semseg.models.mmseg_conversion`): an mmcv ConvModule is a torchvision
``Conv2dNormActivation`` (``.0`` conv, ``.1`` norm), ``conv_seg`` is ``classifier``. mmseg's
pre-activation ConvModules (``order=('act', 'conv', 'norm')``) keep that layout, their ReLU
applied before them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation
from torchvision.ops.misc import ConvNormActivation

from semseg.errors import ConfigError
from semseg.models.decoders import (
    DecodeHead,
    EncoderDecoder,
    HeadFactory,
    NormLayer,
    conv_norm_act,
    encoder_decoder,
    resize,
)
from semseg.models.vit import VisionTransformerBackbone

READOUT_TYPES = ("ignore", "add", "project")


def dpt(backbone: nn.Module, aux_head: HeadFactory | None = None, **kwargs: Any) -> EncoderDecoder:
    """An :class:`~semseg.models.decoders.EncoderDecoder` whose ViT also returns each layer's
    class token (mmseg's DPT configs: ``output_cls_token=True``), which the DPT head reads.
    ``kwargs``: :func:`~semseg.models.decoders.encoder_decoder`'s."""
    if not isinstance(backbone, VisionTransformerBackbone):
        raise ConfigError(
            "model=dpt reads a ViT's class tokens: pair it with backbone=vit_base (or "
            f"deit_small), not {type(backbone).__name__}"
        )
    if aux_head is not None:
        raise ConfigError(
            "model=dpt has no auxiliary head (mmseg's DPT configs have none): set "
            "model.aux_head=null"
        )
    backbone.output_cls_token = True
    return encoder_decoder(backbone, **kwargs)


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> nn.Module:
    """mmcv's ConvModule without norm and activation (``act_cfg=None``): the conv alone."""
    return Conv2dNormActivation(
        in_channels, out_channels, kernel_size, norm_layer=None, activation_layer=None, bias=bias
    )


class ReassembleBlocks(nn.Module):
    """mmseg's ``ReassembleBlocks``: each layer's tokens with the class token read out (``project``:
    concatenated to every patch token, a linear layer and GELU; ``add``: added; ``ignore``), a 1x1
    conv to ``out_channels[i]``, then resized from stride 16 to 4, 8, 16 and 32 (4x4 and 2x2
    transposed convs, identity, a 3x3 conv of stride 2)."""

    def __init__(
        self, in_channels: int, out_channels: Sequence[int], readout_type: str = "project"
    ) -> None:
        super().__init__()
        if readout_type not in READOUT_TYPES:
            raise ConfigError(f"readout_type={readout_type!r}: one of {list(READOUT_TYPES)}")
        if len(out_channels) != 4:
            raise ConfigError(f"post_process_channels={list(out_channels)}: four, one per level")
        self.readout_type = readout_type
        self.projects = nn.ModuleList(_conv(in_channels, c, 1, bias=True) for c in out_channels)
        c = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.readout_projects = (
            nn.ModuleList(
                nn.Sequential(nn.Linear(2 * in_channels, in_channels), nn.GELU())
                for _ in out_channels
            )
            if readout_type == "project"
            else None
        )

    def forward(self, inputs: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """``(N x C x h x w map, N x C class token)`` per level -> one map per level."""
        outs = []
        for i, (x, cls_token) in enumerate(inputs):
            if self.readout_projects is not None:
                tokens = x.flatten(2).transpose(1, 2)
                readout = cls_token.unsqueeze(1).expand_as(tokens)
                tokens = self.readout_projects[i](torch.cat([tokens, readout], -1))
                x = tokens.transpose(1, 2).reshape(x.shape)
            elif self.readout_type == "add":
                x = x + cls_token[:, :, None, None]
            outs.append(self.resize_layers[i](self.projects[i](x)))
        return outs


class PreActResidualConvUnit(nn.Module):
    """mmseg's ``PreActResidualConvUnit``: ``x + (ReLU, 3x3 conv, norm) twice``."""

    def __init__(self, channels: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = Conv2dNormActivation(
            channels, channels, 3, norm_layer=norm_layer, activation_layer=None
        )
        self.conv2 = Conv2dNormActivation(
            channels, channels, 3, norm_layer=norm_layer, activation_layer=None
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """mmseg's ``FeatureFusionBlock``: the coarser path plus a residual unit on the skip map (the
    first block has none), a second residual unit, 2x bilinear upsampling with
    ``align_corners=True`` (mmseg's default here, whatever the model's), a 1x1 conv with bias.

    mmseg resizes the skip map to the path's size (bilinear, ``align_corners=False``) only when
    they differ (inputs not a multiple of 32); at equal sizes that resize is the identity (weights
    exactly 0 and 1), so it always runs here: no branch on shapes (ONNX export)."""

    def __init__(self, channels: int, norm_layer: NormLayer, with_skip: bool = True) -> None:
        super().__init__()
        self.project = _conv(channels, channels, 1, bias=True)
        self.res_conv_unit1 = PreActResidualConvUnit(channels, norm_layer) if with_skip else None
        self.res_conv_unit2 = PreActResidualConvUnit(channels, norm_layer)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None and self.res_conv_unit1 is not None:
            x = x + self.res_conv_unit1(resize(skip, x.shape[-2:], align_corners=False))
        x = self.res_conv_unit2(x)
        x = resize(x, (2 * x.shape[-2], 2 * x.shape[-1]), align_corners=True)
        return self.project(x)


class DPTHead(DecodeHead):
    """DPT's decoder as mmseg's ``DPTHead`` (``expand_channels=False``): reassembly
    (:class:`ReassembleBlocks`), a 3x3 conv per level to ``channels`` (no bias, no norm), fusion
    from the coarsest level (:class:`FeatureFusionBlock`: stride 32 -> 2), a 3x3 ConvModule
    (``project``), Dropout2d and the classifier.

    Reads ``(map, class token)`` pairs of four ViT layers of equal width (``in_channels``), as
    :func:`dpt` makes the ViT return them. ``align_corners`` is the final resize's (the model's);
    the fusion blocks use mmseg's fixed settings.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        post_process_channels: Sequence[int] = (96, 192, 384, 768),
        readout_type: str = "project",
        in_index: Sequence[int] = (0, 1, 2, 3),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = [int(i) for i in in_index]
        widths = {int(in_channels[i]) for i in self.in_index}
        if len(widths) != 1:
            raise ConfigError(f"DPTHead reads ViT layers of one width, not {sorted(widths)}")
        post = [int(c) for c in post_process_channels]
        self.reassemble_blocks = ReassembleBlocks(widths.pop(), post, readout_type)
        self.convs = nn.ModuleList(_conv(c, channels, 3, bias=False) for c in post)
        self.fusion_blocks = nn.ModuleList(
            FeatureFusionBlock(channels, norm_layer, with_skip=i > 0) for i in range(len(post))
        )
        self.project = conv_norm_act(channels, channels, 3, norm_layer)
        self.init_weights()

    def features(self, inputs: list[tuple[Tensor, Tensor]]) -> Tensor:
        maps = self.reassemble_blocks([inputs[i] for i in self.in_index])
        maps = [conv(x) for conv, x in zip(self.convs, maps, strict=True)]
        out = self.fusion_blocks[0](maps[-1])
        for block, skip in zip(self.fusion_blocks[1:], reversed(maps[:-1]), strict=True):
            out = block(out, skip)
        return self.project(out)

    def init_weights(self) -> None:
        """mmseg's: the ConvModules' convs Kaiming-normal (fan-out), biases 0; the resize layers
        and readout projections PyTorch's defaults; the classifier N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, ConvNormActivation):  # conv_norm_act's too
                nn.init.kaiming_normal_(m[0].weight, mode="fan_out", nonlinearity="relu")
                if m[0].bias is not None:
                    nn.init.zeros_(m[0].bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
