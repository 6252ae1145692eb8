"""mmseg's ``MultiLevelNeck`` (the BDD100K zoo's UPerNet + ViT/DeiT rows): the ViT's four
stride-16 maps through a 1x1 conv each, resized by ``scales`` (4, 2, 1, 0.5: strides 4 to 32) and
through a 3x3 conv each, for a pyramid decoder such as UPerNet. No norm, no activation (mmseg's
``norm_cfg=None, act_cfg=None``); convs with bias, xavier-uniform initialised as mmseg's."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class MultiLevelNeck(nn.Module):
    """``lateral_convs`` (1x1), bilinear resize by ``scales``, ``convs`` (3x3), in mmseg's order.

    Args:
        in_channels: channels of each input map (a single map is used for every output).
        out_channels: channels of every output (the zoo: the ViT's width).
        scales: resize factor of each output.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        scales: Sequence[float] = (0.5, 1, 2, 4),
    ) -> None:
        super().__init__()
        self.scales = [float(s) for s in scales]
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.scales
        )
        self.out_channels = [int(out_channels)] * len(self.scales)

    def init_weights(self) -> None:
        """mmseg's ``xavier_init(distribution='uniform')`` of every conv (bias 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        """One map per scale, highest resolution first (for scales 4, 2, 1, 0.5)."""
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        if len(laterals) == 1:
            laterals = laterals * len(self.scales)
        return [
            conv(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
            for conv, x, s in zip(self.convs, laterals, self.scales)
        ]
