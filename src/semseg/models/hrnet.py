"""HRNetV2 (Wang et al., TPAMI 2020) as mmsegmentation's ``HRNet`` backbone: the four branch
outputs of its last stage (strides 4, 8, 16, 32), which mmseg's ``fcn_hr`` head resizes and
concatenates.

Why not timm's HRNet: timm's ``HighResolutionModule`` (from the official classification code)
fuses a lower-resolution branch into a higher one with ``nn.Upsample(scale_factor=2 ** (j - i),
mode='nearest')`` and adds it as is; mmseg's fuses with a *bilinear* upsampling by the same factor
(``mmseg.models.utils.Upsample``: to ``int(side * factor)``) followed by a bilinear resize to the
higher branch's size, so the outputs differ everywhere, and timm's fail at sizes that stride 32
does not divide. Everything else is the same network under the same names, so this module
reuses timm's residual blocks and keeps timm's (and mmseg's) state-dict keys: timm's ImageNet
weights (``hrnet_w18``/``hrnet_w48``, the official HRNet-W*-C that mmseg's
``open-mmlab://msra/hrnetv2_w*`` are) load into it unchanged, and mmseg checkpoints convert by
dropping the ``backbone.`` prefix only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from semseg.models.backbone_weights import KEEP, Layout, PretrainedWeights, load_pretrained, rules

NormLayer = type[nn.Module]
# An HRNet's weights: timm's classification HRNet (or an mmseg checkpoint's ``backbone.*``) under
# the same names; its classification layers are left out.
HRNET_WEIGHTS = PretrainedWeights(
    layouts=(
        Layout(
            "timm's HRNet",
            rules(
                (r"(?:incre_modules|downsamp_modules|final_layer|classifier)\..*", None),
                (r".*", KEEP),
            ),
        ),
    ),
    hint=". Save the state dict of timm.create_model('{name}') to that file.",
)


def _conv_norm(
    c_in: int, c_out: int, kernel_size: int, stride: int, norm_layer: NormLayer, relu: bool
) -> nn.Sequential:
    """conv (no bias), norm[, ReLU]: mmseg's HRNet layers (``.0`` conv, ``.1`` norm)."""
    layers = [
        nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, bias=False),
        norm_layer(c_out),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def _blocks(
    block: type[nn.Module], c_in: int, planes: int, count: int, norm_layer: NormLayer
) -> nn.Sequential:
    """``count`` residual blocks; the first gets a 1x1 conv + norm shortcut if the width changes."""
    c_out = planes * block.expansion
    shortcut = _conv_norm(c_in, c_out, 1, 1, norm_layer, relu=False) if c_in != c_out else None
    layers = [block(c_in, planes, downsample=shortcut, norm_layer=norm_layer)]
    layers += [block(c_out, planes, norm_layer=norm_layer) for _ in range(count - 1)]
    return nn.Sequential(*layers)


class Upsample(nn.Module):
    """mmseg's ``Upsample(scale_factor, mode='bilinear')``, which resizes to ``int(side *
    factor)``: for a power of two the same as interpolating by the factor (the same output size,
    the same source coordinates), which also exports to ONNX for any input size."""

    def __init__(self, scale_factor: int) -> None:
        super().__init__()
        self.scale_factor = float(scale_factor)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear")


class HRModule(nn.Module):
    """mmseg's ``HRModule``: ``blocks_per_branch`` BasicBlocks on each branch, then every branch
    fused into every other (higher: 1x1 conv, norm, bilinear up, resize; lower: strided 3x3
    convs) and summed, ReLU."""

    def __init__(self, widths: Sequence[int], blocks_per_branch: int, norm_layer: NormLayer):
        super().__init__()
        self.branches = nn.ModuleList(
            _blocks(BasicBlock, w, w, blocks_per_branch, norm_layer) for w in widths
        )
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse(widths, i, j, norm_layer) for j in range(len(widths)))
            for i in range(len(widths))
        )
        self.relu = nn.ReLU()

    @staticmethod
    def _fuse(widths: Sequence[int], i: int, j: int, norm_layer: NormLayer) -> nn.Module | None:
        """The layer that brings branch ``j`` to branch ``i``'s width and resolution."""
        if j == i:
            return None
        if j > i:
            return nn.Sequential(
                *_conv_norm(widths[j], widths[i], 1, 1, norm_layer, relu=False),
                Upsample(2 ** (j - i)),
            )
        steps = [
            _conv_norm(widths[j], widths[j], 3, 2, norm_layer, relu=True) for _ in range(i - j - 1)
        ]
        steps.append(_conv_norm(widths[j], widths[i], 3, 2, norm_layer, relu=False))
        return nn.Sequential(*steps)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        x = [branch(t) for branch, t in zip(self.branches, x)]
        fused = []
        for i, layers in enumerate(self.fuse_layers):
            y = x[i] if i == 0 else layers[0](x[0])
            for j in range(1, len(x)):
                if j == i:
                    y = y + x[j]
                elif j > i:
                    size = x[i].shape[2:]
                    y = y + F.interpolate(layers[j](x[j]), size, mode="bilinear")
                else:
                    y = y + layers[j](x[j])
            fused.append(self.relu(y))
        return fused


class HRNet(nn.Module):
    """mmseg's ``HRNet`` with the zoo's ``fcn_hr18`` layout at width ``width``: stem (two strided
    3x3 convs), four Bottlenecks (64 -> 256), then stages of 1, 4 and 3 HRModules with 2, 3 and
    4 branches of widths ``width * (1, 2, 4, 8)``, 4 BasicBlocks per branch; returns the four
    branch outputs (strides 4, 8, 16, 32).

    Args:
        width: 18 (``hrnet_w18``) or 48 (``hrnet_w48``, the zoo's), any other for tests.
        pretrained: load timm's ImageNet weights of ``name`` (:data:`HRNET_WEIGHTS`: hub, or
            the file ``weights``).
        name: the timm model of those weights (``hrnet_w18``, ``hrnet_w48``).
        norm_layer: called with the channel count.
    """

    def __init__(
        self,
        width: int = 48,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        name: str | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        modules_per_stage: Sequence[int] = (1, 4, 3),
        blocks_per_branch: int = 4,
    ) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(4)]
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = norm_layer(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _blocks(Bottleneck, 64, 64, 4, norm_layer)
        previous = [64 * Bottleneck.expansion]
        for stage, modules in enumerate(modules_per_stage, start=1):
            current = widths[: stage + 1]
            self.add_module(f"transition{stage}", self._transition(previous, current, norm_layer))
            hr_modules = [HRModule(current, blocks_per_branch, norm_layer) for _ in range(modules)]
            self.add_module(f"stage{stage + 1}", nn.Sequential(*hr_modules))
            previous = current
        self.out_channels = list(widths)
        self.out_strides = [4, 8, 16, 32]
        for m in self.modules():  # mmseg's init: Kaiming convs, unit norms
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        load_pretrained(self, HRNET_WEIGHTS, name or f"hrnet_w{width}", pretrained, weights)

    @staticmethod
    def _transition(
        previous: Sequence[int], current: Sequence[int], norm_layer: NormLayer
    ) -> nn.ModuleList:
        """mmseg's transition layer: width changes of the kept branches (3x3 conv, norm, ReLU),
        and the new branch from the last one (a strided 3x3 conv, norm, ReLU)."""
        layers: list[nn.Module | None] = [
            _conv_norm(p, c, 3, 1, norm_layer, relu=True) if p != c else None
            for p, c in zip(previous, current)
        ]
        layers.append(nn.Sequential(_conv_norm(previous[-1], current[-1], 3, 2, norm_layer, True)))
        return nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        branches = [self.layer1(x)]
        for stage in (2, 3, 4):
            transition = getattr(self, f"transition{stage - 1}")
            inputs = [
                layer(branches[-1]) if layer is not None else branches[i]  # mmseg's: the last
                for i, layer in enumerate(transition)
            ]
            branches = getattr(self, f"stage{stage}")(inputs)
        return branches
