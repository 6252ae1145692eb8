"""The BDD100K zoo's attention context heads as mmsegmentation builds them: CCNet's ``CCHead``
(criss-cross attention), PSANet's ``PSAHead`` (point-wise spatial attention) and DANet's ``DAHead``
(position and channel attention), on the shared
:class:`~semseg.models.decoders.DecodeHead` (Dropout2d, classifier, init) with mmseg's module
names, so that their checkpoints convert by renaming (:mod:`semseg.models.mmseg_conversion`).
Their operators are plain PyTorch (:mod:`semseg.models.ops`): no mmcv needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from semseg.errors import ConfigError
from semseg.losses import SegCrossEntropy
from semseg.models.decoders import DecodeHead, FCNHead, NormLayer, conv_norm_act, resize
from semseg.models.ops import CrissCrossAttention, Scale, psa_mask


class CCHead(FCNHead):
    """CCNet (Huang et al., ICCV 2019) as mmseg's ``CCHead``: an FCNHead with two 3x3
    ConvModules and, between them, ``recurrence`` passes of one criss-cross attention module
    (``cca``, shared by the passes); the input concatenated and fused by ``conv_cat``."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        recurrence: int = 2,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`FCNHead`'s (its ``num_convs`` is 2 here, as mmseg fixes it)."""
        super().__init__(in_channels, num_classes, channels=channels, num_convs=2, **kwargs)
        self.recurrence = int(recurrence)
        # Created after FCNHead's init: PyTorch's default init, as mmcv's plain convs keep.
        self.cca = CrissCrossAttention(channels)

    def features(self, inputs: list[Tensor]) -> Tensor:
        x = self.transform_inputs(inputs, self.in_index)
        out = self.convs[0](x)
        for _ in range(self.recurrence):
            out = self.cca(out)
        out = self.convs[1](out)
        return self.conv_cat(torch.cat([x, out], 1)) if self.conv_cat is not None else out


PSA_TYPES = ("collect", "distribute", "bi-direction")


class PSAHead(DecodeHead):
    """PSANet (Zhao et al., ECCV 2018) as mmseg's ``PSAHead``: per direction (``collect``,
    ``distribute`` or both), a 1x1 ConvModule reduction, shrunk by ``shrink_factor``, an attention
    over a ``mask_size`` window per pixel (:func:`~semseg.models.ops.psa_mask`, softmax) that
    aggregates the shrunk map; a 1x1 ConvModule (``proj``, padding 1 as mmseg's) back to the input
    width, resized to the input, concatenated with it and fused by a 3x3 ConvModule.

    ``normalization_factor``: the aggregation is multiplied by its inverse (None: the mask's
    area, as mmseg computes it). mmseg's non-compact form only (the zoo's ``compact=False``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        mask_size: Sequence[int] = (97, 97),
        channels: int = 512,
        psa_type: str = "bi-direction",
        compact: bool = False,
        shrink_factor: int = 2,
        normalization_factor: float | None = 1.0,
        psa_softmax: bool = True,
        in_index: int = 3,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        if psa_type not in PSA_TYPES:
            raise ConfigError(f"psa_type={psa_type!r}: one of {', '.join(PSA_TYPES)}")
        if compact:
            raise ConfigError("compact=true (mmseg's compact collect map) is not supported here")
        self.in_index = in_index
        self.mask_size = tuple(int(s) for s in mask_size)
        self.shrink_factor = int(shrink_factor)
        self.psa_softmax = psa_softmax
        mask_area = self.mask_size[0] * self.mask_size[1]
        self.normalization_factor = float(normalization_factor or mask_area)
        self.directions = ["collect", "distribute"] if psa_type == "bi-direction" else [psa_type]
        c_in = in_channels[in_index]

        def attention() -> nn.Sequential:
            return nn.Sequential(
                conv_norm_act(channels, channels, 1, norm_layer),
                nn.Conv2d(channels, mask_area, 1, bias=False),
            )

        self.reduce = conv_norm_act(c_in, channels, 1, norm_layer)
        self.attention = attention()
        if len(self.directions) == 2:
            self.reduce_p = conv_norm_act(c_in, channels, 1, norm_layer)
            self.attention_p = attention()
        self.proj = Conv2dNormActivation(
            len(self.directions) * channels, c_in, 1, padding=1, norm_layer=norm_layer
        )
        self.bottleneck = conv_norm_act(2 * c_in, channels, 3, norm_layer)
        self.init_weights()
        for branch in self._branches():  # mmseg leaves its plain convs at PyTorch's init
            branch[1][1].reset_parameters()

    def _branches(self) -> list[tuple[nn.Module, nn.Sequential]]:
        """(reduction, attention) of each direction, in mmseg's order (collect first)."""
        if len(self.directions) == 2:
            return [(self.reduce, self.attention), (self.reduce_p, self.attention_p)]
        return [(self.reduce, self.attention)]

    def features(self, inputs: list[Tensor]) -> Tensor:
        identity = inputs[self.in_index]
        reduced = [reduce(identity) for reduce, _ in self._branches()]
        n, c, h, w = reduced[0].shape
        align_corners = self.align_corners
        if self.shrink_factor != 1:  # mmseg's rule: align corners when both sides are odd
            s = self.shrink_factor
            if h % s and w % s:
                h, w, align_corners = (h - 1) // s + 1, (w - 1) // s + 1, True
            else:
                h, w, align_corners = h // s, w // s, False
            reduced = [resize(x, (h, w), align_corners) for x in reduced]
        outs = []
        for x, (_, attention), direction in zip(reduced, self._branches(), self.directions):
            y = psa_mask(attention(x), direction, self.mask_size)
            if self.psa_softmax:
                y = y.softmax(dim=1)
            out = torch.bmm(x.reshape(n, c, h * w), y.reshape(n, h * w, h * w)).view(n, c, h, w)
            outs.append(out * (1.0 / self.normalization_factor))
        out = self.proj(torch.cat(outs, 1))
        out = resize(out, identity.shape[2:], align_corners)
        return self.bottleneck(torch.cat([identity, out], 1))


# --------------------------------------------------------------------------------------------
# DANet


class PositionAttention(nn.Module):
    """mmseg's ``PAM`` (DANet, Fu et al., CVPR 2019; an mmseg ``SelfAttentionBlock``): 1x1
    ``query_project`` and ``key_project`` (with bias) to ``channels``, ``value_project`` at the
    input's width, a softmax over all positions (no scaling), the attended values scaled by
    ``gamma`` (mmcv ``Scale``, 0 at initialisation) and added to the input."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.key_project = nn.Conv2d(in_channels, channels, 1)
        self.query_project = nn.Conv2d(in_channels, channels, 1)
        self.value_project = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)

    def reset_parameters(self) -> None:
        """PyTorch's default init of the projections (mmseg's plain convs), ``gamma`` 0."""
        for conv in (self.key_project, self.query_project, self.value_project):
            conv.reset_parameters()
        nn.init.zeros_(self.gamma.scale)

    def forward(self, x: Tensor) -> Tensor:
        query = self.query_project(x).flatten(2).transpose(1, 2)  # N x HW x C'
        key = self.key_project(x).flatten(2)  # N x C' x HW
        value = self.value_project(x).flatten(2).transpose(1, 2)  # N x HW x C
        attention = torch.matmul(query, key).softmax(dim=-1)
        context = torch.matmul(attention, value).transpose(1, 2).reshape(x.shape)
        return self.gamma(context) + x


class ChannelAttention(nn.Module):
    """mmseg's ``CAM`` (DANet): a C x C affinity of the channels over all positions, turned into
    ``softmax(max - affinity)`` per row, mixes the channels; scaled by ``gamma`` (mmcv ``Scale``,
    0 at initialisation) and added to the input. No weights but ``gamma``."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = Scale(0.0)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(2)  # N x C x HW
        energy = torch.bmm(flat, flat.transpose(1, 2))
        attention = (energy.amax(dim=-1, keepdim=True) - energy).softmax(dim=-1)
        return self.gamma(torch.bmm(attention, flat).reshape(x.shape)) + x


class DAHead(DecodeHead):
    """DANet as mmseg's ``DAHead``: on feature map ``in_index`` two branches, each a 3x3
    ConvModule, an attention module (:class:`PositionAttention` ``pam`` with ``pam_channels``
    queries and keys; :class:`ChannelAttention` ``cam``) and a 3x3 ConvModule; the classifier reads
    their sum. In training each branch has its own classifier too (``pam_conv_seg``,
    ``cam_conv_seg``, kept in the state dict for fine-tuning), and the head returns
    ``{"out", "pam", "cam"}`` logits: mmseg trains with the decode loss on all three, weight 1
    each. Inference uses the sum's logits only."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pam_channels: int = 64,
        in_index: int = 3,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = in_index
        c_in = in_channels[in_index]
        self.pam_in_conv = conv_norm_act(c_in, channels, 3, norm_layer)
        self.pam = PositionAttention(channels, int(pam_channels))
        self.pam_out_conv = conv_norm_act(channels, channels, 3, norm_layer)
        self.pam_conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.cam_in_conv = conv_norm_act(c_in, channels, 3, norm_layer)
        self.cam = ChannelAttention()
        self.cam_out_conv = conv_norm_act(channels, channels, 3, norm_layer)
        self.cam_conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()
        # mmseg leaves its plain convs at PyTorch's init
        self.pam.reset_parameters()
        self.pam_conv_seg.reset_parameters()
        self.cam_conv_seg.reset_parameters()

    def branches(self, inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The position- and channel-attention branches' ``channels``-wide maps."""
        x = inputs[self.in_index]
        pam = self.pam_out_conv(self.pam(self.pam_in_conv(x)))
        cam = self.cam_out_conv(self.cam(self.cam_in_conv(x)))
        return pam, cam

    def features(self, inputs: list[Tensor]) -> Tensor:
        pam, cam = self.branches(inputs)
        return pam + cam

    def forward(self, inputs: list[Tensor]) -> Tensor | dict[str, Tensor]:
        if not self.training:
            return super().forward(inputs)
        pam, cam = self.branches(inputs)
        # mmseg's order: each classifier behind its own dropout draw
        pam_logits = self.pam_conv_seg(self.dropout(pam))
        cam_logits = self.cam_conv_seg(self.dropout(cam))
        return {"out": self.classifier(self.dropout(pam + cam)), "pam": pam_logits,
                "cam": cam_logits}  # fmt: skip

    def loss_by_feat(
        self, outputs: Mapping[str, Tensor], target: Tensor, pixel_loss: SegCrossEntropy
    ) -> Tensor:
        """mmseg's ``DAHead.loss_by_feat``: the decode loss (its sampler included) on the sum's
        logits and on each branch's, ``loss_weight`` each (the model resized all three)."""
        return sum(
            self.loss_weight * self.loss_of(outputs[key], target, pixel_loss)
            for key in ("out", "pam", "cam")
        )
