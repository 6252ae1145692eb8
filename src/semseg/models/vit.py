"""Vision Transformer (ViT-B, DeiT-S) as mmseg's ``VisionTransformer`` builds it for segmentation
(the BDD100K zoo's UPerNet + ViT/DeiT rows, through mmseg's MultiLevelNeck:
:mod:`semseg.models.necks_transformer`), on timm's pieces: ``PatchEmbed``, ``Attention``,
``Mlp``, ``DropPath``.

Where timm's ViT differs from mmseg's, the piece is built here:

- the layer (:class:`TransformerEncoderLayer`) keeps mmseg's names ``ln1``/``ln2`` for its
  LayerNorms (timm: ``norm1``/``norm2``). The zoo's optimizer matches parameter names: its
  ``custom_keys`` rule ``norm`` takes the weight decay off names containing "norm", which mmseg's
  ``ln1``/``ln2`` do not, so in mmseg those LayerNorms decay; with timm's names they would not;
- position embeddings (:func:`resize_pos_embed`): mmseg resizes the pretraining grid
  (``img_size / patch_size``, 32x32 at the zoo's 512x512) to the input's patch grid with bicubic
  interpolation without antialiasing, the class token's embedding kept (mmseg skips it when the
  token counts agree, where it is the identity); timm's ``resample_abs_pos_embed`` antialiases when it shrinks the grid;
- any input size: the patch embedding pads the image to a multiple of the patch size at the
  bottom/right (mmseg's ``padding='corner'``, timm's ``dynamic_img_pad``).

``out_indices`` layers' outputs, class token removed, come out as ``N x C x H/16 x W/16`` maps;
``final_norm`` (off in the zoo's configs) normalises the last layer's output first. With
``output_cls_token`` (mmseg's; DPT's head reads it: :mod:`semseg.models.dpt`) each output is the
pair ``(map, N x C class token)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from semseg.models.backbone_weights import Layout, PretrainedWeights, load_pretrained, rules
from semseg.models.mmseg_conversion import mmseg_vit_rules

# timm's ViT keys -> this module's (mmseg's layer names on timm's attention and MLP).
_TIMM_VIT = rules(
    (r"(cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias))", r"\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"layers.\1.ln\2.\3"),
    (r"blocks\.(\d+)\.(attn\.(?:qkv|proj)\.(?:weight|bias))", r"layers.\1.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12]\.(?:weight|bias))", r"layers.\1.ffn.\2"),
    (r"norm\.(weight|bias)", r"ln1.\1"),
    (r"(?:head|head_dist|fc_norm)\..*", None),  # the classifier
)


class TransformerEncoderLayer(nn.Module):
    """mmseg's pre-norm ViT layer under mmseg's norm names: ``x + attn(ln1(x))``, then
    ``x + ffn(ln2(x))``, each branch through stochastic depth."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, norm_eps: float
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.ln2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``N x L x C`` tokens."""
        x = x + self.drop_path(self.attn(self.ln1(x)))
        return x + self.drop_path(self.ffn(self.ln2(x)))


def resize_pos_embed(pos_embed: Tensor, grid: Sequence[int], pos_grid: Sequence[int]) -> Tensor:
    """``1 x (1 + h*w) x C`` position embeddings (class token first) of a ``pos_grid`` patch grid
    resized to ``grid``: bicubic, align_corners=False, no antialiasing (mmseg's
    ``VisionTransformer.resize_pos_embed``)."""
    cls_embed, patch_embed = pos_embed[:, :1], pos_embed[:, 1:]
    patch_embed = patch_embed.reshape(1, *pos_grid, -1).permute(0, 3, 1, 2)
    patch_embed = F.interpolate(patch_embed, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([cls_embed, patch_embed.flatten(2).transpose(1, 2)], dim=1)


class VisionTransformerBackbone(nn.Module):
    """mmseg's ``VisionTransformer`` (class token, learned position embeddings at ``img_size``,
    ``num_layers`` pre-norm layers) returning the ``out_indices`` layers as stride-16 maps.

    Args:
        name: timm's model of the same architecture (messages; e.g. ``vit_base_patch16_224``).
        img_size: the pretraining size the position embeddings belong to (the zoo: 512x512).
        patch_size: 16.
        embed_dims: width (ViT-B 768, DeiT-S 384).
        num_layers: 12.
        num_heads: ViT-B 12, DeiT-S 6.
        mlp_ratio: 4.
        out_indices: the layers returned (the zoo: 2, 5, 8, 11).
        drop_path_rate: stochastic depth, rising linearly over the layers from 0.
        norm_eps: the LayerNorms' eps (the zoo's UPerNet rows: 1e-6).
        final_norm: a LayerNorm (``ln1``) on the last layer's output.
        patch_bias: a bias in the patch embedding's conv (mmseg 0.x, which trained the zoo: yes;
            mmseg 1.x's default: no).
        pretrained: load ImageNet weights (:data:`VIT_WEIGHTS`): from ``weights``, else timm's
            hub weights of ``name`` (the local Hub cache when offline); the position embeddings
            resized to ``img_size`` as mmseg does.
        weights: local weights file in timm's layout (the original ViT/DeiT files, timm's
            ``state_dict()``) or mmseg's (what its ``vit2mmseg`` converter writes), bare or under
            ``backbone.``.
        output_cls_token: return ``(map, class token)`` pairs (mmseg's ``output_cls_token``).
    """

    def __init__(
        self,
        name: str,
        img_size: Sequence[int] = (512, 512),
        patch_size: int = 16,
        embed_dims: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_indices: Sequence[int] = (2, 5, 8, 11),
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        final_norm: bool = False,
        patch_bias: bool = True,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        output_cls_token: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.output_cls_token = output_cls_token
        self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            embed_dim=embed_dims,
            bias=patch_bias,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], embed_dims)
        )
        rates = torch.linspace(0, drop_path_rate, num_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(embed_dims, num_heads, mlp_ratio, rate, norm_eps)
            for rate in rates
        )
        self.ln1 = nn.LayerNorm(embed_dims, eps=norm_eps) if final_norm else None
        self.out_indices = [int(i) for i in out_indices]
        self.out_channels = [embed_dims] * len(self.out_indices)
        self.out_strides = [patch_size] * len(self.out_indices)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        load_pretrained(self, VIT_WEIGHTS, name, pretrained, weights)

    def forward(self, x: Tensor) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
        """The ``out_indices`` layers' patch tokens as ``N x C x H/16 x W/16`` maps (with
        ``output_cls_token``: each with the layer's ``N x C`` class token)."""
        x = self.patch_embed(x)
        batch, height, width, channels = x.shape
        cls_tokens = self.cls_token + x.new_zeros(batch, 1, channels)  # broadcast: ONNX-safe
        x = torch.cat([cls_tokens, x.flatten(1, 2)], dim=1)
        # mmseg resizes only when the token counts differ; at the same grid the bicubic resize
        # is the identity (weights exactly 0 and 1), so it always runs here (no shape branch:
        # ONNX export with dynamic sizes).
        x = x + resize_pos_embed(self.pos_embed, (height, width), self.pos_grid)
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1 and self.ln1 is not None:
                x = self.ln1(x)
            if i in self.out_indices:
                out = x[:, 1:].reshape(batch, height, width, channels)
                out = out.permute(0, 3, 1, 2).contiguous()
                outs.append((out, x[:, 0]) if self.output_cls_token else out)
        return outs


def _fit_to_backbone(state: dict[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """ViT weights made to follow the backbone (its ``filter_fn``): the classifier's final norm
    (``ln1``) left out unless ``final_norm``, as mmseg leaves it out; the position embeddings
    resized from the file's square grid to ``img_size``'s as mmseg does."""
    if backbone.ln1 is None:
        state = {k: v for k, v in state.items() if not k.startswith("ln1.")}
    pos_embed = state.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != backbone.pos_embed.shape:
        side = int((pos_embed.shape[1] - 1) ** 0.5)
        state["pos_embed"] = resize_pos_embed(pos_embed, backbone.pos_grid, (side, side))
    return state


# A VisionTransformerBackbone's weights: timm's layout (the original ViT/DeiT files, timm's
# state_dict()) or mmseg's (what its vit2mmseg converter writes), bare or under ``backbone.``.
VIT_WEIGHTS = PretrainedWeights(
    layouts=(
        Layout("timm's ViT", _TIMM_VIT, r"blocks\."),
        Layout("an mmseg ViT", mmseg_vit_rules()),
    ),
    filter_fn=_fit_to_backbone,
)
