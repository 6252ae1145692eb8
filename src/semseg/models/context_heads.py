"""The context heads of the BDD100K model zoo as mmsegmentation builds them, on the shared
:class:`~semseg.models.decoders.DecodeHead`: NLNet, GCNet and DNLNet (a context block between
FCNHead's two convs: mmcv's ``NonLocal2d`` and ``ContextBlock``, mmseg's
``DisentangledNonLocal2d``), EMANet (expectation-maximisation attention with moving bases), DMNet
(dynamic convolutions) and APCNet (adaptive context modules).

Every layer is mmseg's (and mmcv's), in mmseg's order, under mmseg's module names, so that an
mmseg checkpoint converts by renaming (:mod:`semseg.models.mmseg_conversion`): a ConvModule is a
torchvision ``Conv2dNormActivation`` (``.0`` conv, ``.1`` norm), plain ``nn.Conv2d`` layers keep
their names. Plain PyTorch: CPU and CUDA, autocast, channels_last, ONNX export.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from semseg.distributed import all_reduce_mean
from semseg.errors import ConfigError
from semseg.models.decoders import (
    DecodeHead,
    FCNHead,
    NormLayer,
    adaptive_avg_pool,
    conv_norm_act,
)


def conv_module(
    in_channels: int, out_channels: int, norm_layer: NormLayer | None = None
) -> Conv2dNormActivation:
    """mmcv's 1x1 ConvModule without activation: conv (+ bias without a norm), norm if given."""
    return Conv2dNormActivation(
        in_channels, out_channels, 1, norm_layer=norm_layer, activation_layer=None
    )


def pool(x: Tensor, size: int) -> Tensor:
    """``F.adaptive_avg_pool2d``; in an ONNX export :func:`adaptive_avg_pool` (bins that follow
    the input's size, not the example's)."""
    return (
        adaptive_avg_pool(x, size)
        if torch.onnx.is_in_onnx_export()
        else F.adaptive_avg_pool2d(x, size)
    )


# --------------------------------------------------------------------------------------------
# Context blocks (mmcv.cnn.bricks NonLocal2d, ContextBlock; mmseg's DisentangledNonLocal2d)


class NonLocal2d(nn.Module):
    """mmcv's ``NonLocal2d`` in its embedded-Gaussian mode (Wang et al., CVPR 2018): 1x1 ``g``,
    ``theta``, ``phi`` (with bias), softmax attention over all positions (scaled by
    1/sqrt(inter_channels) with ``use_scale``), ``conv_out`` (1x1 conv + norm), residual.
    Starts as the identity (``conv_out``'s norm zero), as mmcv."""

    def __init__(
        self,
        in_channels: int,
        reduction: int = 2,
        use_scale: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = max(in_channels // int(reduction), 1)
        self.use_scale = bool(use_scale)
        self.g = conv_module(in_channels, self.inter_channels)
        self.conv_out = conv_module(self.inter_channels, in_channels, norm_layer)
        self.theta = conv_module(in_channels, self.inter_channels)
        self.phi = conv_module(in_channels, self.inter_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's init: ``g``/``theta``/``phi`` N(0, 0.01) (zero bias), ``conv_out``'s norm zero."""
        for m in (self.g, self.theta, self.phi):
            nn.init.normal_(m[0].weight, std=0.01)
            nn.init.zeros_(m[0].bias)
        nn.init.zeros_(self.conv_out[1].weight)
        nn.init.zeros_(self.conv_out[1].bias)

    def attention(self, theta_x: Tensor, phi_x: Tensor) -> Tensor:
        """N x HW x HW softmax weights from N x HW x C' queries and N x C' x HW keys."""
        pairwise = torch.matmul(theta_x, phi_x)
        if self.use_scale:
            pairwise = pairwise / theta_x.shape[-1] ** 0.5
        return pairwise.softmax(dim=-1)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``g`` (N x HW x C'), ``theta`` (N x HW x C') and ``phi`` (N x C' x HW) of ``x``."""
        g_x = self.g(x).flatten(2).transpose(1, 2)
        theta_x = self.theta(x).flatten(2).transpose(1, 2)
        return g_x, theta_x, self.phi(x).flatten(2)

    def forward(self, x: Tensor) -> Tensor:
        g_x, theta_x, phi_x = self.embed(x)
        y = torch.matmul(self.attention(theta_x, phi_x), g_x)
        return x + self.conv_out(y.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:]))


class DisentangledNonLocal2d(NonLocal2d):
    """mmseg's ``DisentangledNonLocal2d`` (DNLNet, Yin et al., ECCV 2020): the pairwise term on
    whitened (mean-subtracted) queries and keys, sharpened by ``temperature``, plus a unary term
    (a softmax mask over positions from ``conv_mask``, 1x1 with bias) pooling ``g``; both through
    ``conv_out``, residual."""

    def __init__(self, in_channels: int, temperature: float = 0.05, **kwargs: Any) -> None:
        """``kwargs``: :class:`NonLocal2d`'s."""
        super().__init__(in_channels, **kwargs)
        self.temperature = float(temperature)
        self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "conv_mask"):  # PyTorch's default init, as mmseg leaves it
            self.conv_mask.reset_parameters()

    def attention(self, theta_x: Tensor, phi_x: Tensor) -> Tensor:
        pairwise = torch.matmul(theta_x, phi_x)
        if self.use_scale:
            pairwise = pairwise / theta_x.shape[-1] ** 0.5
        return (pairwise / self.temperature).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        g_x, theta_x, phi_x = self.embed(x)
        theta_x = theta_x - theta_x.mean(dim=-2, keepdim=True)  # whitening
        phi_x = phi_x - phi_x.mean(dim=-1, keepdim=True)
        y = torch.matmul(self.attention(theta_x, phi_x), g_x)
        y = y.transpose(1, 2).reshape(n, -1, *x.shape[2:])
        unary_mask = self.conv_mask(x).reshape(n, 1, -1).softmax(dim=-1)
        unary_x = torch.matmul(unary_mask, g_x).transpose(1, 2).reshape(n, -1, 1, 1)
        return x + self.conv_out(y + unary_x)


class ContextBlock(nn.Module):
    """mmcv's ``ContextBlock`` (GCNet, Cao et al., 2019): global context by attention pooling
    (``conv_mask`` + softmax over positions; ``pooling_type="avg"``: average pooling), transformed
    by 1x1 conv, LayerNorm, ReLU, 1x1 conv, added to (``channel_add``) and/or multiplying through a
    sigmoid (``channel_mul``) every position."""

    def __init__(
        self,
        in_channels: int,
        ratio: float = 0.25,
        pooling_type: str = "att",
        fusion_types: Sequence[str] = ("channel_add",),
    ) -> None:
        super().__init__()
        fusion_types = list(fusion_types)
        if pooling_type not in ("att", "avg"):
            raise ConfigError(f"pooling_type={pooling_type!r}: choose 'att' or 'avg'")
        if not fusion_types or not set(fusion_types) <= {"channel_add", "channel_mul"}:
            raise ConfigError(
                f"fusion_types={fusion_types}: choose one or both of channel_add, channel_mul"
            )
        self.pooling_type = pooling_type
        planes = int(in_channels * ratio)
        self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1) if pooling_type == "att" else None
        self.channel_add_conv = (
            self._transform(in_channels, planes) if "channel_add" in fusion_types else None
        )
        self.channel_mul_conv = (
            self._transform(in_channels, planes) if "channel_mul" in fusion_types else None
        )
        self.reset_parameters()

    @staticmethod
    def _transform(in_channels: int, planes: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, planes, kernel_size=1),
            nn.LayerNorm([planes, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, in_channels, kernel_size=1),
        )

    def reset_parameters(self) -> None:
        """mmcv's init: ``conv_mask`` Kaiming (fan-in), each transform's last conv zero (the block
        starts as the identity), the rest PyTorch's defaults."""
        if self.conv_mask is not None:
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for transform in (self.channel_add_conv, self.channel_mul_conv):
            if transform is not None:
                transform[0].reset_parameters()
                transform[1].reset_parameters()
                nn.init.zeros_(transform[3].weight)
                nn.init.zeros_(transform[3].bias)

    def spatial_pool(self, x: Tensor) -> Tensor:
        """N x C x 1 x 1 context of ``x``."""
        if self.conv_mask is None:
            return pool(x, 1)
        n, c = x.shape[:2]
        mask = self.conv_mask(x).reshape(n, 1, -1).softmax(dim=2).unsqueeze(-1)
        return torch.matmul(x.reshape(n, 1, c, -1), mask).reshape(n, c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        context = self.spatial_pool(x)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out


# --------------------------------------------------------------------------------------------
# FCNHead with a context block: NLHead, GCHead, DNLHead


class _FCNWithBlockHead(FCNHead):
    """mmseg's FCNHead with two convs and a context block between them (under ``block_name``),
    then the concatenation with the input and the fusing conv. The block keeps mmcv's own init."""

    block_name: str

    def __init__(self, in_channels: Sequence[int], num_classes: int, **kwargs: Any) -> None:
        """``kwargs``: :class:`FCNHead`'s but ``num_convs`` (2)."""
        if kwargs.pop("num_convs", 2) != 2:
            raise ConfigError("this head has exactly two convs (num_convs=2)")
        super().__init__(in_channels, num_classes, num_convs=2, **kwargs)

    def init_weights(self) -> None:
        super().init_weights()
        block = getattr(self, self.block_name, None)  # None while FCNHead builds its layers
        if block is not None:
            block.reset_parameters()

    def features(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[self.in_index]
        out = self.convs[1](getattr(self, self.block_name)(self.convs[0](x)))
        return self.conv_cat(torch.cat([x, out], 1)) if self.conv_cat is not None else out


class NLHead(_FCNWithBlockHead):
    """NLNet (Wang et al., CVPR 2018) as mmseg's ``NLHead``: FCNHead with a :class:`NonLocal2d`
    (``nl_block``) between its two 3x3 convs."""

    block_name = "nl_block"

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        reduction: int = 2,
        use_scale: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`FCNHead`'s."""
        super().__init__(
            in_channels, num_classes, channels=channels, norm_layer=norm_layer, **kwargs
        )
        self.nl_block = NonLocal2d(channels, reduction, use_scale, norm_layer)
        self.init_weights()


class DNLHead(_FCNWithBlockHead):
    """DNLNet (Yin et al., ECCV 2020) as mmseg's ``DNLHead``: FCNHead with a
    :class:`DisentangledNonLocal2d` (``dnl_block``, temperature 0.05) between its two convs."""

    block_name = "dnl_block"

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        reduction: int = 2,
        use_scale: bool = True,
        temperature: float = 0.05,
        norm_layer: NormLayer = nn.BatchNorm2d,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`FCNHead`'s."""
        super().__init__(
            in_channels, num_classes, channels=channels, norm_layer=norm_layer, **kwargs
        )
        self.dnl_block = DisentangledNonLocal2d(
            channels,
            temperature=temperature,
            reduction=reduction,
            use_scale=use_scale,
            norm_layer=norm_layer,
        )
        self.init_weights()


class GCHead(_FCNWithBlockHead):
    """GCNet (Cao et al., 2019) as mmseg's ``GCHead``: FCNHead with a :class:`ContextBlock`
    (``gc_block``, ratio 1/4, attention pooling, channel add) between its two convs."""

    block_name = "gc_block"

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        ratio: float = 0.25,
        pooling_type: str = "att",
        fusion_types: Sequence[str] = ("channel_add",),
        **kwargs: Any,
    ) -> None:
        """``kwargs``: :class:`FCNHead`'s."""
        super().__init__(in_channels, num_classes, channels=channels, **kwargs)
        self.gc_block = ContextBlock(channels, ratio, pooling_type, fusion_types)
        self.init_weights()


# --------------------------------------------------------------------------------------------
# EMANet


class EMAModule(nn.Module):
    """mmseg's ``EMAModule`` (EMANet, Li et al., ICCV 2019): ``num_stages`` expectation-maximisation
    steps (no gradient) from the ``bases`` buffer (1 x C x K, l2-normalised per base), features
    reconstructed from the last attention. In training the bases move towards the batch's (mean
    over images, averaged over the ranks under DDP, l2-normalised) with ``momentum``."""

    def __init__(self, channels: int, num_bases: int, num_stages: int, momentum: float) -> None:
        super().__init__()
        if num_stages < 1:
            raise ConfigError(f"num_stages={num_stages}: EMAModule needs at least 1")
        self.num_stages = int(num_stages)
        self.momentum = float(momentum)
        bases = torch.randn(1, channels, num_bases) * math.sqrt(2.0 / num_bases)
        self.register_buffer("bases", F.normalize(bases, dim=1, p=2))

    def forward(self, feats: Tensor) -> Tensor:
        n, c, h, w = feats.shape
        feats = feats.reshape(n, c, h * w)
        bases = self.bases.repeat(n, 1, 1)
        with torch.no_grad():
            for _ in range(self.num_stages):
                attention = torch.einsum("bcn,bck->bnk", feats, bases).softmax(dim=2)
                attention_normed = F.normalize(attention, dim=1, p=1)
                bases = F.normalize(torch.einsum("bcn,bnk->bck", feats, attention_normed), dim=1)
        recon = torch.einsum("bck,bnk->bcn", bases, attention).reshape(n, c, h, w)
        if self.training:
            with torch.no_grad():
                batch = all_reduce_mean(bases.float().mean(dim=0, keepdim=True))
                batch = F.normalize(batch, dim=1, p=2).to(self.bases.dtype)
                self.bases.mul_(1 - self.momentum).add_(batch, alpha=self.momentum)
        return recon


class EMAHead(DecodeHead):
    """EMANet as mmseg's ``EMAHead``: a 3x3 ConvModule to ``ema_channels``, a frozen 1x1 conv,
    the :class:`EMAModule`, ReLU, a 1x1 conv + norm, the residual sum and ReLU, a 3x3 ConvModule
    to ``channels``; with ``concat_input`` concatenated with the input and fused by one more."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        ema_channels: int = 512,
        num_bases: int = 64,
        num_stages: int = 3,
        momentum: float = 0.1,
        concat_input: bool = True,
        in_index: int = 3,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = in_index
        c_in = in_channels[in_index]
        self.ema_module = EMAModule(ema_channels, num_bases, num_stages, momentum)
        self.ema_in_conv = conv_norm_act(c_in, ema_channels, 3, norm_layer)
        # projects (0, inf) -> (-inf, inf); frozen, as mmseg's
        self.ema_mid_conv = conv_module(ema_channels, ema_channels)
        self.ema_out_conv = conv_module(ema_channels, ema_channels, norm_layer)
        self.bottleneck = conv_norm_act(ema_channels, channels, 3, norm_layer)
        self.conv_cat = (
            conv_norm_act(c_in + channels, channels, 3, norm_layer) if concat_input else None
        )
        self.init_weights()
        self.ema_mid_conv.requires_grad_(False)

    def features(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[self.in_index]
        feats = self.ema_in_conv(x)
        recon = F.relu(self.ema_module(self.ema_mid_conv(feats)))
        out = self.bottleneck(F.relu(feats + self.ema_out_conv(recon)))
        return self.conv_cat(torch.cat([x, out], 1)) if self.conv_cat is not None else out


# --------------------------------------------------------------------------------------------
# DMNet and APCNet: context branches on the last map, concatenated with it


class _BranchesHead(DecodeHead):
    """Feature map ``in_index`` concatenated with one branch per setting (a ModuleList under
    ``branches_name``, built by ``branch(setting, in_channels, channels, norm_layer)``), fused by
    a 3x3 ConvModule (mmseg's DMHead and APCHead)."""

    branches_name: str

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        branch: Callable[[int, int, int, NormLayer], nn.Module],
        settings: Sequence[int],
        channels: int,
        in_index: int,
        dropout: float,
        norm_layer: NormLayer,
        align_corners: bool,
    ) -> None:
        super().__init__(channels, num_classes, dropout, align_corners)
        self.in_index = in_index
        c_in = in_channels[in_index]
        branches = nn.ModuleList(branch(int(s), c_in, channels, norm_layer) for s in settings)
        self.add_module(self.branches_name, branches)
        self.bottleneck = conv_norm_act(c_in + len(settings) * channels, channels, 3, norm_layer)
        self.init_weights()
        for m in branches:
            m.reset_parameters()

    def features(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[self.in_index]
        branches = getattr(self, self.branches_name)
        return self.bottleneck(torch.cat([x, *(m(x) for m in branches)], 1))


class DynamicConvModule(nn.Module):
    """mmseg's ``DCM`` (DMNet, He et al., ICCV 2019): a ``filter_size`` x ``filter_size``
    depthwise filter per image and channel, generated from the input pooled to that size
    (``filter_gen_conv``), applied to the input reduced by a 1x1 ConvModule; norm, ReLU, and with
    ``fusion`` one more 1x1 ConvModule."""

    def __init__(
        self,
        filter_size: int,
        in_channels: int,
        channels: int,
        norm_layer: NormLayer,
        fusion: bool = False,
    ) -> None:
        super().__init__()
        self.filter_size = int(filter_size)
        self.filter_gen_conv = nn.Conv2d(in_channels, channels, 1)
        self.input_redu_conv = conv_norm_act(in_channels, channels, 1, norm_layer)
        self.norm = norm_layer(channels)
        self.activate = nn.ReLU(inplace=True)
        self.fusion_conv = conv_norm_act(channels, channels, 1, norm_layer) if fusion else None
        pad = (self.filter_size - 1) // 2
        odd = (self.filter_size - 1) % 2 == 0
        self.padding = (pad, pad, pad, pad) if odd else (pad + 1, pad, pad + 1, pad)

    def reset_parameters(self) -> None:
        """``filter_gen_conv``: PyTorch's default init, as mmseg leaves it."""
        self.filter_gen_conv.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        filters = self.filter_gen_conv(pool(x, self.filter_size))
        x = F.pad(self.input_redu_conv(x), self.padding)
        if torch.onnx.is_in_onnx_export():
            out = self._shifted_sum(x, filters)
        else:  # one grouped convolution over the batch: a filter per image and channel
            n, c, h, w = x.shape
            k = self.filter_size
            weight = filters.reshape(n * c, 1, k, k)
            out = F.conv2d(x.reshape(1, n * c, h, w), weight, groups=n * c)
            out = out.reshape(n, c, h - k + 1, w - k + 1)
        out = self.activate(self.norm(out))
        return self.fusion_conv(out) if self.fusion_conv is not None else out

    def _shifted_sum(self, x: Tensor, filters: Tensor) -> Tensor:
        """The grouped convolution as a sum of shifted maps (the batch stays dynamic in ONNX)."""
        k = self.filter_size
        h, w = x.shape[2] - k + 1, x.shape[3] - k + 1
        out = 0
        for i in range(k):
            for j in range(k):
                out = out + x[:, :, i : i + h, j : j + w] * filters[:, :, i : i + 1, j : j + 1]
        return out


class DMHead(_BranchesHead):
    """DMNet as mmseg's ``DMHead``: one :class:`DynamicConvModule` per filter size (1, 3, 5, 7)
    on feature map ``in_index``, concatenated with it, then a 3x3 ConvModule."""

    branches_name = "dcm_modules"

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        filter_sizes: Sequence[int] = (1, 3, 5, 7),
        fusion: bool = False,
        in_index: int = 3,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        branch = partial(DynamicConvModule, fusion=bool(fusion))
        super().__init__(in_channels, num_classes, branch, filter_sizes, channels, in_index,
                         dropout, norm_layer, align_corners)  # fmt: skip


class AdaptiveContextModule(nn.Module):
    """mmseg's ``ACM`` (APCNet, He et al., CVPR 2019): the input pooled to ``pool_scale`` x
    ``pool_scale`` regions (reduced by a 1x1 ConvModule), mixed into every position by a sigmoid
    affinity (``gla``, 1x1 conv with bias) of the reduced input plus its global context
    (``global_info``); a 1x1 ConvModule, the residual sum, ReLU, and with ``fusion`` one more."""

    def __init__(
        self,
        pool_scale: int,
        in_channels: int,
        channels: int,
        norm_layer: NormLayer,
        fusion: bool = True,
    ) -> None:
        super().__init__()
        self.pool_scale = int(pool_scale)
        self.pooled_redu_conv = conv_norm_act(in_channels, channels, 1, norm_layer)
        self.input_redu_conv = conv_norm_act(in_channels, channels, 1, norm_layer)
        self.global_info = conv_norm_act(channels, channels, 1, norm_layer)
        self.gla = nn.Conv2d(channels, self.pool_scale**2, 1)
        self.residual_conv = conv_norm_act(channels, channels, 1, norm_layer)
        self.fusion_conv = conv_norm_act(channels, channels, 1, norm_layer) if fusion else None

    def reset_parameters(self) -> None:
        """``gla``: PyTorch's default init, as mmseg leaves it."""
        self.gla.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pooled_redu_conv(pool(x, self.pool_scale))
        x = self.input_redu_conv(x)
        n, c, h, w = x.shape
        pooled = pooled.reshape(n, c, -1).transpose(1, 2)  # N x S^2 x C
        # mmseg resizes the 1x1 global context to the map (nearest): a broadcast
        context = self.global_info(pool(x, 1))
        affinity = self.gla(x + context).permute(0, 2, 3, 1).reshape(n, -1, self.pool_scale**2)
        z = torch.matmul(torch.sigmoid(affinity), pooled).transpose(1, 2).reshape(n, c, h, w)
        z = F.relu(self.residual_conv(z) + x)
        return self.fusion_conv(z) if self.fusion_conv is not None else z


class APCHead(_BranchesHead):
    """APCNet as mmseg's ``APCHead``: one :class:`AdaptiveContextModule` per pool scale (1, 2,
    3, 6; with fusion) on feature map ``in_index``, concatenated with it, then a 3x3 ConvModule."""

    branches_name = "acm_modules"

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        fusion: bool = True,
        in_index: int = 3,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        align_corners: bool = False,
    ) -> None:
        branch = partial(AdaptiveContextModule, fusion=bool(fusion))
        super().__init__(in_channels, num_classes, branch, pool_scales, channels, in_index,
                         dropout, norm_layer, align_corners)  # fmt: skip
