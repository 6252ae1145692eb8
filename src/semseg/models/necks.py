"""Necks of the encoder-decoder: modules between the backbone and the heads, as mmseg's.

A neck config (``conf/model/neck/*.yaml``, ``_partial_: true``) is called with the backbone's
channels (``list[int]``) and returns a module whose ``out_channels`` (``list[int]``) the heads are
built on, whose forward maps the list of feature maps to a list, and whose ``init_weights()``
:func:`~semseg.models.decoders.encoder_decoder` calls once the decode head is built (mmseg's
order: the neck's initialisation, then the head's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    """mmcv's ConvModule without norm and activation: a conv with bias (``.0``)."""
    return Conv2dNormActivation(
        in_channels, out_channels, kernel_size, norm_layer=None, activation_layer=None
    )


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al., CVPR 2017) as mmseg's ``FPN`` with one output per
    input (``num_outs == len(in_channels)``, no extra levels): 1x1 lateral convs, top-down sums
    with nearest upsampling to the finer level's size, a 3x3 conv on each sum."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for c in in_channels:  # built in mmseg's (and torchvision's) order: lateral, output
            self.lateral_convs.append(_conv(int(c), out_channels, 1))
            self.fpn_convs.append(_conv(out_channels, out_channels, 3))
        self.out_channels = [int(out_channels)] * len(in_channels)

    def init_weights(self) -> None:
        """mmseg's Xavier-uniform convs, zero biases. Preceded by the draws of torchvision's FPN
        initialisation, which this neck replaced, so that seeded runs stay bit-identical."""
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
        for conv in convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            top_down = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + top_down
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
