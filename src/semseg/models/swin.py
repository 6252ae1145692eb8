"""Swin Transformer as mmseg's ``SwinTransformer`` builds it for segmentation (the BDD100K zoo's
UPerNet + Swin rows), on timm's blocks: timm's ``PatchEmbed``, ``SwinTransformerBlock`` (window
attention with relative position bias, MLP, stochastic depth) and ``PatchMerging``; four stages,
each output through its own LayerNorm (``norm0``..``norm3``).

Where timm's Swin differs from mmseg's, the piece is built here, small, on timm's:

- window padding and shift (:class:`SwinBlock`): mmseg pads a feature map to whole windows first
  and then shifts it (``torch.roll``), with the shift mask computed on the padded map; timm shifts
  first and pads after. At any size that the window does not divide (the 128x256 stage-1 map of a
  512x1024 crop) the two differ. mmseg also keeps the window size 7 and the shift 3 when a map is
  smaller than a window (timm's ``always_partition=True``);
- patch merging (:class:`PatchMerging`): mmseg concatenates each 2x2 neighbourhood with
  ``nn.Unfold`` (channel-major: ``c * 4 + 2 * dy + dx``), timm (and the original Swin) as
  ``[x(0,0), x(1,0), x(0,1), x(1,1)]`` blocks of C channels. The layer is timm's with mmseg's
  order; timm-layout weights are reordered on loading (:func:`timm_to_unfold_order`), as mmseg's
  ``swin2mmseg`` converter does;
- the downsampling layer sits at the end of each stage (mmseg's ``stages.i.downsample``), not at
  the start of the next (timm's ``layers.i+1.downsample``); stage outputs are taken before it;
- no fixed input size: the patch embedding pads the image to a multiple of the patch size
  (bottom/right, mmseg's ``padding='corner'``), patch merging pads odd maps, every block pads to
  whole windows, so any input size works.

ImageNet weights (``backbone.weights=FILE``): timm's layout (``timm.create_model(name)``'s state
dict) or mmseg's converted files, which the zoo's configs name
(``swin_tiny_patch4_window7_224_20220317-1cdeb081.pth`` and the small/base ones). As mmseg
loads them, the classifier's final ``norm`` is not used: ``norm0``..``norm3`` start at identity.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import checkpoint_seq
from timm.models.swin_transformer import PatchMerging as TimmPatchMerging
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

from semseg.models.backbone_weights import Layout, PretrainedWeights, load_pretrained, rules
from semseg.models.mmseg_conversion import mmseg_swin_rules

# Keys of an ImageNet Swin file that hold no weights here: the original files' ``attn_mask``
# buffers (recomputed), and the classifier's final norm and head, which mmseg leaves out when it
# loads ImageNet weights. (``relative_position_index``: dropped by the key rules.)
_NOT_LOADED = rules((r".*attn_mask", None), (r"(?:norm|head)\..*", None))
_TIMM_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


class SwinBlock(SwinTransformerBlock):
    """timm's Swin block with mmseg's window attention order: pad the map to whole windows, then
    shift it, the shift mask computed on the padded map (timm shifts, then pads)."""

    def _attn(self, x: Tensor) -> Tensor:
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, -width % win_w, 0, -height % win_h))
        padded_h, padded_w = x.shape[1:3]
        shift = tuple(self.shift_size)
        mask = None
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            mask = self.get_attn_mask(x)
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width].contiguous()


class PatchMerging(TimmPatchMerging):
    """timm's patch merging (LayerNorm(4C), Linear(4C, 2C) without bias) with mmseg's ``nn.Unfold``
    channel order ``c * 4 + 2 * dy + dx``; odd maps padded at the bottom/right, as both pad."""

    def forward(self, x: Tensor) -> Tensor:
        """``B x H x W x C`` -> ``B x ceil(H/2) x ceil(W/2) x 2C``."""
        _, height, width, channels = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        batch, height, width, _ = x.shape
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
        x = x.permute(0, 1, 3, 5, 2, 4).flatten(3)
        return self.reduction(self.norm(x))


def timm_to_unfold_order(tensor: Tensor) -> Tensor:
    """A patch-merging norm vector (4C) or reduction matrix (out x 4C) from timm's / the original
    Swin's channel order into mmseg's unfold order (mmseg's ``swin2mmseg`` reordering)."""
    *out, channels = tensor.shape
    blocks = tensor.reshape(*out, 4, channels // 4)[..., [0, 2, 1, 3], :]
    return blocks.transpose(-1, -2).reshape(*out, channels)


class SwinStage(nn.Module):
    """Swin blocks (regular and shifted windows, alternately), then the optional downsampling."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                SwinBlock(
                    dim,
                    input_resolution=(window_size, window_size),
                    num_heads=num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    always_partition=True,
                    dynamic_mask=True,
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            )
        )
        self.downsample = PatchMerging(dim, 2 * dim) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """The blocks' output (``B x H x W x C``), before the downsampling."""
        if self.grad_checkpointing and self.training:
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class SwinBackbone(nn.Module):
    """mmseg's ``SwinTransformer(out_indices=(0, 1, 2, 3))`` on timm's blocks (see the module
    docstring for where it differs from timm's ``SwinTransformer``): feature maps at strides 4, 8,
    16, 32 with ``embed_dims * 2**i`` channels, each through its LayerNorm ``norm{i}``.

    Args:
        name: timm's model of the same architecture, for its hub weights (e.g.
            ``swin_tiny_patch4_window7_224.ms_in1k``) and for messages.
        embed_dims: channels of stage 0 (Swin-T/S 96, Swin-B 128).
        depths: blocks per stage (T ``[2, 2, 6, 2]``, S/B ``[2, 2, 18, 2]``).
        num_heads: attention heads per stage (T/S ``[3, 6, 12, 24]``, B ``[4, 8, 16, 32]``).
        window_size: attention window (7).
        mlp_ratio: MLP width over block width (4).
        patch_size: the patch embedding's kernel and stride (4).
        drop_path_rate: stochastic depth, rising linearly over all blocks from 0 (mmseg's rule).
        pretrained: load ImageNet weights (:data:`SWIN_WEIGHTS`): from ``weights`` (timm's
            layout or mmseg's), else timm's from the hub (the file of ``name``).
        weights: local weights file.
        grad_checkpointing: recompute each block in the backward pass (less memory).
    """

    def __init__(
        self,
        name: str,
        embed_dims: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        drop_path_rate: float = 0.0,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            embed_dim=embed_dims,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # mmseg's
        self.out_channels = [embed_dims * 2**i for i in range(len(depths))]
        self.out_strides = [patch_size * 2**i for i in range(len(depths))]
        self.stages = nn.ModuleList(
            SwinStage(
                dim,
                depth,
                heads,
                window_size,
                mlp_ratio,
                rates[sum(depths[:i]) : sum(depths[: i + 1])],
                downsample=i < len(depths) - 1,
            )
            for i, (dim, depth, heads) in enumerate(zip(self.out_channels, depths, num_heads))
        )
        for i, channels in enumerate(self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.apply(_init_weights)
        for stage in self.stages:
            stage.grad_checkpointing = grad_checkpointing
        load_pretrained(self, SWIN_WEIGHTS, name, pretrained, weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Normalised feature maps (``N x C x H x W``), highest resolution first."""
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return outs


# timm's Swin key -> mmseg's (mmseg's ``swin2mmseg`` renaming), after the downsampling layers
# have moved to the stage before.
_TIMM_TO_MMSEG = (
    (r"^layers\.", "stages."),
    (r"\.attn\.", ".attn.w_msa."),
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
    (r"\.mlp\.fc2\.", ".ffn.layers.1."),
)


def _timm_to_mmseg(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm's Swin keys and patch-merging order -> mmseg's (timm's downsampling at the start of
    stage i+1 -> mmseg's at the end of stage i, its tensors in unfold order)."""
    out = {}
    for key, value in state.items():
        if m := _TIMM_DOWNSAMPLE.match(key):
            key = f"layers.{int(m[1]) - 1}.downsample." + key[m.end() :]
            value = timm_to_unfold_order(value)
        for pattern, replacement in _TIMM_TO_MMSEG:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


# A SwinBackbone's weights: timm's layout (the original files') or mmseg's, bare or under
# ``backbone.``; the output norms keep their identity init unless the file has them.
SWIN_WEIGHTS = PretrainedWeights(
    layouts=(
        Layout("timm's Swin", [*_NOT_LOADED, *mmseg_swin_rules()], r"layers\.", _timm_to_mmseg),
        Layout("an mmseg Swin", [*_NOT_LOADED, *mmseg_swin_rules()]),
    ),
    optional=("norm",),
    hint=": is it a Swin of the same size, in timm's or mmseg's layout?",
)


def _init_weights(module: nn.Module) -> None:
    """mmseg's Swin init from scratch: linear layers truncated normal (std 0.02, bias 0), norms 1/0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
