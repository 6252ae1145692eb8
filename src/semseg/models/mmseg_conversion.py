"""mmsegmentation checkpoints (mmseg 0.x / mmcv 1.x files like the BDD100K zoo's, and mmseg 1.x
files) -> checkpoints of this project.

What a file holds is recognised from its keys (and, for the backbone's size, their shapes): the
backbone family from ``backbone.*`` (one row of :data:`BACKBONES`), the architecture from the
submodules of ``decode_head`` (one row of :data:`HEADS`). Each row brings the regex rules that
rename its tensors; a new family (Swin) is one more row. The config of the converted model comes
in as values: the converter script composes the groups that :func:`recognise_mmseg` names from
``conf/``, with the overrides the file implies (:attr:`MmsegArchitecture.overrides`).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from semseg.checkpoints.file import make_checkpoint
from semseg.errors import CheckpointError
from semseg.models.base import AUX_HEAD
from semseg.models.build import (
    build_model,
    fit_aux_head,
    listing,
    load_model_weights,
    strip_wrapper_prefixes,
)

Rule = tuple[re.Pattern, str | None]  # replacement None: the key holds nothing here (dropped)
# The config groups of the reference row (Semantic FPN R-50); recognise_mmseg() names any file's.
MMSEG_CONFIG_GROUPS = {"model": "semantic_fpn", "backbone": "resnet50c"}
_BN_STATS = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"


_SAME = r"\g<0>"  # a rule's replacement that keeps the key


def _rules(*pairs: tuple[str, str]) -> list[Rule]:
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


def rename_keys(
    state: Mapping[str, Tensor], rules: Sequence[Rule]
) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` renamed by the first rule that matches each key (left out where its replacement
    is None), and the keys no rule matches."""
    renamed, unmatched = {}, []
    for key, value in state.items():
        for pattern, replacement in rules:
            if pattern.match(key):
                if replacement is not None:
                    renamed[pattern.sub(replacement, key)] = value
                break
        else:
            unmatched.append(key)
    return renamed, unmatched


def conv_module_rules(source: str, target: str) -> list[Rule]:
    """An mmseg head under ``source`` whose layers are mmcv ConvModules (``<name>.conv``,
    ``<name>.bn|gn``) and ``conv_seg``, as this project's head under ``target`` (torchvision
    ``Conv2dNormActivation``: ``<name>.0``, ``<name>.1``; ``classifier``)."""
    src = re.escape(source)
    return _rules(
        (rf"^{src}\.conv_seg\.(weight|bias)$", rf"{target}.classifier.\1"),
        (rf"^{src}\.(.+)\.conv\.(weight|bias)$", rf"{target}.\1.0.\2"),
        (rf"^{src}\.(.+)\.(?:bn|gn)\.({_BN_STATS})$", rf"{target}.\1.1.\2"),
    )


# --------------------------------------------------------------------------------------------
# Backbone families


@dataclass(frozen=True)
class MmsegBackbone:
    """An mmseg backbone family: recognised by ``marker`` (a key), renamed by ``rules``; its
    ``conf/backbone`` name comes from ``config_name(state, output_stride)`` (the tensors, for
    their keys and shapes). ``output_stride``: fixed by the family (a backbone that never dilates),
    or None where the architecture's applies. ``overrides(checkpoint)``: config overrides that
    the whole file (its ``meta`` too) implies."""

    family: str
    marker: str
    rules: list[Rule]
    config_name: Callable[[Mapping[str, Tensor], int], str]
    output_stride: int | None = None
    overrides: Callable[[Mapping[str, Any]], list[str]] = lambda checkpoint: []


_RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}


def _blocks_per_stage(state: Mapping[str, Tensor], stage_prefix: str, stages: range) -> tuple:
    """How many blocks ``<stage_prefix><i>.<block>.`` keys name in each stage ``i``."""
    depth = stage_prefix.count(".") + 1  # where the block index sits in the key
    return tuple(
        len({k.split(".")[depth] for k in state if k.startswith(f"{stage_prefix}{i}.")})
        for i in stages
    )


def _resnet_v1c_config(state: Mapping[str, Tensor], output_stride: int) -> str:
    """``resnet50c``/``resnet101c`` (+ ``_d8`` at output stride 8) from the blocks per stage."""
    blocks = _blocks_per_stage(state, "backbone.layer", range(1, 5))
    depth = _RESNET_DEPTHS.get(blocks)
    if depth is None:
        raise CheckpointError(
            f"ResNetV1c with {list(blocks)} blocks per stage: only depths 50 {[3, 4, 6, 3]} and "
            f"101 {[3, 4, 23, 3]} have backbone configs here"
        )
    return f"resnet{depth}c" + ("_d8" if output_stride == 8 else "")


# timm's deep stem is conv1.{0,1,3,4,6} + bn1; the stages share mmseg's names (bottleneck blocks,
# a 1x1 conv + norm as downsample: no avg-pool, which would be ResNetV1d).
RESNET_V1C = MmsegBackbone(
    family="ResNetV1c",
    marker="backbone.stem.0.weight",
    rules=_rules(
        (r"^backbone\.stem\.([01346])\.(.+)$", r"backbone.model.conv1.\1.\2"),
        (r"^backbone\.stem\.7\.(.+)$", r"backbone.model.bn1.\1"),
        (
            rf"^backbone\.(layer\d\.\d+\.(?:conv[123]\.weight|bn[123]\.{_BN_STATS}"
            rf"|downsample\.0\.weight|downsample\.1\.{_BN_STATS}))$",
            r"backbone.model.\1",
        ),
    ),
    config_name=_resnet_v1c_config,
)


# mmcls 0.x / mmpretrain 1.x ConvNeXt (``type="mmcls.ConvNeXt"`` / ``"mmpretrain.ConvNeXt"``, both
# with these names) -> semseg.models.convnext.ConvNeXtBackbone. mmcls: downsample_layers.0 is the
# stem (conv, LN), downsample_layers.i (LN, conv) precedes stage i, stages.i.j are the blocks,
# norm{i} the output norms.
_MMCLS_CONVNEXT = (
    (r"downsample_layers\.0\.([01])\.(weight|bias)", r"model.stem_\1.\2"),
    (r"downsample_layers\.([1-3])\.([01])\.(weight|bias)", r"model.stages_\1.downsample.\2.\3"),
    (r"stages\.(\d)\.(\d+)\.depthwise_conv\.(weight|bias)", r"model.stages_\1.blocks.\2.conv_dw.\3"),
    (r"stages\.(\d)\.(\d+)\.norm\.(weight|bias)", r"model.stages_\1.blocks.\2.norm.\3"),
    (r"stages\.(\d)\.(\d+)\.pointwise_conv1\.(weight|bias)", r"model.stages_\1.blocks.\2.mlp.fc1.\3"),
    (r"stages\.(\d)\.(\d+)\.pointwise_conv2\.(weight|bias)", r"model.stages_\1.blocks.\2.mlp.fc2.\3"),
    (r"stages\.(\d)\.(\d+)\.gamma", r"model.stages_\1.blocks.\2.gamma"),
    (r"norm([0-3])\.(weight|bias)", r"norm\1.\2"),
)  # fmt: skip


def mmcls_convnext_rules(src: str = "", dst: str = "") -> list[Rule]:
    """The mmcls/mmpretrain ConvNeXt -> :class:`~semseg.models.convnext.ConvNeXtBackbone` key
    rules; ``src``/``dst`` prefix both sides (``"backbone."`` for whole segmentation models)."""
    return [(re.compile(f"^{re.escape(src)}{p}$"), dst + r) for p, r in _MMCLS_CONVNEXT]


# (blocks per stage, stem width) -> conf/backbone
_CONVNEXT_SIZES = {
    ((3, 3, 9, 3), 96): "convnext_tiny",
    ((3, 3, 27, 3), 96): "convnext_small",
    ((3, 3, 27, 3), 128): "convnext_base",
}


def _convnext_config(state: Mapping[str, Tensor], output_stride: int) -> str:
    """``convnext_tiny|small|base`` from the blocks per stage and the stem's width."""
    blocks = _blocks_per_stage(state, "backbone.stages.", range(4))
    width = int(state["backbone.downsample_layers.0.0.weight"].shape[0])
    name = _CONVNEXT_SIZES.get((blocks, width))
    if name is None:
        known = "; ".join(
            f"{n} {list(b)} blocks, width {w}" for (b, w), n in _CONVNEXT_SIZES.items()
        )
        raise CheckpointError(
            f"ConvNeXt with {list(blocks)} blocks per stage and stem width {width}: only {known} "
            "have backbone configs here"
        )
    return name


def _convnext_overrides(checkpoint: Mapping[str, Any]) -> list[str]:
    """mmcls 0.x (the zoo's files: mmcv meta or none) built the LayerNorm before each downsampling
    conv with eps 1e-5, mmpretrain 1.x (mmengine meta) with 1e-6, as timm does."""
    meta = checkpoint.get("meta")
    mmengine = isinstance(meta, Mapping) and "mmengine_version" in meta
    return [] if mmengine else ["+backbone.downsample_norm_eps=1e-5"]


CONVNEXT = MmsegBackbone(
    family="mmcls/mmpretrain ConvNeXt",
    marker="backbone.downsample_layers.0.0.weight",
    rules=mmcls_convnext_rules("backbone.", "backbone."),
    config_name=_convnext_config,
    output_stride=32,
    overrides=_convnext_overrides,
)

_HRNET_WIDTHS = {18: "hrnet_w18", 48: "hrnet_w48"}


def _hrnet_config(state: Mapping[str, Tensor], output_stride: int) -> str:
    """``hrnet_w18``/``hrnet_w48`` from the width of the first branch."""
    width = int(state["backbone.transition1.0.0.weight"].shape[0])
    if width not in _HRNET_WIDTHS:
        raise CheckpointError(
            f"HRNet of width {width}: only widths 18 (hrnet_w18) and 48 (hrnet_w48) have "
            "backbone configs here"
        )
    return _HRNET_WIDTHS[width]


# semseg.models.hrnet.HRNet keeps mmseg's names (conv1, bn1, layer1, transition1, stage2, ...).
HRNET = MmsegBackbone(
    family="HRNet",
    marker="backbone.transition1.0.0.weight",
    rules=_rules((r"^backbone\.(?:conv[12]|bn[12]|layer1|transition\d|stage\d)\..+$", _SAME)),
    config_name=_hrnet_config,
)


# mmseg's SwinTransformer -> semseg.models.swin.SwinBackbone (timm's block names: ``attn``
# without mmseg's ``w_msa`` level, ``mlp.fc1/fc2`` for the FFN, ``patch_embed.proj``); mmseg's
# persistent ``relative_position_index`` buffers are recomputed here, so they are dropped.
_MMSEG_SWIN = (
    (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"patch_embed\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (r"stages\.(\d)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_index", None),
    (r"stages\.(\d)\.blocks\.(\d+)\.attn\.w_msa\.(relative_position_bias_table|(?:qkv|proj)\.(?:weight|bias))",
     r"stages.\1.blocks.\2.attn.\3"),
    (r"stages\.(\d)\.blocks\.(\d+)\.(norm[12])\.(weight|bias)", r"stages.\1.blocks.\2.\3.\4"),
    (r"stages\.(\d)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc1.\3"),
    (r"stages\.(\d)\.blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc2.\3"),
    (r"stages\.(\d)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)", r"stages.\1.downsample.\2"),
    (r"norm([0-3])\.(weight|bias)", r"norm\1.\2"),
)  # fmt: skip


def mmseg_swin_rules(src: str = "", dst: str = "") -> list[Rule]:
    """mmseg's Swin -> :class:`~semseg.models.swin.SwinBackbone` key rules; ``src``/``dst``
    prefix both sides (``"backbone."`` for whole segmentation models)."""
    return [
        (re.compile(f"^{re.escape(src)}{p}$"), None if r is None else dst + r)
        for p, r in _MMSEG_SWIN
    ]


# (stage-0 width, blocks per stage) -> conf/backbone
_SWIN_SIZES = {
    (96, (2, 2, 6, 2)): "swin_tiny",
    (96, (2, 2, 18, 2)): "swin_small",
    (128, (2, 2, 18, 2)): "swin_base",
}


def _swin_config(state: Mapping[str, Tensor], output_stride: int) -> str:
    """``swin_tiny|small|base`` from the patch embedding's width and the blocks per stage."""
    blocks = tuple(
        len({k.split(".")[4] for k in state if k.startswith(f"backbone.stages.{i}.blocks.")})
        for i in range(4)
    )
    width = int(state["backbone.patch_embed.projection.weight"].shape[0])
    name = _SWIN_SIZES.get((width, blocks))
    if name is None:
        known = "; ".join(f"{n} width {w}, {list(b)} blocks" for (w, b), n in _SWIN_SIZES.items())
        raise CheckpointError(
            f"Swin with width {width} and {list(blocks)} blocks per stage: only {known} have "
            "backbone configs here"
        )
    return name


SWIN = MmsegBackbone(
    family="mmseg SwinTransformer",
    marker="backbone.stages.0.blocks.0.attn.w_msa.qkv.weight",
    rules=mmseg_swin_rules("backbone.", "backbone."),
    config_name=_swin_config,
    output_stride=32,
)


# mmseg's VisionTransformer -> semseg.models.vit.VisionTransformerBackbone (timm's attention:
# nn.MultiheadAttention's in_proj is its qkv, out_proj its proj; the FFN as timm's Mlp).
_MMSEG_VIT = (
    (r"(cls_token|pos_embed)", r"\1"),
    (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"layers\.(\d+)\.(ln[12])\.(weight|bias)", r"layers.\1.\2.\3"),
    (r"layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"layers\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)", r"layers.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"layers.\1.ffn.fc1.\2"),
    (r"layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"layers.\1.ffn.fc2.\2"),
    (r"ln1\.(weight|bias)", r"ln1.\1"),
)


def mmseg_vit_rules(src: str = "", dst: str = "") -> list[Rule]:
    """mmseg's ViT -> :class:`~semseg.models.vit.VisionTransformerBackbone` key rules;
    ``src``/``dst`` prefix both sides (``"backbone."`` for whole segmentation models)."""
    return [(re.compile(f"^{re.escape(src)}{p}$"), dst + r) for p, r in _MMSEG_VIT]


# (width, heads) -> conf/backbone
_VIT_SIZES = {768: "vit_base", 384: "deit_small"}


def _vit_config(state: Mapping[str, Tensor], output_stride: int) -> str:
    """``vit_base`` / ``deit_small`` from the width (12 layers each)."""
    width = int(state["backbone.cls_token"].shape[-1])
    layers = len({k.split(".")[2] for k in state if k.startswith("backbone.layers.")})
    name = _VIT_SIZES.get(width)
    if name is None or layers != 12:
        raise CheckpointError(
            f"ViT of width {width} with {layers} layers: only ViT-B (768) and DeiT-S (384) with "
            "12 layers have backbone configs here"
        )
    return name


def _vit_overrides(state: Mapping[str, Tensor]) -> list[str]:
    """The position embeddings' size (their square patch grid: the UPerNet rows' 512x512, DPT's
    224x224); the MultiLevelNeck, where the file has one, at the ViT's width (the zoo's configs:
    768, DeiT-S 384); no bias in the patch embedding where the file has none (mmseg 1.x's default;
    mmseg 0.x, the zoo's, had one)."""
    width = int(state["backbone.cls_token"].shape[-1])
    side = math.isqrt(int(state["backbone.pos_embed"].shape[1]) - 1)
    size = side * int(state["backbone.patch_embed.projection.weight"].shape[-1])
    overrides = [f"backbone.img_size=[{size},{size}]"]
    if any(k.startswith("neck.") for k in state):
        overrides.append(f"model.neck.out_channels={width}")
    bias = "backbone.patch_embed.projection.bias" in state
    return overrides + ([] if bias else ["backbone.patch_bias=false"])


VIT = MmsegBackbone(
    family="mmseg VisionTransformer",
    marker="backbone.cls_token",
    rules=mmseg_vit_rules("backbone.", "backbone."),
    config_name=_vit_config,
    output_stride=16,
    overrides=lambda checkpoint: _vit_overrides(_state_dict(checkpoint)),
)

BACKBONES: list[MmsegBackbone] = [RESNET_V1C, CONVNEXT, HRNET, SWIN, VIT]


# --------------------------------------------------------------------------------------------
# Architectures (decode head, neck)


@dataclass(frozen=True)
class MmsegHead:
    """An mmseg architecture: recognised by the submodules of ``decode_head`` (and ``marker``, a
    regex some key matches, where two share them); built as ``conf/model/<model>``.

    ``output_stride``: of the backbone in mmseg's and the zoo's configs of this architecture
    ("-D8": 8). ``aux``: the model takes mmseg's auxiliary FCNHead (``auxiliary_head``).
    """

    model: str
    mmseg_type: str
    submodules: frozenset[str]
    output_stride: int
    rules: list[Rule]
    aux: bool = True
    marker: str | None = None
    overrides: Callable[[Mapping[str, Tensor]], list[str]] = lambda state: []
    """Config overrides the head's tensors imply (e.g. PSANet's mask size)."""


def _head(
    model: str,
    mmseg_type: str,
    submodules: str,
    output_stride: int,
    *extra: tuple[str, str],
    **kwargs: Any,
) -> MmsegHead:
    """An encoder-decoder architecture whose decode head is made of ConvModules (``extra``:
    rules for its other layers, tried first; ``kwargs``: :class:`MmsegHead`'s)."""
    rules = _rules(*extra) + conv_module_rules("decode_head", "decode_head")
    return MmsegHead(
        model, mmseg_type, frozenset(submodules.split()), output_stride, rules, **kwargs
    )


def _psa_mask_size(state: Mapping[str, Tensor]) -> list[str]:
    """PSANet's mask size from its attention width (mask_h * mask_w channels; square masks)."""
    area = int(state["decode_head.attention.1.weight"].shape[0])
    side = math.isqrt(area)
    if side * side != area:
        raise CheckpointError(
            f"PSAHead with a {area}-channel attention: not a square mask (mask_h * mask_w); "
            "only square mask sizes are recognised"
        )
    return [] if side == 97 else [f"model.decode_head.mask_size=[{side},{side}]"]


# The FPN neck's ConvModules have no norm: ``neck.<name>.conv`` -> ``neck.<name>.0``.
_FPN_RULES = conv_module_rules("neck", "neck") + conv_module_rules("decode_head", "decode_head")
_FPN_HEAD = frozenset({"scale_heads", "conv_seg"})
# The zoo's GN + DCN rows: the FPNHead's 3x3 convs are mmcv's DCNv2 (ModulatedDeformConv2dPack:
# ``conv.weight`` as a plain conv's, plus ``conv.conv_offset``). Only the head's: deformable convs
# in a backbone match no rule, so such a file is refused, naming their keys.
_FPN_DCN_RULES = [
    *_rules(
        (
            r"^decode_head\.(scale_heads\.\d+\.\d+)\.conv\.conv_offset\.(weight|bias)$",
            r"decode_head.\1.0.conv_offset.\2",
        )
    ),
    *_FPN_RULES,
]
# PointRend: a cascade, decode_head.0 the FPNHead, decode_head.1 the PointHead (Conv1d ``fcs``
# ConvModules without norm, ``fc_seg`` its classifier).
_POINTREND_RULES = [
    *conv_module_rules("neck", "neck"),
    *_rules((r"^decode_head\.1\.fc_seg\.(weight|bias)$", r"decode_head.1.classifier.\1")),
    *conv_module_rules("decode_head.0", "decode_head.0"),
    *conv_module_rules("decode_head.1", "decode_head.1"),
]

HEADS: list[MmsegHead] = [
    # Before "semantic_fpn_gn", whose keys it has too.
    MmsegHead(
        "semantic_fpn_gn_dcn",
        "FPN + FPNHead (GN, DCNv2)",
        _FPN_HEAD,
        32,
        _FPN_DCN_RULES,
        False,
        r"^decode_head\.scale_heads\..*\.conv_offset\.",
    ),
    MmsegHead("semantic_fpn_gn", "FPN + FPNHead (GN)", _FPN_HEAD, 32, _FPN_RULES, False, r"\.gn\."),
    MmsegHead("semantic_fpn", "FPN + FPNHead", _FPN_HEAD, 32, _FPN_RULES, aux=False),
    MmsegHead(
        "pointrend",
        "FPNHead + PointHead",
        frozenset({"0", "1"}),
        32,
        _POINTREND_RULES,
        False,
        r"^decode_head\.1\.fc_seg\.",
    ),
    _head("fcn", "FCNHead", "convs conv_cat conv_seg", 8),
    _head("pspnet", "PSPHead", "psp_modules bottleneck conv_seg", 8),
    _head("deeplabv3", "ASPPHead", "image_pool aspp_modules bottleneck conv_seg", 8),
    _head(
        "deeplabv3plus",
        "DepthwiseSeparableASPPHead",
        "image_pool aspp_modules bottleneck c1_bottleneck sep_bottleneck conv_seg",
        8,
    ),
    # UPerNet + ViT/DeiT: mmseg's MultiLevelNeck (convs without norm: ConvModule's ``.conv``)
    # before the same UPerHead; before "upernet", whose submodules it shares.
    MmsegHead(
        "upernet_vit",
        "MultiLevelNeck + UPerHead",
        frozenset(
            {
                "psp_modules",
                "bottleneck",
                "lateral_convs",
                "fpn_convs",
                "fpn_bottleneck",
                "conv_seg",
            }
        ),
        32,
        conv_module_rules("decode_head", "decode_head")
        + _rules((r"^neck\.(lateral_convs|convs)\.(\d+)\.conv\.(weight|bias)$", r"neck.\1.\2.\3")),
        marker=r"^neck\.convs\.",
    ),
    # DPT: the ViT's layers with their class tokens; no auxiliary head. mmseg's DPT configs (the
    # zoo's and its own) build the ViT's LayerNorms with LN's default eps, 1e-5.
    _head(
        "dpt",
        "DPTHead",
        "reassemble_blocks convs fusion_blocks project conv_seg",
        16,
        (
            r"^decode_head\.reassemble_blocks\.(?:resize_layers\.[013]|readout_projects\.\d+\.0)"
            r"\.(?:weight|bias)$",
            _SAME,
        ),
        aux=False,
        overrides=lambda state: ["backbone.norm_eps=1e-5"],
    ),
    _head(
        "upernet",
        "UPerHead",
        "psp_modules bottleneck lateral_convs fpn_convs fpn_bottleneck conv_seg",
        32,
    ),
    _head(
        "ccnet",
        "CCHead",
        "convs cca conv_cat conv_seg",
        8,
        (r"^decode_head\.cca\.((?:query|key|value)_conv\.(?:weight|bias)|gamma\.scale)$", _SAME),
    ),
    _head(
        "psanet",
        "PSAHead",
        "reduce attention reduce_p attention_p proj bottleneck conv_seg",
        8,
        (r"^decode_head\.attention(?:_p)?\.1\.weight$", _SAME),
        overrides=_psa_mask_size,
    ),
    # DANet: PAM's plain 1x1 projections, both gammas and the two branch classifiers keep
    # mmseg's names.
    _head(
        "danet",
        "DAHead",
        "pam_in_conv pam pam_out_conv pam_conv_seg cam_in_conv cam cam_out_conv cam_conv_seg "
        "conv_seg",
        8,
        (
            r"^decode_head\.(?:pam\.(?:key|query|value)_project\.(?:weight|bias)|(?:pam|cam)\.gamma"
            r"\.scale|(?:pam|cam)_conv_seg\.(?:weight|bias))$",
            _SAME,
        ),
    ),
    # HRNet's FCNHead: one 1x1 ConvModule on the resized, concatenated branches.
    _head("fcn_hr", "FCNHead (resize_concat)", "convs conv_seg", 4, aux=False),
    _head("nonlocal", "NLHead", "convs conv_cat nl_block conv_seg", 8),
    _head(
        "gcnet",
        "GCHead",
        "convs conv_cat gc_block conv_seg",
        8,
        (
            r"^decode_head\.(?:gc_block\.(?:conv_mask|channel_add_conv\.[013]|channel_mul_conv\.[013])\.(?:weight|bias))$",
            _SAME,
        ),
    ),
    _head(
        "dnlnet",
        "DNLHead",
        "convs conv_cat dnl_block conv_seg",
        8,
        (r"^decode_head\.(?:dnl_block\.conv_mask\.(?:weight|bias))$", _SAME),
    ),
    _head(
        "emanet",
        "EMAHead",
        "ema_module ema_in_conv ema_mid_conv ema_out_conv bottleneck conv_cat conv_seg",
        8,
        (r"^decode_head\.(?:ema_module\.bases)$", _SAME),
    ),
    _head(
        "dmnet",
        "DMHead",
        "dcm_modules bottleneck conv_seg",
        8,
        (
            rf"^decode_head\.(?:dcm_modules\.\d+\.(?:filter_gen_conv\.(?:weight|bias)|norm\.{_BN_STATS}))$",
            _SAME,
        ),
    ),
    _head(
        "apcnet",
        "APCHead",
        "acm_modules bottleneck conv_seg",
        8,
        (r"^decode_head\.(?:acm_modules\.\d+\.gla\.(?:weight|bias))$", _SAME),
    ),
]
# mmseg's auxiliary FCNHead (one ConvModule, no concatenation) -> this project's aux_head.
_AUX_RULES = conv_module_rules("auxiliary_head", AUX_HEAD)


# --------------------------------------------------------------------------------------------
# Recognition and conversion


@dataclass(frozen=True)
class MmsegArchitecture:
    """What an mmseg state dict holds, and the ``conf/`` groups that rebuild it here."""

    backbone: MmsegBackbone
    head: MmsegHead
    backbone_config: str
    has_aux: bool
    overrides: list[str]
    """Config overrides the file implies (the user's come after them): no auxiliary head where
    the file has none; backbone settings its version implies."""

    @property
    def config_groups(self) -> dict[str, str]:
        return {"model": self.head.model, "backbone": self.backbone_config}

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride or self.head.output_stride

    @property
    def rules(self) -> list[Rule]:
        return self.backbone.rules + self.head.rules + (_AUX_RULES if self.head.aux else [])

    def describe(self) -> str:
        aux = "; auxiliary FCNHead" if self.has_aux else ""
        return (
            f"mmseg {self.head.mmseg_type} on {self.backbone.family} "
            f"({self.backbone_config}, output stride {self.output_stride}){aux}"
        )


def _supported() -> str:
    heads = ", ".join(f"{h.mmseg_type} (model={h.model})" for h in HEADS)
    families = ", ".join(b.family for b in BACKBONES)
    return f"supported: {heads}; backbones: {families}"


def _state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of a state dict or of a whole mmcv/mmengine checkpoint (meta, state_dict, ...)."""
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return strip_wrapper_prefixes(state)


def recognise_mmseg(state: Mapping[str, Any]) -> MmsegArchitecture:
    """The backbone family and architecture of an mmseg state dict (or whole checkpoint); a
    CheckpointError naming what was found and what is supported when it is neither."""
    tensors = _state_dict(state)
    keys = list(tensors)
    backbone = next((b for b in BACKBONES if b.marker in tensors), None)
    if backbone is None:
        found = ", ".join([k for k in keys if k.startswith("backbone.")][:3]) or "none"
        raise CheckpointError(
            f"not a supported mmseg backbone (backbone keys: {found}, ...); {_supported()}"
        )
    submodules = {k.split(".")[1] for k in keys if k.startswith("decode_head.")}
    head = next(
        (
            h
            for h in HEADS
            if h.submodules == submodules
            and (h.marker is None or any(re.search(h.marker, k) for k in keys))
        ),
        None,
    )
    if head is None:
        raise CheckpointError(
            f"not a supported mmseg decode head (decode_head submodules: "
            f"{', '.join(sorted(submodules)) or 'none'}); {_supported()}"
        )
    has_aux = head.aux and any(k.startswith("auxiliary_head.") for k in keys)
    overrides = [f"model.{AUX_HEAD}=null"] if head.aux and not has_aux else []
    overrides += backbone.overrides(state) + head.overrides(tensors)
    output_stride = backbone.output_stride or head.output_stride
    return MmsegArchitecture(
        backbone, head, backbone.config_name(tensors, output_stride), has_aux, overrides
    )


def convert_mmseg_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Rename the tensors of an mmseg state dict (or whole checkpoint) to this project's keys by
    the rules of its recognised backbone and architecture; a CheckpointError lists the keys no
    rule matches (e.g. deformable convolutions)."""
    arch = recognise_mmseg(state)
    converted, unknown = rename_keys(_state_dict(state), arch.rules)
    if unknown:
        raise CheckpointError(
            f"not a supported {arch.describe()}: "
            f"{listing('keys without a mapping', unknown)}; {_supported()}"
        )
    return converted


def _num_classes(converted: Mapping[str, Tensor]) -> int | None:
    sizes = [
        int(v.shape[0])
        for k, v in converted.items()
        if k.startswith("decode_head.") and k.endswith("classifier.weight")
    ]
    return sizes[0] if sizes else None


def mmseg_num_classes(state: Mapping[str, Any]) -> int | None:
    """The class count of an mmseg state dict (or whole checkpoint): its decode classifier's."""
    return _num_classes(convert_mmseg_state_dict(state))


def mmseg_to_checkpoint(
    state_dict: Mapping[str, Any],
    source: str,
    config: Mapping[str, Any],
    meta: Mapping[str, Any],
    num_classes: int | None = None,
    precision: str | None = None,
) -> dict:
    """Turn an mmseg state dict (or whole mmcv/mmengine checkpoint) into a checkpoint of this
    project. ``config`` holds the resolved ``model``, ``backbone`` and ``dataset`` groups that
    rebuild the model (those :func:`recognise_mmseg` names); ``meta`` is the dataset's
    (``semseg.data.dataset_meta``). The auxiliary head's weights are kept when ``model.aux_head``
    is set, dropped when it is null. ``precision``: what the row is tested in (fp16 rows: fp16),
    recorded as a trained checkpoint records its validation's, for the apps to follow."""
    converted = convert_mmseg_state_dict(state_dict)
    n_file = _num_classes(converted)
    if num_classes is not None and n_file is not None and n_file != num_classes:
        raise CheckpointError(f"{source} has {n_file} classes, not --num-classes {num_classes}")
    config = copy.deepcopy(dict(config))
    if n_file is not None and config["dataset"]["num_classes"] != n_file:
        raise CheckpointError(
            f"{source} has {n_file} classes but dataset '{config['dataset']['name']}' has "
            f"{config['dataset']['num_classes']}; pick the matching dataset config (dataset=...)"
        )
    config["backbone"].update(pretrained=False, weights=None)
    config["model"]["weights"] = None
    model = build_model(config)
    load_model_weights(model, fit_aux_head(model, converted), source=source)
    recorded = {} if precision is None else {"precision": precision}
    return make_checkpoint(
        model.state_dict(), config, {**meta, "converted_from": source}, **recorded
    )
