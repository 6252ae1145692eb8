"""mmcv's operators in plain PyTorch (no compiled extension): CCNet's and PSANet's context
operators, and the modulated deformable convolution of Semantic FPN's GN + DCN head.

- :class:`CrissCrossAttention`: mmcv 2.x's own implementation (``mmcv/ops/cc_attention.py``, plain
  PyTorch since mmcv 1.3.13), the same einsums, the same ``-inf`` on the diagonal of the vertical
  branch (a pixel is counted once, in the horizontal one) and the same zero-initialised ``gamma``.
- :func:`psa_mask`: mmcv's ``PSAMask`` (``mmcv/ops/csrc/pytorch/cpu/psamask.cpp``, from
  hszhao/semseg), collect and distribute, as one gather: every output value is one input value or
  zero, so autograd's backward of the gather is the kernel's backward. Any device and dtype.
- :class:`ModulatedDeformConv2dPack`: mmcv's DCNv2 (``mmcv/ops/modulated_deform_conv.py``), its
  parameters under mmcv's names, the sampling done by :func:`torchvision.ops.deform_conv2d`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

PSA_MODES = ("collect", "distribute")


class Scale(nn.Module):
    """mmcv's ``Scale``: multiplies by one learnable number (``scale``)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))  # a 0-d tensor, as mmcv's

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class CrissCrossAttention(nn.Module):
    """Criss-cross attention (Huang et al., ICCV 2019) as mmcv 2.x's ``CrissCrossAttention``: each
    pixel attends to the pixels of its row and column (one softmax over both), the result scaled
    by ``gamma`` (0 at initialisation) and added to the input."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        query, key, value = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        # mmcv adds a matrix with -inf on its diagonal (0 elsewhere): the same as filling it.
        diagonal = torch.eye(height, dtype=torch.bool, device=x.device)
        energy_h = torch.einsum("bchw,bciw->bwhi", query, key).masked_fill(diagonal, float("-inf"))
        energy_h = energy_h.transpose(1, 2)
        energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
        attention = F.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)  # B, H, W, H + W
        out = torch.einsum("bciw,bhwi->bchw", value, attention[..., :height])
        out = out + torch.einsum("bchj,bhwj->bchw", value, attention[..., height:])
        return (self.gamma(out) + x).contiguous()


def _collect_index(
    height: int, width: int, mask_size: Sequence[int], device: torch.device
) -> Tensor:
    """For collect's output ``[p, q]`` (``p``: the position it collects from, ``q``: the pixel),
    the index into the mask flattened as ``[m, q]`` (``m``: the offset's mask channel), or into
    an appended zero row where the offset lies outside the mask."""
    mask_h, mask_w = (int(s) for s in mask_size)
    y, x = torch.arange(height, device=device), torch.arange(width, device=device)
    # Mask row/column of source row y (or column x) for pixel row h (or column w): y - h + half.
    rows = y[:, None] - y[None, :] + (mask_h - 1) // 2  # [y, h]
    cols = x[:, None] - x[None, :] + (mask_w - 1) // 2  # [x, w]
    inside = ((rows >= 0) & (rows < mask_h))[:, None, :, None] & ((cols >= 0) & (cols < mask_w))[
        None, :, None, :
    ]
    channel = rows[:, None, :, None] * mask_w + cols[None, :, None, :]  # [y, x, h, w]
    channel = torch.where(inside, channel, mask_h * mask_w)  # the zero row
    pixels = height * width
    return (channel.reshape(pixels, pixels) * pixels + torch.arange(pixels, device=device)).view(-1)


def psa_mask(mask: Tensor, mode: str, mask_size: Sequence[int]) -> Tensor:
    """mmcv's ``PSAMask``: ``N x (mask_h * mask_w) x H x W`` attention over a window around each
    pixel -> ``N x (H * W) x H x W`` over the whole map, zero outside the window.

    ``collect``: ``out[n, p, h, w]`` is the mask value of pixel (h, w) for the offset from it to
    position ``p``; ``distribute``: the same with ``p`` and (h, w) swapped. The window's centre is
    mask cell ((mask_h - 1) // 2, (mask_w - 1) // 2), as in mmcv.
    """
    if mode not in PSA_MODES:
        raise ValueError(f"psa_mask mode must be one of {PSA_MODES}, not {mode!r}")
    n, channels, height, width = mask.shape
    if channels != int(mask_size[0]) * int(mask_size[1]):
        raise ValueError(f"psa_mask: {channels} channels, not mask_size {tuple(mask_size)}'s")
    pixels = height * width
    padded = F.pad(mask.reshape(n, channels, pixels), (0, 0, 0, 1))  # + a zero row
    index = _collect_index(height, width, mask_size, mask.device)
    out = padded.reshape(n, -1)[:, index].view(n, pixels, pixels)
    if mode == "distribute":
        out = out.transpose(1, 2)
    return out.reshape(n, pixels, height, width)


class PSAMask(nn.Module):
    """:func:`psa_mask` as a module (mmcv's ``PSAMask``)."""

    def __init__(self, psa_type: str, mask_size: Sequence[int]) -> None:
        super().__init__()
        if psa_type not in PSA_MODES:
            raise ValueError(f"psa_type must be one of {PSA_MODES}, not {psa_type!r}")
        self.psa_type = psa_type
        self.mask_size = tuple(int(s) for s in mask_size)

    def forward(self, x: Tensor) -> Tensor:
        return psa_mask(x, self.psa_type, self.mask_size)


class ModulatedDeformConv2dPack(nn.Module):
    """mmcv's ``ModulatedDeformConv2dPack`` (registered there as ``DCNv2``; Zhu et al., CVPR 2019):
    a convolution whose taps sample the input at learnt fractional offsets, each tap weighted by
    a learnt mask. Same parameters, layout and initialisation as mmcv's, so its state dicts load
    as they are: ``weight``, ``bias`` (None with ``bias=False``), and ``conv_offset``, a plain
    conv of the same geometry giving ``3 * k_h * k_w`` channels per deform group: its output
    chunked in three along the channels, the first two thirds (concatenated) are the offsets
    (``[2t]`` = dy, ``[2t + 1]`` = dx of tap ``t = i * k_w + j``, per deform group), the sigmoid of
    the last third the mask. A sample outside the image is 0, bilinear with zero neighbours at the
    border (mmcv's ``modulated_deformable_im2col``, which :func:`torchvision.ops.deform_conv2d`
    also implements). The signature is :class:`torch.nn.Conv2d`'s (plus ``deform_groups``), so it
    can be the ``conv_layer`` of torchvision's ``ConvNormActivation``.
    """

    # torchvision's deform_conv2d exports to ONNX's DeformConv, new in opset 19.
    ONNX_OPERATOR = ("DeformConv", 19)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups or in_channels % deform_groups:
            raise ValueError(
                f"ModulatedDeformConv2dPack: {in_channels} -> {out_channels} channels do not "
                f"split into groups={groups} and deform_groups={deform_groups}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deform_groups = groups, deform_groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(
            in_channels,
            deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's ``init_weights``: weight U(+-1/sqrt(in_channels * k_h * k_w)), bias 0, and
        ``conv_offset`` all zero (no offsets, mask 0.5 everywhere at the start)."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        dy_dx_1, dy_dx_2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return deform_conv2d(
            x,
            torch.cat((dy_dx_1, dy_dx_2), dim=1),
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=torch.sigmoid(mask),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )
