"""mmcv's two context operators in plain PyTorch, for CCNet and PSANet (no compiled extension).

- :class:`CrissCrossAttention`: mmcv 2.x's own implementation (``mmcv/ops/cc_attention.py``, plain
  PyTorch since mmcv 1.3.13), the same einsums, the same ``-inf`` on the diagonal of the vertical
  branch (a pixel is counted once, in the horizontal one) and the same zero-initialised ``gamma``.
- :func:`psa_mask`: mmcv's ``PSAMask`` (``mmcv/ops/csrc/pytorch/cpu/psamask.cpp``, from
  hszhao/semseg), collect and distribute, as one gather: every output value is one input value or
  zero, so autograd's backward of the gather is the kernel's backward. Any device and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
