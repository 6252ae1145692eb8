"""Reference outputs of mmsegmentation's own models, for tests/test_mmseg_exactness.py.

For each case of :data:`CASES`, a table with one row per model (an mmseg base config
``_base_/models/<name>.py``, its backbone and the BDD100K zoo's settings; the ConvNeXt cases put the
zoo's ``mmcls.ConvNeXt`` backbone into UPerNet as its ``upernet_convnext`` configs do), this builds mmseg's model, fills it with seeded, variance-preserving random
weights (:func:`seeded_weights`: a function of each tensor's name and shape, so the tests recreate
them without mmseg), runs it on structured street-like images (:func:`scene`) at a size that
stride 32 divides and one that it does not, and through mmseg's whole test pipeline (load the PNG,
keep-ratio resize into the test scale, normalise, logits resized back to the image) on
``scene.png``, and for the zoo's 769x769 rows (``"slide"`` cases) through mmseg's sliding-window
test (:data:`SLIDE`). It writes small fixtures to ``tests/fixtures/mmseg/``: per case the argmax
maps and the logits on a 6-pixel grid (``<case>.npz``); the key/shape list of mmseg's state dict and the
layer geometry of mmseg's dilated ResNetV1c (``cases.json``); the input images (``inputs.npz``,
``scene.png``).

Set-up (once; a virtualenv of its own, because the mm packages pin opencv-python, which clashes
with this project's opencv-python-headless)::

    python -m venv --system-site-packages VENV          # reuses this project's torch
    VENV/bin/pip install --no-deps mmengine==0.10.7 mmcv-lite==2.1.0 mmsegmentation==1.2.2
    VENV/bin/pip install addict yapf rich termcolor prettytable scipy pyyaml packaging ftfy regex
    # the ConvNeXt cases (mmpretrain's ConvNeXt is mmcls 0.x's, renamed):
    VENV/bin/pip install --no-deps mmpretrain==1.2.0 einops "importlib-metadata<8.8" zipp \
        model-index ordered-set mat4py

mmcv-lite has no compiled ops, and mmseg imports ``mmcv.ops`` at module level: this script puts a
stand-in ``mmcv.ops`` into ``sys.modules`` before importing mmseg (:func:`mmcv_ops`): CCNet's
criss-cross attention is mmcv 2.x's own plain-PyTorch file, PSANet's PSAMask a transcription of
mmcv's CPU kernel (:func:`psamask_kernel`), and the DCNv2 of Semantic FPN's GN + DCN head mmcv's own
``ModulatedDeformConv2dPack`` on a transcription of its CPU im2col
(:func:`modulated_deform_conv_kernel`); the other models use no mmcv op.

Run from the repository root::

    VENV/bin/python scripts/mmseg_reference.py                      # writes the fixtures
    PYTHONPATH=src VENV/bin/python scripts/mmseg_reference.py --compare

``--compare`` also converts each case with this project's converter and compares both models on
whole maps: the fixture sizes, one 512x1024 image, and the full test pipeline at the zoo's scale
1280x720 on a 640x480 scene (also with the zoo's mmseg 0.x float loading), sliding windows for the
``"slide"`` cases (the fixture's, and 320x320 windows at stride 213 on the 512x1024 image); it writes
``comparison.json`` next to the fixtures (about half an hour on 2 CPU cores; ``--cases`` and
``--no-fixtures`` narrow it down; ``--cases`` also limits which fixtures are rewritten).

``--recipe`` writes the fixtures of tests/test_recipe.py instead (``recipe.npz``,
``recipe_769.png``, ``recipe_mmseg1_cfg.txt``), one row of :data:`RECIPE_ROWS` each: the zoo's
769x769 GCNet row through mmseg's test pipeline at its real recipe (1281x721, 769x769 windows at
stride 513, align_corners=True), an mmseg 1.x ViT without patch bias; and an mmseg 1.x config
text. ``--recipe --compare`` converts a file laid out and named like each zoo file of
:data:`ZOO_FILES` with no argument beyond IN and OUT and compares what src/predict.py computes
with mmseg's pipeline at the file's recipe (``comparison_recipe.json``). ``--recipe --drivable``
writes ``recipe_drivable.npz`` only: a 3-class file laid out like the drivable zoo's DANet 769x769
row, through the same pipeline and recipe.

A new model is a row of :data:`CASES` (and, for a new backbone family, a function in
:data:`BACKBONE_FAMILIES`); a new recipe fixture a row of :data:`RECIPE_ROWS`; a new zoo file to
convert a row of :data:`ZOO_FILES`.

The zoo's ConvNeXt rows were trained with mmcls 0.x, whose ConvNeXt differs from mmpretrain 1.2's
in one number: the LayerNorm before each downsampling conv has eps 1e-5 (mmcls 0.25.0,
``mmcls/models/backbones/convnext.py``: ``LayerNorm2d(self.channels[i - 1])``, nn.LayerNorm's
default), not the ``norm_cfg``'s 1e-6. The ConvNeXt cases set that eps on mmpretrain's model, so
the reference is mmcls 0.x's network; the converter gives a file without mmengine's ``meta``
the same (``+backbone.downsample_norm_eps=1e-5``), and ``--compare`` measures what 1e-6 changes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semseg.cli import report_user_errors

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# (h, w): one size stride 32 divides and one it does not.
SIZES = ((64, 128), (75, 110))
# The pipeline fixture: a 100x75 PNG fitted into (w, h) = (256, 144) -> 192x144, logits back to
# 100x75. The zoo's scale is (1280, 720); --compare checks that one too.
PIPELINE_IMAGE = (75, 100)
PIPELINE_SCALE = (256, 144)
GRID = 6  # logits are stored every GRID pixels in both directions
# The sliding-window fixture of the "slide" cases (the zoo's 769x769 rows test with 769x769
# windows at stride 513): on the SIZES[1] image, 2 x 3 overlapping windows clamped at the borders.
SLIDE = {"crop_size": (48, 64), "stride": (32, 43)}
SLIDE_512X1024 = {"crop_size": (320, 320), "stride": (213, 213)}  # --compare: 2 x 5 windows
SEED = 0

# --------------------------------------------------------------------------------------------
# The table of cases: one row per mmseg model


def case(
    config: str,
    backbone: Mapping[str, Any],
    model: str,
    backbone_group: str,
    settings: Mapping[str, Any] = {},  # read, never changed
) -> dict[str, Any]:
    """A case's entry in ``cases.json`` (and what :func:`mmseg_config` reads): mmseg's base config
    ``_base_/models/<config>.py``, its backbone's and the case's ``settings``, this project's
    config groups the converter must recognise, and the converter overrides it needs beyond them."""
    settings = {**backbone, **settings}
    overrides = settings.pop("overrides", None)
    groups = {"model": model, "backbone": backbone_group}
    return {"config": config, **settings, "groups": groups} | (
        {"overrides": overrides} if overrides else {}
    )


# mmseg's backbone of a case: ResNetV1c of a depth (the base configs': 50), the zoo's mmcls ConvNeXt
# (:data:`CONVNEXT`), HRNet of a width, Swin (:data:`SWIN`) or ViT (:data:`VIT`) of a size.
R50, R101 = {}, {"depth": 101}
CONVNEXT_T, CONVNEXT_S, CONVNEXT_B = ({"convnext": size} for size in ("tiny", "small", "base"))
HR18, HR48 = {"hrnet": 18}, {"hrnet": 48}
SWIN_T, SWIN_S, SWIN_B = ({"swin": size} for size in ("tiny", "small", "base"))
VIT_B, DEIT_S = {"vit": "base"}, {"vit": "small"}
# A case's settings. The zoo's 769x769 rows: align_corners=True in every resize (the final one to
# the image too), which the converter cannot see in the weights; their sliding-window test
# (:data:`SLIDE`); the parameter groups of the transformer rows (param_groups.json); the key layout
# and shapes only, no logits (the S and B sizes, R-101 twins of an R-50 case).
ROW_769 = {"align_corners": True, "overrides": ["model.align_corners=true"]}
SLIDE_TEST = {"slide": True}
SWIN_GROUPS, VIT_GROUPS = {"custom_keys": "swin"}, {"custom_keys": "vit"}
LAYOUT_ONLY = {"logits": False}
# The zoo's fpn_r50_gn_dconv rows: the FPNHead with GroupNorm(32) and mmcv's DCNv2 convs
# (decode_head settings of sem_seg/configs/sem_seg/fpn_r50_gn_dconv_512x1024_*_bdd100k.py).
GN_DCN_HEAD = {
    "decode_head": {
        "norm_cfg": {"type": "GN", "num_groups": 32, "requires_grad": True},
        "conv_cfg": {"type": "DCNv2"},
    }
}

# name: case(mmseg base config, mmseg backbone, this project's model and backbone groups, settings)
# fmt: off
CASES: dict[str, dict[str, Any]] = {
    "fcn":                    case("fcn_r50-d8",             R50,        "fcn",                 "resnet50c_d8"),
    "pspnet":                 case("pspnet_r50-d8",          R50,        "pspnet",              "resnet50c_d8"),
    "deeplabv3":              case("deeplabv3_r50-d8",       R50,        "deeplabv3",           "resnet50c_d8"),
    "deeplabv3plus":          case("deeplabv3plus_r50-d8",   R50,        "deeplabv3plus",       "resnet50c_d8"),
    "upernet":                case("upernet_r50",            R50,        "upernet",             "resnet50c"),
    "semantic_fpn":           case("fpn_r50",                R50,        "semantic_fpn",        "resnet50c"),
    "semantic_fpn_gn_dcn":    case("fpn_r50",                R50,        "semantic_fpn_gn_dcn", "resnet50c", GN_DCN_HEAD),
    "deeplabv3plus_r101":     case("deeplabv3plus_r50-d8",   R101,       "deeplabv3plus",       "resnet101c_d8"),
    "upernet_align_corners":  case("upernet_r50",            R50,        "upernet",             "resnet50c", ROW_769),
    # The zoo's UPerNet + ConvNeXt rows (mmcls 0.x ConvNeXt).
    "upernet_convnext":       case("upernet_r50",            CONVNEXT_T, "upernet",             "convnext_tiny"),
    "upernet_convnext_small": case("upernet_r50",            CONVNEXT_S, "upernet",             "convnext_small", LAYOUT_ONLY),
    "upernet_convnext_base":  case("upernet_r50",            CONVNEXT_B, "upernet",             "convnext_base", LAYOUT_ONLY),
    # CCNet and PSANet (mmcv's CrissCrossAttention, and PSAMask: see mmcv_ops()).
    "ccnet":                  case("ccnet_r50-d8",           R50,        "ccnet",               "resnet50c_d8"),
    "ccnet_r101":             case("ccnet_r50-d8",           R101,       "ccnet",               "resnet101c_d8", LAYOUT_ONLY),
    "psanet":                 case("psanet_r50-d8",          R50,        "psanet",              "resnet50c_d8"),
    # HRNet: fcn_hr18 as is, and at the zoo's width 48 (sem_seg/configs/sem_seg/fcn_hr48_*).
    "fcn_hr18":               case("fcn_hr18",               HR18,       "fcn_hr",              "hrnet_w18"),
    "fcn_hr48":               case("fcn_hr18",               HR48,       "fcn_hr",              "hrnet_w48"),
    # The context heads (NLNet, GCNet, DNLNet, EMANet, DMNet, APCNet on R-50-D8); the zoo's 769x769
    # rows (GCNet, EMANet, DMNet) with their sliding-window test.
    "nonlocal":               case("nonlocal_r50-d8",        R50,        "nonlocal",            "resnet50c_d8"),
    "gcnet":                  case("gcnet_r50-d8",           R50,        "gcnet",               "resnet50c_d8", ROW_769 | SLIDE_TEST),
    "dnlnet":                 case("dnl_r50-d8",             R50,        "dnlnet",              "resnet50c_d8"),
    "dnlnet_r101":            case("dnl_r50-d8",             R101,       "dnlnet",              "resnet101c_d8", LAYOUT_ONLY),
    "emanet":                 case("emanet_r50-d8",          R50,        "emanet",              "resnet50c_d8", ROW_769 | SLIDE_TEST),
    "dmnet":                  case("dmnet_r50-d8",           R50,        "dmnet",               "resnet50c_d8", ROW_769 | SLIDE_TEST),
    "apcnet":                 case("apcnet_r50-d8",          R50,        "apcnet",              "resnet50c_d8"),
    # CascadeEncoderDecoder: FPNHead, then PointHead (inference: two subdivision steps).
    "pointrend":              case("pointrend_r50",          R50,        "pointrend",           "resnet50c"),
    # The zoo's UPerNet + Swin rows (mmseg's SwinTransformer).
    "upernet_swin":           case("upernet_swin",           SWIN_T,     "upernet",             "swin_tiny", SWIN_GROUPS),
    "upernet_swin_small":     case("upernet_swin",           SWIN_S,     "upernet",             "swin_small", LAYOUT_ONLY),
    "upernet_swin_base":      case("upernet_swin",           SWIN_B,     "upernet",             "swin_base", LAYOUT_ONLY),
    # The zoo's UPerNet + ViT-B / DeiT-S rows (mmseg's VisionTransformer + MultiLevelNeck); the
    # zoo's _base_/models/upernet_vit.py is mmseg's upernet_vit-b16_ln_mln.
    "upernet_vit":            case("upernet_vit-b16_ln_mln", VIT_B,      "upernet_vit",         "vit_base", VIT_GROUPS),
    "upernet_deit":           case("upernet_vit-b16_ln_mln", DEIT_S,     "upernet_vit",         "deit_small", LAYOUT_ONLY),
    # The zoo's DPT + ViT-B row: its _base_/models/dpt_vit.py is mmseg's dpt_vit-b16 (ViT at
    # 224x224, LN eps 1e-5, class tokens out; DPTHead, no auxiliary head) with 19 classes, BN.
    "dpt":                    case("dpt_vit-b16",            VIT_B,      "dpt",                 "vit_base", VIT_GROUPS),
    # DANet (the zoo's drivable danet_r50-d8 rows; 19 classes here like the other cases): both
    # gammas (mmcv Scale(0)) are seeded at random too, so that the attention blocks count.
    "danet":                  case("danet_r50-d8",           R50,        "danet",               "resnet50c_d8"),
}
# fmt: on
# The cases with logits fixtures (the others record mmseg's key layout and shapes only).
LOGIT_CASES = [name for name, case in CASES.items() if case.get("logits", True)]
# The zoo's mmcls.ConvNeXt of each size (sem_seg/configs/upernet/upernet_convnext-*_bdd100k.py):
# (channels per stage, drop-path rate).
CONVNEXT = {
    "tiny": ([96, 192, 384, 768], 0.4),
    "small": ([96, 192, 384, 768], 0.3),
    "base": ([128, 256, 512, 1024], 0.4),
}
MMCLS0_DOWNSAMPLE_EPS = 1e-5
# HRNet's norms at the end of the first two BasicBlocks of each branch and in its fuse layers (see
# seeded_weights): its activations stay of order ten and several classes win somewhere.
HRNET_DAMPED = re.compile(r"\.branches\.\d+\.[01]\.bn2\.|\.fuse_layers\.")
# The zoo's Swin of each size (sem_seg/configs/sem_seg/upernet_swin-*_bdd100k.py): embed_dims,
# depths, num_heads; drop path 0.3 in all three.
SWIN = {
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
}
# The zoo's ViT (upernet_vit-b, dpt_vit) and DeiT-S (upernet_deit-s): embed_dims, num_heads, drop
# path.
VIT = {"base": (768, 12, 0.0), "small": (384, 6, 0.1)}
# The zoo's paramwise_cfg of its transformer rows (no weight decay on these name substrings).
SWIN_CUSTOM_KEYS = {
    "absolute_pos_embed": {"decay_mult": 0.0},
    "relative_position_bias_table": {"decay_mult": 0.0},
    "norm": {"decay_mult": 0.0},
}
VIT_CUSTOM_KEYS = {
    "pos_embed": {"decay_mult": 0.0},
    "cls_token": {"decay_mult": 0.0},
    "norm": {"decay_mult": 0.0},
}
# Buffers of mmseg's state dicts that are not weights (recomputed from the architecture).
BUFFERS = ("relative_position_index",)
BN = {"type": "BN", "requires_grad": True}  # for SyncBN: the same in eval


# --------------------------------------------------------------------------------------------
# Weights and images, recreated by the tests without mmseg


def seeded_weights(
    shapes: Mapping[str, Sequence[int]], seed: int = SEED
) -> dict[str, torch.Tensor]:
    """Random tensors for an mmseg state dict, each a function of its key, shape and ``seed``.

    Variance-preserving, so that 50+ layers keep activations of order one and every branch
    matters: convs (1d and 2d) and linear layers He-normal (std sqrt(2 / fan-in)), norm scales U(0.5, 1)
    (U(0.1, 0.3) on the last norm of a residual block, on ConvNeXt's layer scales and on HRNet's
    fuse norms, which keeps the residual and fused sums from doubling per block), biases and running means N(0, 0.1), running
    variances U(0.5, 1.5). Buffers that are no weights (:data:`BUFFERS`) are left out.
    """
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith(BUFFERS):
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        name = key.rsplit(".", 1)[-1]
        if name == "num_batches_tracked":
            out[key] = torch.zeros(shape, dtype=torch.long)
        elif name == "running_var":
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif name in ("running_mean", "bias"):
            out[key] = torch.randn(shape, generator=gen) * 0.1
        elif len(shape) in (2, 4) or (len(shape) == 3 and key.startswith("decode_head.1.")):
            fan_in = int(np.prod(shape[1:]))
            out[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif ".bn3." in key or name == "gamma" or HRNET_DAMPED.search(key):
            out[key] = torch.rand(shape, generator=gen) * 0.2 + 0.1
        else:
            out[key] = torch.rand(shape, generator=gen) * 0.5 + 0.5
    return out


def scene(height: int, width: int, seed: int = SEED) -> np.ndarray:
    """A street-like RGB uint8 image: sky gradient, buildings, road with lane marks, a few
    objects, texture and mild noise (structure at every scale, unlike pure noise, so that pooling
    branches see different values at different places)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    horizon = 0.45 * height
    sky = y < horizon
    img[sky] = np.stack(
        [90 + 80 * y / horizon, 140 + 60 * y / horizon, 230 - 20 * y / horizon], -1
    )[sky]
    for _ in range(5):  # buildings
        x0, w = rng.uniform(0, width), rng.uniform(0.1, 0.3) * width
        top = rng.uniform(0.1, 0.4) * height
        mask = (x >= x0) & (x < x0 + w) & (y >= top) & (y < horizon + 0.1 * height)
        img[mask] = rng.uniform(40, 200, 3)
        img[mask & ((y.astype(int) // 3 + x.astype(int) // 4) % 5 == 0)] *= 0.6  # windows
    road = y >= horizon + 0.1 * height
    img[road] = (110 + 15 * np.sin(x / 3.0) * np.cos(y / 5.0))[road, None]
    lane = road & (np.abs(x - width / 2 - (y - height) * 0.3) < 1.5 + y / height * 2)
    img[lane] = 235
    for _ in range(4):  # cars / people
        cy, cx = rng.uniform(0.55, 0.95) * height, rng.uniform(0, width)
        ry, rx = rng.uniform(0.03, 0.1) * height, rng.uniform(0.03, 0.12) * width
        img[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def normalized(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W float, as mmseg's data preprocessor makes it."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def summary(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """What the fixtures keep of C x H x W logits: argmax, the GRID-pixel samples, class means."""
    return {
        "argmax": logits.argmax(0).to(torch.uint8).numpy(),
        "grid": logits[:, ::GRID, ::GRID].numpy().astype(np.float32),
        "mean": logits.double().mean((1, 2)).numpy(),
    }


# --------------------------------------------------------------------------------------------
# mmseg (only here below)


def psamask_kernel(mask: torch.Tensor, psa_type: str, mask_size: Sequence[int]) -> torch.Tensor:
    """mmcv's compiled PSAMask forward (``mmcv/ops/csrc/pytorch/cpu/psamask.cpp``,
    ``psamask_collect_forward`` / ``psamask_distribute_forward``): its loops over the pixels,
    the two innermost loops over the clipped mask window written as one slice."""
    n_, _, hf, wf = mask.shape
    mh, mw = mask_size
    half_h, half_w = (mh - 1) // 2, (mw - 1) // 2
    src = mask.view(n_, mh, mw, hf, wf)
    out = mask.new_zeros(n_, hf, wf, hf, wf)  # [n, other h, other w, h, w] for collect
    for h in range(hf):
        for w in range(wf):
            h0, h1 = max(0, half_h - h), min(mh, hf + half_h - h)
            w0, w1 = max(0, half_w - w), min(mw, wf + half_w - w)
            window = src[:, h0:h1, w0:w1, h, w]
            rows = slice(h0 + h - half_h, h1 + h - half_h)
            cols = slice(w0 + w - half_w, w1 + w - half_w)
            if psa_type == "collect":
                out[:, rows, cols, h, w] = window
            else:
                out[:, h, w, rows, cols] = window
    return out.view(n_, hf * wf, hf, wf)


def modulated_deform_conv_kernel(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    deform_groups: int,
) -> torch.Tensor:
    """mmcv's compiled DCNv2 forward (``mmcv/ops/csrc/pytorch/modulated_deform_conv.cpp``,
    ``modulated_deform_conv_forward``, on ``modulated_deformable_im2col_cpu_kernel`` and
    ``dmcn_im2col_bilinear_cpu`` of ``cpu/modulated_deform_conv.cpp``): the kernel's loop over
    the taps; its loops over the batch, channels and output pixels as tensor ops. Each column
    entry is the input bilinearly sampled at ``(h_in + i * dilation_h + offset_h,
    w_in + j * dilation_w + offset_w)`` (0 unless inside (-1, H) x (-1, W); a neighbour outside
    the image counts 0), times the mask; the output is the grouped weight times the columns,
    plus the bias."""
    n_, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = stride, padding, dilation
    height_col = (height + 2 * pad_h - (dil_h * (kernel_h - 1) + 1)) // stride_h + 1
    width_col = (width + 2 * pad_w - (dil_w * (kernel_w - 1) + 1)) // stride_w + 1
    taps, pixels = kernel_h * kernel_w, height_col * width_col
    per_group = channels // deform_groups  # channel_per_deformable_group
    # data_offset: [b][deform group][2 * tap + (0: h, 1: w)][h_col][w_col]; data_mask: [b][g][tap]
    offsets = offset.reshape(n_, deform_groups, taps, 2, pixels)
    masks = mask.reshape(n_, deform_groups, taps, pixels)
    data_im = x.reshape(n_, deform_groups, per_group, height * width)
    h_in = (torch.arange(height_col) * stride_h - pad_h).repeat_interleave(width_col).to(x)
    w_in = (torch.arange(width_col) * stride_w - pad_w).repeat(height_col).to(x)
    # data_col: row c_im * taps + tap (channel-major), column (h_col, w_col)
    columns = x.new_zeros(n_, deform_groups, per_group, taps, pixels)
    for i in range(kernel_h):
        for j in range(kernel_w):
            tap = i * kernel_w + j
            h_im = h_in + i * dil_h + offsets[:, :, tap, 0]  # [b, g, pixel]
            w_im = w_in + j * dil_w + offsets[:, :, tap, 1]
            h_low, w_low = torch.floor(h_im), torch.floor(w_im)
            lh, lw = h_im - h_low, w_im - w_low
            hh, hw = 1 - lh, 1 - lw
            val = torch.zeros_like(data_im[:, :, :, :pixels])
            for dh, dw, corner_weight in ((0, 0, hh * hw), (0, 1, hh * lw), (1, 0, lh * hw),
                                          (1, 1, lh * lw)):  # fmt: skip  # v1..v4, w1..w4
                row, col = h_low + dh, w_low + dw
                inside = (row >= 0) & (row <= height - 1) & (col >= 0) & (col <= width - 1)
                index = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).long()
                index = index[:, :, None, :].expand(-1, -1, per_group, -1)
                v = torch.where(inside[:, :, None], data_im.gather(3, index), 0.0)
                val = val + corner_weight[:, :, None] * v
            sampled = (h_im > -1) & (w_im > -1) & (h_im < height) & (w_im < width)
            val = torch.where(sampled[:, :, None], val, 0.0)
            columns[:, :, :, tap] = val * masks[:, :, tap, None]
    columns = columns.reshape(n_, groups, channels // groups * taps, pixels)
    out = torch.einsum(
        "gok,ngkp->ngop", weight.reshape(groups, out_channels // groups, -1), columns
    )
    out = out.reshape(n_, out_channels, height_col, width_col)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def mmcv_modulated_deform_conv() -> types.ModuleType:
    """mmcv-lite's own ``mmcv/ops/modulated_deform_conv.py`` (``ModulatedDeformConv2dPack``,
    which registers itself as ``DCNv2`` in mmengine's MODELS, where mmcv's ``build_conv_layer``
    looks it up), its compiled forward replaced by :func:`modulated_deform_conv_kernel`."""
    import importlib.util
    from unittest import mock

    import mmcv
    from mmcv.utils import ext_loader

    def forward(input, weight, bias, ones, offset, mask, output, columns, *, kernel_h, kernel_w,
                stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                deformable_group, with_bias):  # fmt: skip
        assert weight.shape[2:] == (kernel_h, kernel_w)
        output.copy_(
            modulated_deform_conv_kernel(
                input,
                offset,
                mask,
                weight,
                bias if with_bias else None,
                (stride_h, stride_w),
                (pad_h, pad_w),
                (dilation_h, dilation_w),
                group,
                deformable_group,
            )
        )

    compiled = types.SimpleNamespace(
        modulated_deform_conv_forward=forward, modulated_deform_conv_backward=None
    )
    path = Path(mmcv.__file__).parent / "ops" / "modulated_deform_conv.py"
    spec = importlib.util.spec_from_file_location("mmcv.ops.modulated_deform_conv", path)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.object(ext_loader, "load_ext", lambda name, funcs: compiled):
        spec.loader.exec_module(module)
    return module


def mmcv_ops() -> types.ModuleType:
    """A stand-in for ``mmcv.ops`` (mmcv-lite has no compiled ops): mmcv 2.x's own
    ``CrissCrossAttention`` (plain PyTorch, loaded from mmcv's file), ``PSAMask`` on
    :func:`psamask_kernel`, mmcv's DCNv2 on :func:`modulated_deform_conv_kernel`
    (:func:`mmcv_modulated_deform_conv`), and empty classes for the other names mmseg imports."""
    import importlib.util

    import mmcv

    class _Ops(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    class PSAMask(torch.nn.Module):
        def __init__(self, psa_type: str, mask_size: Sequence[int]) -> None:
            super().__init__()
            self.psa_type, self.mask_size = psa_type, tuple(mask_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return psamask_kernel(x, self.psa_type, self.mask_size)

    path = Path(mmcv.__file__).parent / "ops" / "cc_attention.py"
    spec = importlib.util.spec_from_file_location("mmcv_cc_attention", path)
    cc_attention = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc_attention)
    ops = _Ops("mmcv.ops")
    ops.CrissCrossAttention = cc_attention.CrissCrossAttention
    ops.PSAMask = PSAMask
    ops.point_sample = mmcv_point_sample()  # PointHead's: pure Python (grid_sample)
    dcn = mmcv_modulated_deform_conv()  # registers DCNv2
    ops.ModulatedDeformConv2d = dcn.ModulatedDeformConv2d
    ops.ModulatedDeformConv2dPack = dcn.ModulatedDeformConv2dPack
    ops.modulated_deform_conv2d = dcn.modulated_deform_conv2d
    return ops


def import_mmseg() -> Any:
    """``mmseg`` with :func:`mmcv_ops` as ``mmcv.ops``."""
    if "mmcv.ops" not in sys.modules:
        sys.modules["mmcv.ops"] = mmcv_ops()
    import mmseg
    from mmseg.utils import register_all_modules

    register_all_modules()
    return mmseg


def mmcv_point_sample() -> Any:
    """mmcv's ``point_sample``, read from mmcv-lite's own file (which imports only torch), since
    its package ``mmcv.ops`` needs the compiled ops."""
    import importlib.util

    import mmcv

    path = Path(mmcv.__file__).parent / "ops" / "point_sample.py"
    spec = importlib.util.spec_from_file_location("mmcv_point_sample", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.point_sample


def convnext_backbone(model: Any, case: Mapping[str, Any]) -> None:
    """The zoo's ``mmcls.ConvNeXt`` of the case's size (as mmpretrain's) in UPerNet, as its
    sem_seg/configs/_base_/models/upernet_convnext.py and rows put it."""
    import mmpretrain.models  # noqa: F401  (registers mmpretrain.ConvNeXt)

    arch = case["convnext"]
    channels, drop_path = CONVNEXT[arch]
    model.backbone = {"type": "mmpretrain.ConvNeXt", "arch": arch, "out_indices": [0, 1, 2, 3],
                      "drop_path_rate": drop_path, "layer_scale_init_value": 1.0,
                      "gap_before_final_norm": False}  # fmt: skip
    model.decode_head.in_channels = channels
    model.auxiliary_head.in_channels = channels[2]


def hrnet_backbone(model: Any, case: Mapping[str, Any]) -> None:
    """fcn_hr18 with every branch scaled to the case's width (the zoo's fcn_hr48)."""
    widths = [case["hrnet"] * 2**i for i in range(4)]
    model.backbone.norm_cfg = BN
    for stage in (2, 3, 4):
        model.backbone.extra[f"stage{stage}"].num_channels = tuple(widths[:stage])
    model.decode_head.in_channels = widths
    model.decode_head.channels = sum(widths)


def swin_backbone(model: Any, case: Mapping[str, Any]) -> None:
    """The zoo's Swin of the case's size (sem_seg/configs/sem_seg/upernet_swin-*_bdd100k.py)."""
    width, depths, heads = SWIN[case["swin"]]
    model.backbone.update(embed_dims=width, depths=depths, num_heads=heads, drop_path_rate=0.3,
                          use_abs_pos_embed=False)  # fmt: skip
    channels = [width * 2**i for i in range(4)]
    model.decode_head.in_channels = channels
    model.auxiliary_head.in_channels = channels[2]


def vit_backbone(model: Any, case: Mapping[str, Any]) -> None:
    """The zoo's ViT of the case's size (sem_seg/configs/sem_seg/upernet_{vit-b,deit-s}_512x1024_80k_*.py,
    _base_/models/dpt_vit.py); ``patch_bias``: mmseg 0.x's PatchEmbed (the zoo's) has one, mmseg
    1.x's default none."""
    width, heads, drop_path = VIT[case["vit"]]
    model.backbone.update(embed_dims=width, num_heads=heads, drop_path_rate=drop_path,
                          patch_bias=case.get("patch_bias", True))  # fmt: skip
    model.decode_head.in_channels = [width] * 4
    if model.decode_head.type == "DPTHead":  # sem_seg/configs/_base_/models/dpt_vit.py
        model.decode_head.num_classes = 19
    else:
        model.neck.update(in_channels=[width] * 4, out_channels=width)
        model.auxiliary_head.in_channels = width


def resnet_backbone(model: Any, case: Mapping[str, Any]) -> None:
    """mmseg's ResNetV1c of the case's depth (the base configs': 50)."""
    model.backbone.norm_cfg = BN
    model.backbone.depth = case.get("depth", 50)


# A case's backbone family (the key of its mmseg backbone's settings, see CASES) -> what it sets
# in mmseg's model config; a case with none of these keys has a ResNetV1c.
BACKBONE_FAMILIES = {"convnext": convnext_backbone, "hrnet": hrnet_backbone,
                     "swin": swin_backbone, "vit": vit_backbone, "resnet": resnet_backbone}  # fmt: skip


def backbone_family(case: Mapping[str, Any]) -> str:
    """The key of :data:`BACKBONE_FAMILIES` that ``case`` names ("resnet" when none)."""
    return next((family for family in BACKBONE_FAMILIES if family in case), "resnet")


def set_heads(model: Any, case: Mapping[str, Any]) -> None:
    """BN in every head that has a norm, the case's ``align_corners`` (and ``num_classes``,
    when it has one) in every head, and the case's own decode-head settings."""
    heads = [model[k] for k in ("decode_head", "auxiliary_head") if model.get(k)]
    for head in [h for entry in heads for h in (entry if isinstance(entry, list) else [entry])]:
        if head.get("norm_cfg") is not None:  # PointRend's point head has none
            head.norm_cfg = BN
        head.align_corners = case.get("align_corners", False)
        head.num_classes = case.get("num_classes", head.num_classes)  # drivable: 3
    if "decode_head" in case:  # the row's own head settings (PointRend's decode_head is a list)
        model.decode_head.update(case["decode_head"])


def mmseg_config(case: Mapping[str, Any]) -> Any:
    """mmseg's base config of ``case`` with the zoo's settings (BN for SyncBN: the same in eval)."""
    from mmengine import Config

    mmseg = import_mmseg()
    base = Path(mmseg.__file__).parent / ".mim" / "configs" / "_base_" / "models"
    cfg = Config.fromfile(str(base / f"{case['config']}.py"))
    cfg.model.pretrained = None
    BACKBONE_FAMILIES[backbone_family(case)](cfg.model, case)
    set_heads(cfg.model, case)
    cfg.test_pipeline = [
        {"type": "LoadImageFromFile"},
        {"type": "Resize", "scale": PIPELINE_SCALE, "keep_ratio": True},
        {"type": "PackSegInputs"},
    ]
    return cfg


def mmseg_model(case: Mapping[str, Any]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """mmseg's model of ``case`` (eval mode) filled with :func:`seeded_weights`, and those."""
    import_mmseg()
    from mmseg.apis import init_model

    model = init_model(mmseg_config(case), device="cpu")
    if "convnext" in case:  # mmcls 0.x's eps (see the module docstring)
        for layer in list(model.backbone.downsample_layers)[1:]:
            layer[0].eps = MMCLS0_DOWNSAMPLE_EPS
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    weights = seeded_weights(shapes)
    model.load_state_dict(weights, strict=False)  # strict but for the BUFFERS
    assert {k for k in shapes if k not in weights} == {k for k in shapes if k.endswith(BUFFERS)}
    if backbone_family(case) == "vit":  # mmseg 1.x's ViT: no patch bias (see RECIPE_ROWS)
        bias = "backbone.patch_embed.projection.bias" in weights
        assert bias == case.get("patch_bias", True), case
    return model.eval(), weights


def mmseg_logits(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """mmseg's logits at the input size (``encode_decode``: backbone, head, resize)."""
    metas = [{"img_shape": images.shape[1:3], "ori_shape": images.shape[1:3]}] * len(images)
    with torch.no_grad():
        return model.encode_decode(normalized(images), metas)


def mmseg_slide_logits(
    model: torch.nn.Module, images: np.ndarray, crop_size: Sequence[int], stride: Sequence[int]
) -> torch.Tensor:
    """mmseg's sliding-window logits (``slide_inference``) at the input size."""
    from mmengine import ConfigDict

    whole, model.test_cfg = model.test_cfg, ConfigDict(crop_size=crop_size, stride=stride)
    metas = [{"img_shape": images.shape[1:3], "ori_shape": images.shape[1:3]}] * len(images)
    try:
        with torch.no_grad():
            return model.slide_inference(normalized(images), metas)
    finally:
        model.test_cfg = whole  # the pipeline cases test whole images


def mmseg_pipeline_logits(
    model: torch.nn.Module, path: Path, scale: Sequence[int], to_float32: bool = False
) -> torch.Tensor:
    """C x H x W logits of mmseg's whole test pipeline on an image file, at the image's size.
    ``to_float32``: load the image as float before resizing, as the zoo's mmseg 0.x configs do
    (mmseg 1.x, and this project, resize the uint8 image)."""
    from mmseg.apis import inference_model

    model.cfg.test_pipeline[0]["to_float32"] = to_float32
    model.cfg.test_pipeline[1]["scale"] = tuple(scale)
    return inference_model(model, str(path)).seg_logits.data


def resnet_geometry(model: torch.nn.Module, size: Sequence[int]) -> dict[str, Any]:
    """Each stage's output shape at ``size`` and each block's conv2 stride/dilation/padding."""
    backbone = model.backbone
    with torch.no_grad():
        outs = backbone(torch.zeros(1, 3, *size))
    blocks = {
        name: {"stride": list(m.stride), "dilation": list(m.dilation), "padding": list(m.padding)}
        for name, m in backbone.named_modules()
        if name.endswith(".conv2")
    }
    return {"input": list(size), "stage_shapes": [list(o.shape) for o in outs], "conv2": blocks}


def param_group_table(model: torch.nn.Module, custom_keys: Mapping[str, Any]) -> dict:
    """Each parameter's [lr, weight decay] as mmengine's ``DefaultOptimWrapperConstructor``
    gives them under the zoo's transformer recipe (AdamW lr 6e-5, weight decay 0.01,
    ``paramwise_cfg.custom_keys``)."""
    import contextlib
    import io

    from mmengine.optim import DefaultOptimWrapperConstructor

    optimizer = {"type": "AdamW", "lr": 6e-5, "betas": (0.9, 0.999), "weight_decay": 0.01}
    constructor = DefaultOptimWrapperConstructor(
        {"type": "OptimWrapper", "optimizer": optimizer}, {"custom_keys": dict(custom_keys)}
    )
    with contextlib.redirect_stdout(io.StringIO()):
        wrapper = constructor(model)
    names = {id(p): n for n, p in model.named_parameters()}
    table = {names[id(p)]: [g["lr"], g["weight_decay"]]
             for g in wrapper.optimizer.param_groups for p in g["params"]}  # fmt: skip
    assert set(table) == set(names.values())
    return dict(sorted(table.items()))


def write_inputs(out: Path) -> dict[str, np.ndarray]:
    """The input images: ``inputs.npz`` (written when missing, else checked to be equal) and
    ``scene.png`` (written when missing)."""
    from PIL import Image

    inputs = {f"{h}x{w}": scene(h, w, seed=i)[None] for i, (h, w) in enumerate(SIZES)}
    if (out / "inputs.npz").is_file():
        with np.load(out / "inputs.npz") as stored:
            assert all(np.array_equal(stored[k], v) for k, v in inputs.items())
    else:
        np.savez_compressed(out / "inputs.npz", **inputs)
    if not (out / "scene.png").is_file():
        Image.fromarray(scene(*PIPELINE_IMAGE, seed=7)).save(out / "scene.png")
    return inputs


def manifest_entry(
    case: Mapping[str, Any], model: torch.nn.Module, weights: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The case's entry in ``cases.json``: its settings, mmseg's state-dict shapes and, for a
    ResNetV1c, the layer geometry."""
    entry = {**case, "shapes": {k: list(v.shape) for k, v in weights.items()}}
    if backbone_family(case) == "resnet":
        entry["geometry"] = resnet_geometry(model, SIZES[1])
    return entry


def write_param_groups(out: Path, name: str, model: torch.nn.Module, custom_keys: str) -> None:
    """The optimizer's parameter groups of case ``name`` into ``param_groups.json`` (the other
    cases' kept)."""
    path = out / "param_groups.json"
    tables = json.loads(path.read_text()) if path.is_file() else {}
    keys = {"swin": SWIN_CUSTOM_KEYS, "vit": VIT_CUSTOM_KEYS}[custom_keys]
    tables[name] = {"custom_keys": keys, "groups": param_group_table(model, keys)}
    path.write_text(json.dumps(dict(sorted(tables.items())), indent=0))


def case_arrays(
    case: Mapping[str, Any], model: torch.nn.Module, inputs: Mapping[str, np.ndarray], out: Path
) -> dict[str, np.ndarray]:
    """``<case>.npz``: the logits summaries at both SIZES, in the sliding-window test for the
    ``"slide"`` cases, and through the test pipeline on ``scene.png``."""
    arrays: dict[str, np.ndarray] = {}
    for size, images in inputs.items():
        arrays |= {f"{size}_{k}": v for k, v in summary(mmseg_logits(model, images)[0]).items()}
    if case.get("slide"):
        slide = mmseg_slide_logits(model, inputs["{}x{}".format(*SIZES[1])], **SLIDE)
        arrays |= {f"slide_{k}": v for k, v in summary(slide[0]).items()}
    logits = mmseg_pipeline_logits(model, out / "scene.png", PIPELINE_SCALE)
    return arrays | {f"pipeline_{k}": v for k, v in summary(logits).items()}


def write_fixtures(out: Path, cases: Sequence[str]) -> None:
    """The fixtures of ``cases`` (the manifest's other entries kept); the input images are
    written when missing (and must equal what is there otherwise)."""
    out.mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(out)
    path = out / "cases.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"cases": {}}
    manifest["pipeline_scale"] = list(PIPELINE_SCALE)
    for name in cases:
        case = CASES[name]
        model, weights = mmseg_model(case)
        manifest["cases"][name] = manifest_entry(case, model, weights)
        if "custom_keys" in case:
            write_param_groups(out, name, model, case["custom_keys"])
        if name not in LOGIT_CASES:
            print(f"{name}: {len(weights)} tensors (layout only)")
            continue
        arrays = case_arrays(case, model, inputs, out)
        np.savez_compressed(out / f"{name}.npz", **arrays)
        print(
            f"{name}: {len(weights)} tensors, argmax classes {np.unique(arrays['64x128_argmax'])}"
        )
    manifest["cases"] = {
        name: manifest["cases"][name] for name in CASES if name in manifest["cases"]
    }
    path.write_text(json.dumps(manifest, separators=(",", ":")))


# --------------------------------------------------------------------------------------------
# --compare: this project's models on the same weights, whole maps


def project_model(
    name: str, weights: Mapping[str, torch.Tensor], *overrides: str
) -> torch.nn.Module:
    """This project's model of case ``name``: the weights converted as the converter script does
    (the overrides the file implies, then the case's, then ``overrides``)."""
    from semseg.cli import compose_groups
    from semseg.data import dataset_meta
    from semseg.models import mmseg_to_checkpoint, model_from_checkpoint
    from semseg.models.mmseg_conversion import recognise_mmseg

    case = CASES[name]
    arch = recognise_mmseg(weights)
    assert arch.config_groups == case["groups"], (arch.config_groups, case["groups"])
    overrides = [*arch.overrides, *case.get("overrides", []), *overrides]
    config = compose_groups({**arch.config_groups, "dataset": "bdd100k"}, overrides)
    state = mmseg_to_checkpoint(weights, name, config, dataset_meta(config["dataset"]))
    return model_from_checkpoint(state)[0]


def differences(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {
        "max_abs_diff": float((ours - ref).abs().max()),
        "argmax_agreement": float((ours.argmax(0) == ref.argmax(0)).float().mean()),
        "logit_std": float(ref.std()),
    }


def project_pipeline_logits(
    model: torch.nn.Module, path: Path, scale: Sequence[int], **inference: Any
) -> torch.Tensor:
    """What src/predict.py computes for an image file (before its argmax), with the
    ``inference`` settings (mode, windows) of :func:`predict_logits`."""
    from PIL import Image

    from semseg.data import build_eval_transform
    from semseg.evaluation.inference import predict_logits, resize_logits

    image = np.array(Image.open(path).convert("RGB"))
    resized = build_eval_transform(scale)(image=image)["image"]
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)[None]
    with torch.no_grad():
        return resize_logits(model, predict_logits(model, x, **inference), image.shape[:2])[0]


def whole_map_rows(
    ours: torch.nn.Module,
    ref_model: torch.nn.Module,
    images: Mapping[str, np.ndarray],
    suffix: str = "",
) -> dict[str, dict[str, float]]:
    """:func:`differences` of both models' logits on each of ``images``, by size + ``suffix``."""
    return {
        f"{size}{suffix}": differences(ours(torch.from_numpy(im).permute(0, 3, 1, 2))[0],
                                       mmseg_logits(ref_model, im)[0])
        for size, im in images.items()
    }  # fmt: skip


def compare(out: Path, cases: Sequence[str]) -> None:
    """Whole-map differences of ``cases`` into ``comparison.json`` (other cases' rows kept).

    Pipeline rows for every case; ``..._float32_load`` rows measure the zoo's mmseg 0.x loading
    (float image before the resize) against this project's (uint8). ConvNeXt cases: the
    ``..._eps_1e-6`` rows measure mmpretrain 1.x's downsampling-norm eps against mmcls 0.x's.
    """
    from PIL import Image

    from semseg.evaluation.inference import predict_logits

    torch.set_grad_enabled(False)
    big = out.parent / "_scene_640x480.png"  # not committed
    Image.fromarray(scene(480, 640, seed=7)).save(big)
    images = {f"{h}x{w}": scene(h, w, seed=i)[None] for i, (h, w) in enumerate(SIZES)}
    images["512x1024"] = scene(512, 1024, seed=3)[None]
    path = out / "comparison.json"
    report = json.loads(path.read_text()) if path.is_file() else {"cases": {}}
    report["torch"] = torch.__version__
    for name in cases:
        case = CASES[name]
        ref_model, weights = mmseg_model(case)
        ours = project_model(name, weights)
        rows = whole_map_rows(ours, ref_model, images)
        if backbone_family(case) == "convnext":
            eps = project_model(name, weights, "backbone.downsample_norm_eps=1e-6")
            rows |= whole_map_rows(eps, ref_model, images, "_eps_1e-6")
        if case.get("slide"):  # the windows of the fixture, and 320x320 ones on 512x1024
            for size, window in (("75x110", SLIDE), ("512x1024", SLIDE_512X1024)):
                x = torch.from_numpy(images[size]).permute(0, 3, 1, 2)
                rows[f"slide_{size}"] = differences(
                    predict_logits(ours, x, mode="slide", **window)[0],
                    mmseg_slide_logits(ref_model, images[size], **window)[0],
                )
        for label, image, scale, to_float32 in (
            ("pipeline_fixture", out / "scene.png", PIPELINE_SCALE, False),
            ("pipeline_640x480_into_1280x720", big, (1280, 720), False),
            ("pipeline_640x480_into_1280x720_float32_load", big, (1280, 720), True),
        ):
            rows[label] = differences(
                project_pipeline_logits(ours, image, scale),
                mmseg_pipeline_logits(ref_model, image, scale, to_float32),
            )
        report["cases"][name] = rows
        print(name, json.dumps(rows))
    big.unlink()
    path.write_text(json.dumps(report, indent=1))


# --------------------------------------------------------------------------------------------
# --recipe: the test recipe travels with the weights (tests/test_recipe.py)
#
# The zoo's 769x769 rows through mmseg's own BDD100K test pipeline at their real recipe (resize
# into 1281x721, 769x769 sliding windows at stride 513, align_corners=True), on an image that
# becomes two overlapping windows; and an mmseg 1.x ViT file (mmseg 1.x's PatchEmbed has no bias).

RECIPE_FIXTURE = "recipe.npz"  # in --out, with RECIPE_IMAGE's PNG and RECIPE_CFG's text
RECIPE_PNG = "recipe_769.png"
# (h, w): fitted into (1281, 721) keeping its ratio it becomes 1281x205, which 769x769 windows at
# stride 513 cover in 2 overlapping rows (the overlap averaged): the slide test at a small cost.
RECIPE_IMAGE = (100, 16)
# A zoo row's test recipe as mmseg runs it: align_corners in every resize, the test pipeline's
# scale and the test_cfg. The 769x769 rows: resize into 1281x721, 769x769 windows at stride 513.
ROW_769_RECIPE = {
    "align_corners": True,
    "scale": (1281, 721),
    "test_cfg": {"mode": "slide", "crop_size": (769, 769), "stride": (513, 513)},
}
# The zoo's files that --recipe --compare converts (conf/experiment/*769x769*): file name ->
# (the case of its layout, its test recipe).
# fmt: off
ZOO_FILES = {
    "fcn_r50-d8_769x769_40k_sem_seg_bdd100k.pth":           ("fcn", ROW_769_RECIPE),
    "deeplabv3_r50-d8_769x769_40k_sem_seg_bdd100k.pth":     ("deeplabv3", ROW_769_RECIPE),
    "deeplabv3plus_r50-d8_769x769_40k_sem_seg_bdd100k.pth": ("deeplabv3plus", ROW_769_RECIPE),
    "upernet_r50_769x769_40k_sem_seg_bdd100k.pth":          ("upernet_align_corners", ROW_769_RECIPE),
    "gcnet_r50-d8_769x769_40k_sem_seg_bdd100k.pth":         ("gcnet", ROW_769_RECIPE),
    "emanet_r50-d8_769x769_40k_sem_seg_bdd100k.pth":        ("emanet", ROW_769_RECIPE),
    "emanet_r50-d8_769x769_80k_sem_seg_bdd100k.pth":        ("emanet", ROW_769_RECIPE),
    "dmnet_r50-d8_769x769_40k_sem_seg_bdd100k.pth":         ("dmnet", ROW_769_RECIPE),
}
# fmt: on
RECIPE_ROW = "gcnet"  # the row whose pipeline argmax the fixture holds
# The arrays of recipe.npz: key prefix -> (a case, its settings beyond the table's, mmseg's test:
# a test recipe on RECIPE_PNG, or None for encode_decode on the 64x128 input of inputs.npz; the
# keys of :func:`summary` kept). mmseg 1.x's ViT has no patch bias: the zoo's UPerNet + DeiT-S so.
# fmt: off
RECIPE_ROWS = {
    "row769":      (RECIPE_ROW,     {},                    ROW_769_RECIPE, ("argmax",)),
    "vit_no_bias": ("upernet_deit", {"patch_bias": False}, None,           ("argmax", "grid", "mean")),
}
# fmt: on
# --recipe --drivable: a 3-class file laid out and named like the drivable zoo's DANet 769x769
# row (drivable/configs/drivable/danet_r50-d8_769x769_40k_drivable_bdd100k.py: the sem_seg
# recipe, num_classes=3 in both heads) through the same test (tests/test_recipe.py).
DRIVABLE_FIXTURE = "recipe_drivable.npz"  # in --out; its image is RECIPE_PNG
DRIVABLE_FILE = "danet_r50-d8_769x769_40k_drivable_bdd100k.pth"
DRIVABLE_ROW = "danet"
DRIVABLE_CLASSES = 3  # direct, alternative, background
# An mmseg 1.x config text as mmengine writes it to meta['cfg'] (the 769x769 GCNet config).
RECIPE_CFG = "configs/gcnet/gcnet_r50-d8_4xb2-40k_cityscapes-769x769.py"


def recipe_logits(
    name: str, settings: Mapping[str, Any], recipe: Mapping[str, Any], image: Path
) -> torch.Tensor:
    """mmseg's logits of case ``name`` (seeded weights, with ``settings``) through a zoo row's
    test ``recipe``: the whole test pipeline at its scale with its test_cfg, on ``image``."""
    from mmengine import ConfigDict

    case = {**CASES[name], **settings, "align_corners": recipe["align_corners"]}
    model, _ = mmseg_model(case)
    model.test_cfg = ConfigDict(recipe["test_cfg"])
    return mmseg_pipeline_logits(model, image, recipe["scale"])


def recipe_row_arrays(prefix: str, out: Path) -> dict[str, np.ndarray]:
    """The arrays of row ``prefix`` of :data:`RECIPE_ROWS`."""
    name, settings, recipe, kept = RECIPE_ROWS[prefix]
    if recipe is not None:
        logits = recipe_logits(name, settings, recipe, out / RECIPE_PNG)
    else:
        model, _ = mmseg_model({**CASES[name], **settings})
        with np.load(out / "inputs.npz") as inputs:
            logits = mmseg_logits(model, inputs["64x128"])[0]
    return {f"{prefix}_{k}": v for k, v in summary(logits).items() if k in kept}


def write_recipe_fixtures(out: Path) -> None:
    """``recipe.npz``: the arrays of :data:`RECIPE_ROWS` (the test image ``recipe_769.png``);
    ``recipe_mmseg1_cfg.txt``: an mmseg 1.x config text."""
    from mmengine import Config
    from PIL import Image

    mmseg = import_mmseg()
    Image.fromarray(scene(*RECIPE_IMAGE, seed=11)).save(out / RECIPE_PNG)
    arrays = {k: v for prefix in RECIPE_ROWS for k, v in recipe_row_arrays(prefix, out).items()}
    np.savez_compressed(out / RECIPE_FIXTURE, **arrays)
    text = Config.fromfile(str(Path(mmseg.__file__).parent / ".mim" / RECIPE_CFG)).pretty_text
    (out / "recipe_mmseg1_cfg.txt").write_text(text)
    print(f"recipe: {RECIPE_ROW} 769 argmax classes {np.unique(arrays['row769_argmax'])}")


def drivable_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """A 19-class layout's shapes with DRIVABLE_CLASSES in every classifier (``*conv_seg``)."""
    return {
        key: [DRIVABLE_CLASSES, *shape[1:]] if ".conv_seg." in key or "_conv_seg." in key
        else list(shape)
        for key, shape in shapes.items()
    }  # fmt: skip


def write_drivable_fixture(out: Path) -> None:
    """``recipe_drivable.npz``: DRIVABLE_ROW's 3-class 769x769 pipeline argmax on RECIPE_PNG."""
    settings = {"num_classes": DRIVABLE_CLASSES}
    logits = recipe_logits(DRIVABLE_ROW, settings, ROW_769_RECIPE, out / RECIPE_PNG)
    argmax = logits.argmax(0).byte().numpy()
    np.savez_compressed(out / DRIVABLE_FIXTURE, argmax=argmax)
    print(f"drivable: {DRIVABLE_FILE} argmax classes {np.unique(argmax)}")


def compare_recipe(out: Path, sizes: Sequence[tuple[int, int]] = (RECIPE_IMAGE,)) -> None:
    """Every 769x769 row's file (seeded weights, laid out and named as the zoo's), converted
    with no argument beyond IN and OUT and predicted as src/predict.py predicts, against mmseg's
    pipeline at the real recipe: argmax agreement into ``comparison_recipe.json``. ``sizes``:
    the images' (h, w); any landscape image costs two 721x769 windows per model (about four times
    the fixture image's two 769x205 ones)."""
    import importlib.util
    import tempfile

    from PIL import Image

    from semseg.models import model_from_checkpoint

    spec_path = REPO / "scripts" / "convert_mmseg_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_mmseg_checkpoint", spec_path)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    torch.set_grad_enabled(False)
    report: dict[str, Any] = {"torch": torch.__version__, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for i, (h, w) in enumerate(sizes):
            images.append(Path(tmp) / f"scene_{h}x{w}.png")
            Image.fromarray(scene(h, w, seed=11 + i)).save(images[-1])
        for filename, (name, recipe) in ZOO_FILES.items():
            _, weights = mmseg_model(CASES[name])
            torch.save({"state_dict": weights}, Path(tmp) / filename)
            converter.main([str(Path(tmp) / filename), str(Path(tmp) / "converted.pt")])
            model, _, config = model_from_checkpoint(Path(tmp) / "converted.pt")
            kwargs = {k: config["inference"][k] for k in ("mode", "crop_size", "stride")}
            scale = config["dataset"]["test_pipeline"]["scale"]
            rows = {
                path.stem: differences(project_pipeline_logits(model, path, scale, **kwargs),
                                       recipe_logits(name, {}, recipe, path))
                for path in images
            }  # fmt: skip
            report["rows"][filename] = rows
            print(filename, json.dumps(rows))
    (out / "comparison_recipe.json").write_text(json.dumps(report, indent=1))


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture folder")
    parser.add_argument(
        "--compare", action="store_true", help="also compare this project's models (slow)"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="cases to write and compare",
    )
    parser.add_argument(
        "--no-fixtures", action="store_true", help="only compare (the fixtures exist)"
    )
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="only the recipe fixtures (with --compare: every file of ZOO_FILES, converted with "
        "no argument, against mmseg's test pipeline at its recipe)",
    )
    parser.add_argument(
        "--drivable",
        action="store_true",
        help="with --recipe: only the drivable row's fixture (a 3-class DANet 769x769 file)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    if args.recipe and args.drivable:
        write_drivable_fixture(args.out)
        return 0
    if args.recipe:
        if not args.no_fixtures:
            write_recipe_fixtures(args.out)
        if args.compare:
            compare_recipe(args.out)
        return 0
    if not args.no_fixtures:
        write_fixtures(args.out, args.cases)
    if args.compare:
        compare(args.out, [name for name in args.cases if name in LOGIT_CASES])
    return 0


if __name__ == "__main__":
    sys.exit(main())
