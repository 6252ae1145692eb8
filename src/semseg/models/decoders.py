"""The classic decoders of the BDD100K model zoo as mmsegmentation builds them: FCN, PSPNet,
DeepLabV3, DeepLabV3+ and UPerNet heads on a backbone's four feature maps, with mmseg's optional
FCN auxiliary head (training only) and optional neck (:mod:`semseg.models.necks`; Semantic FPN and
PointRend: :mod:`semseg.models.semantic_fpn`, :mod:`semseg.models.pointrend`).

Read top-down: :class:`EncoderDecoder` (the whole model) and its factory :func:`encoder_decoder`
(the ``_target_`` of every ``conf/model/*.yaml``), then the heads. Every layer is mmseg's, in
mmseg's order, under mmseg's module names (``convs``, ``psp_modules``, ``aspp_modules``,
``bottleneck``, ...), so that an mmseg checkpoint converts by renaming
(:mod:`semseg.models.mmseg_conversion`): mmcv's ConvModule (conv without bias, norm, ReLU) is
:class:`ConvModule` here (``.0`` conv, ``.1`` norm), ``conv_seg`` is ``classifier``.
"""

from __future__ import annotations

import abc
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import ConvNormActivation

from semseg.errors import ConfigError
from semseg.losses import SegCrossEntropy
from semseg.models.base import AUX_HEAD, IMAGENET_MEAN, IMAGENET_STD, SegmentationModel
from semseg.models.build import load_start_weights
from semseg.models.ops import ModulatedDeformConv2dPack

NormLayer = Callable[[int], nn.Module]
# A conv class or partial with nn.Conv2d's signature (mmcv's ``conv_cfg``): nn.Conv2d, or DCNv2.
ConvLayer = Callable[..., nn.Module]
# A head config (``_partial_: true``) called with the backbone's channels and the model's settings.
HeadFactory = Callable[..., "DecodeHead"]
# A neck config (``_partial_: true``) called with the backbone's channels (semseg.models.necks).
NeckFactory = Callable[[list[int]], nn.Module]
# The key of the auxiliary head's logits in a training forward's outputs.
AUX_OUTPUT = "aux"


class EncoderDecoder(SegmentationModel):
    """Backbone -> neck (optional) -> decode head -> logits resized to the input (mmseg's
    ``EncoderDecoder``).

    Takes RGB images 0..255 and normalises them inside. In eval mode, or without an auxiliary
    head, returns logits ``N x C x H x W`` at the input size; in training mode with an auxiliary
    head, ``{"out": logits, "aux": aux_logits}`` (both at the input size); a decode head with
    more training outputs (PointRend's points) adds them. :meth:`loss` turns these outputs into
    the training loss, each head its own part.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: DecodeHead,
        aux_head: DecodeHead | None = None,
        align_corners: bool = False,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        neck: nn.Module | None = None,
    ) -> None:
        super().__init__(pixel_mean, pixel_std)
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.aux_head = aux_head  # AUX_HEAD: left out of inference models and their counts
        self.align_corners = bool(align_corners)
        self.num_classes = decode_head.num_classes

    def forward(self, images: Tensor) -> Tensor | dict[str, Tensor]:
        """Logits at the input size (plus the auxiliary head's in training, see the class)."""
        features = self.backbone(self.normalize(images))
        if self.neck is not None:
            features = self.neck(features)
        head = self.decode_head(features)
        # A head in training may return a dict: its logits "out" and what its loss needs (PointRend's
        # points, DANet's branch logits). Its logit maps (N x C x h x w) go to the input size.
        outputs = dict(head) if isinstance(head, dict) else {"out": head}
        outputs = {
            key: self._to_input_size(value, images) if value.dim() == 4 else value
            for key, value in outputs.items()
        }
        if self.training and self.aux_head is not None:
            outputs[AUX_OUTPUT] = self._to_input_size(self.aux_head(features), images)
        return outputs if len(outputs) > 1 else outputs["out"]

    def loss(
        self, outputs: Tensor | Mapping[str, Tensor], target: Tensor, pixel_loss: SegCrossEntropy
    ) -> Tensor:
        """The training loss of :meth:`forward`'s ``outputs`` on the labels ``target``: the decode
        head's loss plus the auxiliary head's, each computed by the head from its own outputs
        (:meth:`DecodeHead.loss_by_feat`) with the loss group's ``pixel_loss``. No parameters
        are used: called outside ``forward``, on a DDP-wrapped model's outputs, it leaves the
        gradient synchronisation to the forward."""
        outputs = dict(outputs) if isinstance(outputs, Mapping) else {"out": outputs}
        aux = outputs.pop(AUX_OUTPUT, None)
        loss = self.decode_head.loss_by_feat(outputs, target, pixel_loss)
        if aux is not None:
            loss = loss + self.aux_head.loss_by_feat({"out": aux}, target, pixel_loss)
        return loss

    def _to_input_size(self, logits: Tensor, images: Tensor) -> Tensor:
        # NCHW logits: the full-size log_softmax of the loss is ~1.5x faster than on channels_last.
        return resize(logits.contiguous(), images.shape[-2:], self.align_corners)


def encoder_decoder(
    backbone: nn.Module,
    num_classes: int,
    decode_head: HeadFactory,
    aux_head: HeadFactory | None = None,
    norm_layer: NormLayer = nn.BatchNorm2d,
    align_corners: bool = False,
    weights: str | os.PathLike | None = None,
    neck: NeckFactory | None = None,
    **kwargs: Any,
) -> EncoderDecoder:
    """An :class:`EncoderDecoder` whose heads are built for ``backbone``'s feature maps, or for
    the ``neck``'s outputs when there is one.

    ``neck``: a neck class or partial (its config), called with the backbone's channels (see
    :mod:`semseg.models.necks`); None: the heads read the backbone's maps.
    ``decode_head``/``aux_head``: head classes or partials (their configs), called with the
    channels they read, ``num_classes``, ``norm_layer`` and ``align_corners``; ``aux_head=None``
    trains without the auxiliary head. ``weights``: a checkpoint of this project to start from
    (``model.weights=PATH``). ``kwargs``: :class:`EncoderDecoder`'s (pixel statistics).
    """
    in_channels = [int(c) for c in backbone.out_channels]
    neck_module = neck(in_channels) if neck is not None else None
    if neck_module is not None:
        in_channels = [int(c) for c in neck_module.out_channels]
    shared = {
        "num_classes": int(num_classes),
        "norm_layer": norm_layer,
        "align_corners": align_corners,
    }

    def build(head: HeadFactory, key: str) -> DecodeHead:
        try:
            return head(in_channels, **shared)
        except IndexError:  # an in_index beyond the backbone's maps
            raise ConfigError(
                f"model.{key} reads a feature map the backbone does not have: it returns "
                f"{len(in_channels)} (indices 0-{len(in_channels) - 1}); set model.{key}.in_index"
            ) from None
        except ConfigError as e:
            raise ConfigError(f"model.{key}: {e}") from None

    head = build(decode_head, "decode_head")
    if neck_module is not None:  # mmseg's order: the neck's initialisation, then the head's
        neck_module.init_weights()
        head.init_weights()
    model = EncoderDecoder(
        backbone,
        head,
        build(aux_head, AUX_HEAD) if aux_head is not None else None,
        align_corners=align_corners,
        neck=neck_module,
        **kwargs,
    )
    if weights is not None:
        load_start_weights(model, weights)
    return model


# --------------------------------------------------------------------------------------------
# Building blocks


def resize(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """Bilinear resize to ``size`` (h, w), as mmseg's ``resize``."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class ConvModule(ConvNormActivation):
    """mmcv's ``ConvModule``: a conv of any class with ``nn.Conv2d``'s signature (mmcv's
    ``conv_cfg``), then norm and ReLU; torchvision's ``Conv2dNormActivation`` fixes the conv to
    ``nn.Conv2d``. Same layout (``.0`` conv, ``.1`` norm)."""


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm_layer: NormLayer,
    dilation: int = 1,
    groups: int = 1,
    conv_layer: ConvLayer = nn.Conv2d,
) -> ConvModule:
    """mmcv's ConvModule: conv (no bias before a norm), norm, ReLU; padding keeps the size.
    ``conv_layer``: the conv's class, e.g. DCNv2."""
    return ConvModule(
        in_channels,
        out_channels,
        kernel_size,
        groups=groups,
        norm_layer=norm_layer,
        activation_layer=nn.ReLU,
        dilation=dilation,
        conv_layer=conv_layer,
    )


def separable_conv_norm_act(
    in_channels: int, out_channels: int, norm_layer: NormLayer, dilation: int = 1
) -> nn.Sequential:
    """mmcv's DepthwiseSeparableConvModule: a 3x3 depthwise ConvModule, then a 1x1 one (each with
    its norm and ReLU)."""
    return nn.Sequential(
        OrderedDict(
            depthwise_conv=conv_norm_act(
                in_channels, in_channels, 3, norm_layer, dilation=dilation, groups=in_channels
            ),
            pointwise_conv=conv_norm_act(in_channels, out_channels, 1, norm_layer),
        )
    )


def adaptive_avg_pool(x: Tensor, size: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` from cumulative sums, for ONNX export: the exporter
    turns ``adaptive_avg_pool2d`` into fixed windows for the example input's size, which are wrong
    at other sizes; these bins follow the input's (dynamic) size."""
    return _adaptive_avg_pool_axis(_adaptive_avg_pool_axis(x, -2, size), -1, size)


def _adaptive_avg_pool_axis(x: Tensor, dim: int, size: int) -> Tensor:
    # Bin i covers [floor(i n / size), ceil((i + 1) n / size)), as adaptive pooling's.
    n = x.shape[dim]
    i = torch.arange(size, device=x.device)
    start, end = (i * n) // size, ((i + 1) * n + size - 1) // size
    sums = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim)
    totals = sums.index_select(dim, end) - sums.index_select(dim, start)
    shape = [1] * x.dim()
    shape[dim] = size
    return totals / (end - start).to(x.dtype).view(shape)


class PyramidPooling(nn.ModuleList):
    """PSPNet's pyramid pooling module (mmseg ``PPM``): for each scale, average pooling to
    ``scale x scale`` and a 1x1 ConvModule; returns the input concatenated with the branches
    upsampled to its size. (In an ONNX export the pooling is :func:`adaptive_avg_pool`.)"""

    def __init__(
        self,
        pool_scales: Sequence[int],
        in_channels: int,
        channels: int,
        norm_layer: NormLayer,
        align_corners: bool,
    ) -> None:
        super().__init__(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(int(scale)),
                conv_norm_act(in_channels, channels, 1, norm_layer),
            )
            for scale in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> Tensor:
        outs = [x]
        for pool, conv in self:
            exporting = torch.onnx.is_in_onnx_export()
            pooled = adaptive_avg_pool(x, pool.output_size) if exporting else pool(x)
            outs.append(resize(conv(pooled), x.shape[-2:], self.align_corners))
        return torch.cat(outs, 1)


# --------------------------------------------------------------------------------------------
# Heads


class DecodeHead(nn.Module, abc.ABC):
    """mmseg's ``BaseDecodeHead``: a head's own layers (:meth:`features`), then Dropout2d and a
    1x1 classifier; returns logits at the resolution of the feature map it reads.

    Its loss (:meth:`loss_by_feat`) is ``loss_weight`` times the loss group's pixel loss on its
    logits, with the group's pixel sampler (OHEM) when ``sample_pixels``, as mmseg's
    ``loss_decode`` and ``sampler``: the decode head 1 with the sampler, the auxiliary head 0.4
    without (conf/model/aux_head). Initialised as mmseg: Kaiming-normal (fan-out) convs, the
    classifier N(0, 0.01).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        dropout: float,
        align_corners: bool,
        loss_weight: float = 1.0,
        sample_pixels: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.align_corners = align_corners
        self.loss_weight, self.sample_pixels = float(loss_weight), bool(sample_pixels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    @abc.abstractmethod
    def features(self, inputs: list[Tensor]) -> Tensor:
        """The ``channels``-wide map the classifier reads."""

    def forward(self, inputs: list[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.features(inputs)))

    def loss_by_feat(
        self, outputs: Mapping[str, Tensor], target: Tensor, pixel_loss: SegCrossEntropy
    ) -> Tensor:
        """This head's loss on its training outputs (mmseg's ``loss_by_feat``): ``"out"``, its
        logits resized to the labels ``target`` by the model. A head with more outputs (a
        cascade's points, DANet's three predictions) overrides this."""
        return self.loss_weight * self.loss_of(outputs["out"], target, pixel_loss)

    def loss_of(self, logits: Tensor, target: Tensor, pixel_loss: SegCrossEntropy) -> Tensor:
        """The loss group's ``pixel_loss`` of ``logits``, with its sampler when this head
        samples pixels, else its plain cross-entropy (unweighted by ``loss_weight``)."""
        if self.sample_pixels:
            return pixel_loss(logits, target)
        return pixel_loss.cross_entropy(logits, target)

    def transform_inputs(self, inputs: list[Tensor], in_index: int | Sequence[int]) -> Tensor:
        """mmseg's ``_transform_inputs``: map ``in_index``, or with several indices
        (``input_transform='resize_concat'``) those maps resized to the first's size and
        concatenated."""
        if isinstance(in_index, int):
            return inputs[in_index]
        maps = [inputs[i] for i in in_index]
        size = maps[0].shape[2:]
        return torch.cat([maps[0], *(resize(x, size, self.align_corners) for x in maps[1:])], 1)

    def init_weights(self) -> None:
        deformable = []
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, ModulatedDeformConv2dPack):
                # mmcv's ConvModule leaves a conv with its own init_weights to it: DCNv2's
                # offsets and mask logits start at zero (its conv_offset is reset after the loop).
                deformable.append(m)
        for m in deformable:
            m.reset_parameters()
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)


class FCNHead(DecodeHead):
    """FCN (Long et al., CVPR 2015) as mmseg's ``FCNHead``: ``num_convs`` ConvModules on feature
    map ``in_index``; with ``concat_input``, their output concatenated with the input and fused by
    one more. mmseg's auxiliary head is this with one conv, no concatenation, on stage 3.
    Several ``in_index`` (HRNet's ``fcn_hr``): those maps resized and concatenated
    (:meth:`~DecodeHead.transform_inputs`); ``channels=None``: the input's width."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int | None = 512,
        num_convs: int = 2,
        kernel_size: int = 3,
        concat_input: bool = True,
        dilation: int = 1,
        in_index: int | Sequence[int] = 3,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
        loss_weight: float = 1.0,
        sample_pixels: bool = True,
    ) -> None:
        """``loss_weight``, ``sample_pixels``: :class:`DecodeHead`'s (an auxiliary head's: 0.4,
        false)."""
        if isinstance(in_index, int):
            c_in = in_channels[in_index]
        else:
            in_index = [int(i) for i in in_index]
            c_in = sum(in_channels[i] for i in in_index)
        channels = c_in if channels is None else channels
        super().__init__(channels, num_classes, dropout, align_corners, loss_weight, sample_pixels)
        self.in_index = in_index
        if num_convs == 0 and c_in != channels:
            raise ConfigError(f"an FCNHead with num_convs=0 needs channels={c_in} (its input's)")
        self.convs = nn.Sequential(
            *(
                conv_norm_act(
                    c_in if i == 0 else channels, channels, kernel_size, norm_layer, dilation
                )
                for i in range(num_convs)
            )
        )
        self.conv_cat = (
            conv_norm_act(c_in + channels, channels, kernel_size, norm_layer)
            if concat_input
            else None
        )
        self.init_weights()

    def features(self, inputs: list[Tensor]) -> Tensor:
        x = self.transform_inputs(inputs, self.in_index)
        out = self.convs(x)
        return self.conv_cat(torch.cat([x, out], 1)) if self.conv_cat is not None else out


class PSPHead(DecodeHead):
    """PSPNet (Zhao et al., CVPR 2017) as mmseg's ``PSPHead``: pyramid pooling (scales 1, 2, 3, 6)
    on feature map ``in_index``, concatenated with it, then a 3x3 ConvModule."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        in_index: int = 3,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = in_index
        c_in = in_channels[in_index]
        self.psp_modules = PyramidPooling(pool_scales, c_in, channels, norm_layer, align_corners)
        self.bottleneck = conv_norm_act(c_in + len(pool_scales) * channels, channels, 3, norm_layer)
        self.init_weights()

    def features(self, inputs: list[Tensor]) -> Tensor:
        return self.bottleneck(self.psp_modules(inputs[self.in_index]))


class ASPPHead(DecodeHead):
    """DeepLabV3 (Chen et al., 2017) as mmseg's ``ASPPHead``: image pooling (global average, 1x1
    ConvModule, upsampled) and one ConvModule per dilation (1x1 for dilation 1, else 3x3) on
    feature map ``in_index``, concatenated, then a 3x3 ConvModule."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        dilations: Sequence[int] = (1, 12, 24, 36),
        in_index: int = 3,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = in_index
        c_in = in_channels[in_index]
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv_norm_act(c_in, channels, 1, norm_layer)
        )
        self.aspp_modules = nn.ModuleList(
            self._branch(c_in, channels, int(d), norm_layer) for d in dilations
        )
        self.bottleneck = conv_norm_act((len(dilations) + 1) * channels, channels, 3, norm_layer)
        self.init_weights()

    def _branch(
        self, in_channels: int, channels: int, dilation: int, norm_layer: NormLayer
    ) -> nn.Module:
        if dilation == 1:
            return conv_norm_act(in_channels, channels, 1, norm_layer)
        return conv_norm_act(in_channels, channels, 3, norm_layer, dilation=dilation)

    def aspp(self, x: Tensor) -> Tensor:
        """The bottleneck over image pooling and the dilated branches."""
        pooled = resize(self.image_pool(x), x.shape[-2:], self.align_corners)
        return self.bottleneck(torch.cat([pooled, *(m(x) for m in self.aspp_modules)], 1))

    def features(self, inputs: list[Tensor]) -> Tensor:
        return self.aspp(inputs[self.in_index])


class DepthwiseSeparableASPPHead(ASPPHead):
    """DeepLabV3+ (Chen et al., ECCV 2018) as mmseg's ``DepthwiseSeparableASPPHead``: ASPP with
    depthwise-separable dilated branches; its output upsampled to feature map ``c1_in_index``
    (stride 4), concatenated with that map reduced to ``c1_channels`` (48) by a 1x1 ConvModule,
    then two separable 3x3 ConvModules. ``c1_channels=0``: no stride-4 branch."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        c1_in_index: int = 0,
        c1_channels: int = 48,
        norm_layer: NormLayer = nn.BatchNorm2d,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`ASPPHead`'s."""
        super().__init__(in_channels, num_classes, norm_layer=norm_layer, **kwargs)
        channels = self.classifier.in_channels
        self.c1_in_index = c1_in_index
        self.c1_bottleneck = (
            conv_norm_act(in_channels[c1_in_index], c1_channels, 1, norm_layer)
            if c1_channels > 0
            else None
        )
        self.sep_bottleneck = nn.Sequential(
            separable_conv_norm_act(channels + c1_channels, channels, norm_layer),
            separable_conv_norm_act(channels, channels, norm_layer),
        )
        self.init_weights()  # again: the layers added here

    def _branch(
        self, in_channels: int, channels: int, dilation: int, norm_layer: NormLayer
    ) -> nn.Module:
        if dilation == 1:
            return conv_norm_act(in_channels, channels, 1, norm_layer)
        return separable_conv_norm_act(in_channels, channels, norm_layer, dilation=dilation)

    def features(self, inputs: list[Tensor]) -> Tensor:
        out = self.aspp(inputs[self.in_index])
        if self.c1_bottleneck is not None:
            c1 = self.c1_bottleneck(inputs[self.c1_in_index])
            out = torch.cat([resize(out, c1.shape[-2:], self.align_corners), c1], 1)
        return self.sep_bottleneck(out)


class UPerHead(DecodeHead):
    """UPerNet (Xiao et al., ECCV 2018) as mmseg's ``UPerHead``: pyramid pooling on the last map;
    an FPN of 1x1 lateral and 3x3 output ConvModules over the others, top-down with bilinear
    upsampling; all levels upsampled to the first, concatenated, fused by a 3x3 ConvModule."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        in_index: Sequence[int] = (0, 1, 2, 3),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = [int(i) for i in in_index]
        levels = [in_channels[i] for i in self.in_index]
        self.psp_modules = PyramidPooling(
            pool_scales, levels[-1], channels, norm_layer, align_corners
        )
        self.bottleneck = conv_norm_act(
            levels[-1] + len(pool_scales) * channels, channels, 3, norm_layer
        )
        self.lateral_convs = nn.ModuleList(
            conv_norm_act(c, channels, 1, norm_layer) for c in levels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            conv_norm_act(channels, channels, 3, norm_layer) for _ in levels[:-1]
        )
        self.fpn_bottleneck = conv_norm_act(len(levels) * channels, channels, 3, norm_layer)
        self.init_weights()

    def features(self, inputs: list[Tensor]) -> Tensor:
        inputs = [inputs[i] for i in self.in_index]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.bottleneck(self.psp_modules(inputs[-1])))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(
                laterals[i], laterals[i - 1].shape[-2:], self.align_corners
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0], *(resize(x, size, self.align_corners) for x in outs[1:])]
        return self.fpn_bottleneck(torch.cat(outs, 1))
