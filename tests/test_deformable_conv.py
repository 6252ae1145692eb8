"""Modulated deformable convolution (mmcv's DCNv2) and the zoo's Semantic FPN GN + DCN rows.

The op (semseg.models.ops.ModulatedDeformConv2dPack, on torchvision's deform_conv2d) is checked
against scripts/mmseg_reference.py's transcription of mmcv's CPU im2col
(``modulated_deform_conv_kernel``, what the mmseg reference model runs), with offsets of a pixel
or more (samples leaving the image included) and a varied mask: mmcv starts ``conv_offset`` at
zero, where the op is a plain convolution. The whole GN + DCN model against mmseg 1.2.2:
tests/test_mmseg_exactness.py (case ``semantic_fpn_gn_dcn``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, assert_onnx_equals_model, compose_train, load_script, train_in_process

from semseg.cli import compose_groups
from semseg.errors import CheckpointError, UserError
from semseg.evaluation.export import export_onnx
from semseg.models import build_model
from semseg.models.mmseg_conversion import convert_mmseg_state_dict, recognise_mmseg
from semseg.models.ops import ModulatedDeformConv2dPack

reference = load_script("mmseg_reference")  # the kernel needs no mmseg
MMSEG = json.loads((REPO / "tests/fixtures/mmseg/cases.json").read_text())["cases"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def drawn(module: ModulatedDeformConv2dPack, seed: int = 0) -> ModulatedDeformConv2dPack:
    """``module`` with every tensor drawn at random, ``conv_offset`` giving offsets of about a
    pixel (some samples land outside the image) and mask logits of about +-1.5."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        fan_in = module.conv_offset.weight[0].numel()
        module.conv_offset.weight.mul_(1.5 / fan_in**0.5)
        module.conv_offset.bias.mul_(0.5)
    return module


def mmcv_forward(module: ModulatedDeformConv2dPack, x: torch.Tensor) -> torch.Tensor:
    """mmcv's ``ModulatedDeformConv2dPack.forward``, written out, on the transcribed kernel."""
    o1, o2, mask = torch.chunk(module.conv_offset(x), 3, dim=1)
    offset = torch.cat((o1, o2), dim=1)
    return reference.modulated_deform_conv_kernel(
        x, offset, torch.sigmoid(mask), module.weight, module.bias, module.stride,
        module.padding, module.dilation, module.groups, module.deform_groups,
    )  # fmt: skip


# in, out, kernel, stride, padding, dilation, groups, deform groups, bias, input H x W
GEOMETRIES = {
    "3x3": (8, 6, 3, 1, 1, 1, 1, 1, True, (7, 11)),
    "deform_groups_4": (8, 6, 3, 1, 1, 1, 1, 4, False, (9, 5)),
    "stride_2_odd": (6, 4, 3, 2, 1, 1, 1, 2, True, (13, 9)),
    "dilation_2_padding_2": (12, 8, 3, 1, 2, 2, 1, 3, True, (11, 10)),
    "groups_2_no_padding": (8, 4, 3, 1, 0, 1, 2, 2, True, (6, 9)),
    "rectangular_5x3": (4, 5, (5, 3), (2, 1), (2, 1), 1, 1, 1, False, (10, 7)),
    "1x1": (6, 3, 1, 1, 0, 1, 1, 3, True, (5, 5)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_dcnv2_equals_the_mmcv_kernel(name: str) -> None:
    *geometry, bias, size = GEOMETRIES[name]
    cin, cout, kernel, stride, padding, dilation, groups, deform_groups = geometry
    dcn = drawn(ModulatedDeformConv2dPack(cin, cout, kernel, stride, padding, dilation, groups,
                                          deform_groups, bias=bias))  # fmt: skip
    x = torch.randn(2, cin, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, expected = dcn(x), mmcv_forward(dcn, x)
        offset, mask = torch.tensor_split(
            dcn.conv_offset(x), [2 * dcn.conv_offset.out_channels // 3], 1
        )
    # The draw deforms: offsets of a pixel or so, samples beyond the border, a varied mask.
    assert 0.5 < offset.abs().mean() < 3 and offset.abs().max() > 2
    assert torch.sigmoid(mask).std() > 0.15
    assert ours.shape == expected.shape == F.conv2d(x, dcn.weight, None, stride, padding, dilation,
                                                   groups).shape  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # ... and so it is no plain convolution
    plain = F.conv2d(x, dcn.weight, dcn.bias, stride, padding, dilation, groups)
    assert (ours - plain).abs().max() > 0.5


def test_kernel_layout_dy_before_dx() -> None:
    """The transcription itself: offset channel 2t moves tap t down (dy), 2t + 1 right (dx); an
    integer shift by one row is the convolution padded by 0 rows above and 2 below (not 1 and 1)."""
    x = torch.randn(1, 4, 6, 7)
    weight = torch.randn(5, 4, 3, 3)
    offset = torch.zeros(1, 18, 6, 7)
    offset[:, 0::2] = 1.0  # dy = 1 on every tap
    out = reference.modulated_deform_conv_kernel(
        x, offset, torch.ones(1, 9, 6, 7), weight, None, (1, 1), (1, 1), (1, 1), 1, 1
    )
    expected = F.conv2d(F.pad(x, (1, 1, 0, 2)), weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dcnv2_starts_as_mmcv_with_zero_offsets_and_trains() -> None:
    """mmcv's initialisation: conv_offset all zero (mask 0.5: half a plain convolution), weight
    U(+-1/sqrt(fan-in)), bias 0; gradients reach conv_offset (torchvision's backward)."""
    dcn = ModulatedDeformConv2dPack(8, 6, 3, padding=1)
    assert not dcn.conv_offset.weight.any() and not dcn.conv_offset.bias.any()
    assert dcn.weight.abs().max() <= 1 / (8 * 9) ** 0.5 and not dcn.bias.any()
    x = torch.randn(2, 8, 7, 9)
    plain = F.conv2d(x, dcn.weight, dcn.bias, padding=1)
    torch.testing.assert_close(dcn(x), 0.5 * plain, rtol=1e-5, atol=1e-6)
    dcn(x).square().mean().backward()
    assert dcn.conv_offset.weight.grad.abs().sum() > 0 and torch.isfinite(dcn.weight.grad).all()


# --------------------------------------------------------------------------------------------
# The model and its rows


def small_gn_dcn(**overrides: str) -> torch.nn.Module:
    """A narrow Semantic FPN GN + DCN on ResNet-18 (32-channel neck and head)."""
    torch.manual_seed(0)
    return build_model(
        compose_groups(
            {"model": "semantic_fpn_gn_dcn", "backbone": "resnet18", "dataset": "bdd100k"},
            [
                "backbone.pretrained=false",
                "model.neck.out_channels=32",
                "model.decode_head.channels=32",
            ],
        )
    )


def test_only_the_head_deforms_and_starts_at_zero_offsets() -> None:
    model = small_gn_dcn()
    deformable = [n for n, m in model.named_modules() if isinstance(m, ModulatedDeformConv2dPack)]
    # FPNHead: 1, 1, 2 and 3 ConvModules on P2..P5; the neck and backbone keep plain convs.
    assert len(deformable) == 7 and all(
        n.startswith("decode_head.scale_heads.") for n in deformable
    )
    for name in deformable:
        dcn = model.get_submodule(name)
        assert dcn.bias is None and not dcn.conv_offset.weight.any()  # bias: GN follows
    assert isinstance(model.get_submodule(deformable[0].rsplit(".", 1)[0])[1], torch.nn.GroupNorm)


ROWS = {  # experiment: (mmseg reference case, its conv_offset tensors kept, model, iterations)
    "semantic_fpn_r50_40k_bdd100k": ("semantic_fpn", False, "semantic_fpn", 40_000),
    "semantic_fpn_r50_80k_bdd100k": ("semantic_fpn", False, "semantic_fpn", 80_000),
    "semantic_fpn_r50_gn_40k_bdd100k": ("semantic_fpn_gn_dcn", False, "semantic_fpn_gn", 40_000),
    "semantic_fpn_r50_gn_80k_bdd100k": ("semantic_fpn_gn_dcn", False, "semantic_fpn_gn", 80_000),
    "semantic_fpn_r50_gn_dconv_40k_bdd100k": ("semantic_fpn_gn_dcn", True, "semantic_fpn_gn_dcn",
                                              40_000),
    "semantic_fpn_r50_gn_dconv_80k_bdd100k": ("semantic_fpn_gn_dcn", True, "semantic_fpn_gn_dcn",
                                              80_000),
}  # fmt: skip


@pytest.mark.parametrize("row", list(ROWS))
def test_semantic_fpn_rows_build_mmseg_models(row: str) -> None:
    """Each Semantic FPN row's model is the zoo config's, tensor for tensor (mmseg's state dict in
    the fixtures, converted; the GN rows: the GN + DCN case without conv_offset), the converter
    recognises the row's file as that model, and the recipe is the zoo's."""
    case, deformable, model_name, iterations = ROWS[row]
    cfg = compose_train(f"experiment={row}", "backbone.pretrained=false")
    with torch.device("meta"):
        model = build_model(cfg)
    state = {k: torch.empty(s, device="meta") for k, s in MMSEG[case]["shapes"].items()
             if deformable or ".conv_offset." not in k}  # fmt: skip
    assert recognise_mmseg(state).config_groups == {"model": model_name, "backbone": "resnet50c"}
    converted = convert_mmseg_state_dict(state)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in converted.items()
    }
    assert cfg.backbone.name == "resnet50c" and cfg.model.get("aux_head") is None
    assert cfg.schedule.max_iters == iterations and cfg.optimizer.lr == 0.01
    assert cfg.trainer.eval_interval == iterations // 10
    assert list(cfg.dataset.train_pipeline.crop_size) == [512, 1024]


def test_converter_refuses_deformable_convs_in_the_backbone() -> None:
    """The head's DCNv2 converts; the same file with a deformable conv in the backbone (the
    zoo's "+ DCN" backbones) is refused, naming the key."""
    shapes = MMSEG["semantic_fpn_gn_dcn"]["shapes"]
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert any(".conv_offset." in k for k in convert_mmseg_state_dict(state))
    state["backbone.layer3.0.conv2.conv_offset.weight"] = torch.empty(27, 256, 3, 3, device="meta")
    message = "keys without a mapping (1): backbone.layer3.0.conv2.conv_offset.weight"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_mmseg_state_dict(state)


@pytest.mark.slow
def test_onnx_export_of_deformable_convs(tmp_path: Path) -> None:
    """The GN + DCN model exports to ONNX's DeformConv (opset 19, picked by default) and
    onnxruntime gives PyTorch's logits at two sizes; an older opset is refused in one line."""
    model = small_gn_dcn().eval()
    deformable = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2dPack)]
    for seed, m in enumerate(deformable):
        drawn(m, seed)  # offsets that matter
    with pytest.raises(UserError, match=r"^ONNX opset 18 has no DeformConv, .*--opset 19\)$"):
        export_onnx(model, tmp_path / "old.onnx", 64, 96, opset=18)
    assert not (tmp_path / "old.onnx").exists()
    assert_onnx_equals_model(export_onnx(model, tmp_path / "dcn.onnx", 64, 96), model)


@pytest.mark.slow
def test_gn_dcn_model_trains(toy_root: Path, tmp_path: Path) -> None:
    """A few iterations of the GN + DCN model (narrow ResNet-18) on the toy data: finite loss."""
    train_in_process(
        toy_root, tmp_path, "model=semantic_fpn_gn_dcn", "model.neck.out_channels=32",
        "model.decode_head.channels=32", "trainer.eval_at_end=false",
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
