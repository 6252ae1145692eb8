"""Converted mmseg models give mmseg's logits, layer for layer.

The fixtures (tests/fixtures/mmseg/) come from mmsegmentation 1.2.2's own models (UPerNet on
ConvNeXt: with mmpretrain 1.2.0's ConvNeXt, set to mmcls 0.x's numbers), built from its base
configs with the BDD100K zoo's settings and filled with seeded random weights
(scripts/mmseg_reference.py, run in a virtualenv with mmseg). Here the same weights are recreated
without mmseg, converted as scripts/convert_mmseg_checkpoint.py converts a file, and run in this
project's models: the logits must agree (max abs difference < 1e-3 on a 6-pixel grid, argmax
agreement >= 99.9% on whole maps), at a size stride 32 divides and one it does not, and through
the prediction path of src/predict.py (keep-ratio resize into the test scale, logits resized back
as the model resizes: align_corners on the zoo's 769x769 rows) on the PNG file mmseg's test
pipeline read, and for the 769x769 rows of the context heads through sliding-window inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, load_script
from hydra import compose, initialize_config_dir
from PIL import Image

from semseg.apps.predict import run_predict
from semseg.checkpoints.file import save_checkpoint
from semseg.cli import compose_groups
from semseg.data import build_eval_transform, dataset_meta
from semseg.evaluation.inference import predict_logits, resize_logits
from semseg.models import mmseg_to_checkpoint, model_from_checkpoint
from semseg.models.backbone import TimmBackbone
from semseg.models.mmseg_conversion import recognise_mmseg
from semseg.models.ops import ModulatedDeformConv2dPack

FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
MANIFEST = json.loads((FIXTURES / "cases.json").read_text())
CASES = MANIFEST["cases"]
LOGIT_CASES = [name for name, case in CASES.items() if case.get("logits", True)]
PIPELINE_SCALE = MANIFEST["pipeline_scale"]
reference = load_script("mmseg_reference")  # its weight and summary functions need no mmseg

MAX_ABS_DIFF = 1e-3
MIN_ARGMAX_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    """The structured images mmseg read, N x 3 x H x W uint8, by size."""
    with np.load(FIXTURES / "inputs.npz") as data:
        return {size: torch.from_numpy(data[size]).permute(0, 3, 1, 2) for size in data.files}


def converted(name: str, meta: dict | None = None) -> dict:
    """Case ``name``'s seeded mmseg weights as a checkpoint of this project (the converter's way:
    the architecture recognised from the file, its config groups composed with the overrides the
    file implies, weights loaded); ``meta``: the file's (none: a bare state dict)."""
    case = CASES[name]
    weights = reference.seeded_weights(case["shapes"])
    checkpoint = weights if meta is None else {"meta": meta, "state_dict": weights}
    arch = recognise_mmseg(checkpoint)
    assert arch.config_groups == case["groups"]
    overrides = [*arch.overrides, *case.get("overrides", [])]
    config = compose_groups({**arch.config_groups, "dataset": "bdd100k"}, overrides)
    return mmseg_to_checkpoint(checkpoint, name, config, dataset_meta(config["dataset"]))


def assert_matches(logits: torch.Tensor, ref: np.lib.npyio.NpzFile, prefix: str) -> None:
    """C x H x W logits against mmseg's summary (argmax, grid samples, class means)."""
    ours = reference.summary(logits.float())
    expected_argmax = ref[f"{prefix}_argmax"]
    # The reference is not degenerate: several classes win somewhere, logits spread.
    assert len(np.unique(expected_argmax)) >= 3
    assert ref[f"{prefix}_grid"].std() > 0.1
    assert ours["argmax"].shape == expected_argmax.shape
    diff = np.abs(ours["grid"] - ref[f"{prefix}_grid"]).max()
    agreement = (ours["argmax"] == expected_argmax).mean()
    assert diff < MAX_ABS_DIFF, f"{prefix}: max abs logit difference {diff:.2e}"
    assert agreement >= MIN_ARGMAX_AGREEMENT, f"{prefix}: argmax agreement {agreement:.5f}"
    # per-class means of logits up to ~100 (DPT): float32 sums differ by thread count
    np.testing.assert_allclose(ours["mean"], ref[f"{prefix}_mean"], atol=1e-4, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", LOGIT_CASES)
def test_logits_equal_mmseg(name: str, inputs: dict[str, torch.Tensor]) -> None:
    model, _, _ = model_from_checkpoint(converted(name))
    ref = np.load(FIXTURES / f"{name}.npz")
    with torch.no_grad():
        for size, images in inputs.items():
            assert_matches(model(images)[0], ref, size)
        # What src/predict.py computes for an image file.
        image = np.array(Image.open(FIXTURES / "scene.png").convert("RGB"))
        resized = build_eval_transform(PIPELINE_SCALE)(image=image)["image"]
        x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)[None]
        logits = resize_logits(model, predict_logits(model, x), image.shape[:2])[0]
        assert_matches(logits, ref, "pipeline")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pspnet", "upernet_align_corners", "upernet_convnext", "dpt"])
def test_predict_entry_point_writes_mmseg_argmax(name: str, tmp_path: Path) -> None:
    """src/predict.py's runner on the PNG, with a converted checkpoint file: the mask it writes
    is mmseg's test-pipeline argmax (on the 769x769 rows' model too, whose final resize has
    align_corners=True; on DPT, whose ViT returns its class tokens)."""
    checkpoint = save_checkpoint(converted(name), tmp_path / f"{name}.pt")
    images = tmp_path / "images"
    images.mkdir()
    (images / "scene.png").write_bytes((FIXTURES / "scene.png").read_bytes())
    overrides = [
        f"checkpoint={checkpoint}", f"input_dir={images}", f"output_dir={tmp_path / 'out'}",
        f"dataset.test_pipeline.scale=[{PIPELINE_SCALE[0]},{PIPELINE_SCALE[1]}]",
        "inference.precision=fp32", "device=cpu",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        out = run_predict(compose(config_name="predict", overrides=overrides))
    mask = np.array(Image.open(out / "masks" / "scene.png"))
    expected = np.load(FIXTURES / f"{name}.npz")["pipeline_argmax"]
    assert mask.shape == expected.shape
    assert (mask == expected).mean() >= MIN_ARGMAX_AGREEMENT


@pytest.mark.parametrize("name", ["fcn", "deeplabv3plus_r101", "upernet"])
def test_backbone_geometry_equals_mmseg_resnet_v1c(name: str) -> None:
    """resnet50c_d8 / resnet101c_d8 / resnet50c (timm) against mmseg's ResNetV1c of the case
    (D8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation): every stage's output
    shape at an odd input size, every block's 3x3 conv stride, dilation and padding."""
    case = CASES[name]
    geometry = case["geometry"]
    backbone = instantiate_backbone(case["groups"]["backbone"])
    with torch.device("meta"):
        outs = backbone(torch.zeros(1, 3, *geometry["input"], device="meta"))
    assert [list(o.shape) for o in outs] == geometry["stage_shapes"]
    ours = {
        name.removeprefix("model."): {
            "stride": list(m.stride), "dilation": list(m.dilation), "padding": list(m.padding)
        }
        for name, m in backbone.named_modules()
        if name.endswith(".conv2")
    }  # fmt: skip
    assert ours == geometry["conv2"]
    if "d8" in case["groups"]["backbone"]:  # contract_dilation: first blocks dilate by 1 and 2
        assert ours["layer3.0.conv2"]["dilation"] == [1, 1]
        assert ours["layer4.0.conv2"]["dilation"] == [2, 2]
        assert ours["layer4.1.conv2"]["dilation"] == [4, 4]


def instantiate_backbone(config_name: str) -> TimmBackbone:
    """A backbone config of conf/backbone on the meta device (shapes only)."""
    from hydra.utils import instantiate

    config = compose_groups({"backbone": config_name}, ["backbone.pretrained=false"])
    with torch.device("meta"):
        return instantiate(config["backbone"])


SLIDE_CASES = [name for name, case in CASES.items() if case.get("slide")]


@pytest.mark.slow
@pytest.mark.parametrize("name", SLIDE_CASES)
def test_sliding_window_logits_equal_mmseg(name: str, inputs: dict[str, torch.Tensor]) -> None:
    """The zoo's 769x769 rows test with sliding windows: this project's slide inference
    (inference=slide) gives mmseg's ``slide_inference`` logits (2 x 3 overlapping windows, clamped
    at the borders, averaged), with the case's align_corners=True."""
    model, _, _ = model_from_checkpoint(converted(name))
    assert model.align_corners
    ref = np.load(FIXTURES / f"{name}.npz")
    images = inputs["{}x{}".format(*reference.SIZES[1])]
    with torch.no_grad():
        logits = predict_logits(model, images, mode="slide", **reference.SLIDE)[0]
    assert_matches(logits, ref, "slide")


@pytest.mark.slow
def test_gn_dcn_case_tests_the_deformation(inputs: dict[str, torch.Tensor]) -> None:
    """The GN + DCN case checks deformable convs, not plain ones: mmcv starts ``conv_offset`` at
    zero, the seeded weights draw it (offsets of a pixel or so, a varied mask), and with it zeroed
    the logits are far from mmseg's."""
    model, _, _ = model_from_checkpoint(converted("semantic_fpn_gn_dcn"))
    deformable = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2dPack)]
    outputs: list[torch.Tensor] = []
    for m in deformable:
        m.conv_offset.register_forward_hook(lambda module, args, out: outputs.append(out))
    images = inputs["64x128"]
    with torch.no_grad():
        logits = model(images)[0]
    assert len(deformable) == len(outputs) == 7
    for out in outputs:
        offset, mask = (
            out[:, : 2 * out.shape[1] // 3],
            torch.sigmoid(out[:, 2 * out.shape[1] // 3 :]),
        )
        assert 0.3 < offset.abs().mean() < 5 and mask.std() > 0.1
    ref = np.load(FIXTURES / "semantic_fpn_gn_dcn.npz")
    assert_matches(logits, ref, "64x128")
    for m in deformable:
        torch.nn.init.zeros_(m.conv_offset.weight), torch.nn.init.zeros_(m.conv_offset.bias)
    with torch.no_grad():
        plain = reference.summary(model(images)[0])
    assert np.abs(plain["grid"] - ref["64x128_grid"]).max() > 0.5
