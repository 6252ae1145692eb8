"""A checkpoint carries its test recipe and the apps follow it: a run validated with sliding
windows is evaluated with them; a converted zoo file records its row's recipe (from the config it
carries, read as text, else its zoo file name), and predicts like mmseg's own test pipeline with
no flags; mmseg 1.x ViT files (no patch bias) convert exactly. The mmseg fixtures come from
scripts/mmseg_reference.py --recipe (mmseg 1.2.2, seeded weights)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, assert_model_zoo_row, data_overrides, load_script, train_in_process
from helpers import entry_config as config
from PIL import Image

from semseg.apps.evaluate import run_evaluate
from semseg.apps.hub_folder import write_hub_folder
from semseg.apps.predict import run_predict
from semseg.checkpoints.file import load_checkpoint
from semseg.checkpoints.model_folder import load_model_checkpoint
from semseg.cli import compose_groups
from semseg.evaluation.inference import INFERENCE_DEFAULTS, inference_recipe
from semseg.models import model_from_checkpoint
from semseg.models.mmseg_recipe import (
    ROW_769,
    MmsegRecipe,
    recipe_from_config_text,
    recipe_from_filename,
)

FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
reference = load_script("mmseg_reference")  # its weight and summary functions need no mmseg
BDD100K_CLASSES = compose_groups({"dataset": "bdd100k"})["dataset"]["class_names"]


# --------------------------------------------------------------------------------------------
# The recipe, key by key


def test_given_keys_win_key_by_key_over_the_recorded_ones() -> None:
    recorded = {"mode": "slide", "crop_size": [769, 769], "stride": [513, 513], "flip": False}
    settings, sources = inference_recipe({"stride": [100, 200], "mode": None}, recorded)
    assert settings == {"mode": "slide", "crop_size": [769, 769], "stride": [100, 200],
                        "flip": False, "scales": [1.0]}  # fmt: skip
    assert sources == {"mode": "checkpoint", "crop_size": "checkpoint", "stride": "command line",
                       "flip": "checkpoint", "scales": "default"}  # fmt: skip
    assert inference_recipe(None, None) == (
        INFERENCE_DEFAULTS,
        dict.fromkeys(INFERENCE_DEFAULTS, "default"),
    )


def test_the_defaults_are_conf_inference_whole() -> None:
    whole = compose_groups({"inference": "whole"})["inference"]
    assert {k: whole[k] for k in INFERENCE_DEFAULTS} == INFERENCE_DEFAULTS
    auto = compose_groups({"inference": "auto"})["inference"]
    assert all(auto[k] is None for k in INFERENCE_DEFAULTS)  # nothing given: the checkpoint's


@pytest.mark.slow
def test_evaluate_py_reproduces_a_slide_validated_run(toy_root: Path, tmp_path: Path, caplog):
    """A run validated with sliding windows: evaluate.py with no inference setting gives its val
    mIoU exactly (whole-image inference another); ``inference.stride`` alone keeps the recorded
    mode and windows; the model-zoo folder records the run's inference (not model_zoo.yaml's),
    its scores and the folder evaluated again are the run's number."""
    run = tmp_path / "run"
    summary = train_in_process(
        toy_root, run, "optimizer.lr=0.05", "inference=slide", "inference.crop_size=[32,48]",
        "inference.stride=[16,40]",
    )  # fmt: skip
    common = [f"checkpoint={run / 'checkpoints/last.pt'}", *data_overrides(toy_root)]
    with caplog.at_level(logging.INFO, logger="semseg"):
        report = run_evaluate(config("evaluate", *common, f"output_dir={tmp_path / 'a'}"))
    assert report["metrics"]["mIoU"] == summary["val/mIoU"]
    assert report["inference"]["mode"] == "slide" and report["inference"]["stride"] == [16, 40]
    assert "mode=slide (checkpoint), crop_size=[32, 48] (checkpoint)" in caplog.text
    whole = run_evaluate(
        config("evaluate", *common, "inference.mode=whole", f"output_dir={tmp_path / 'b'}")
    )
    assert whole["metrics"]["mIoU"] != summary["val/mIoU"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="semseg"):
        strided = run_evaluate(
            config("evaluate", *common, "inference.stride=[32,32]", f"output_dir={tmp_path / 'c'}")
        )
    assert strided["inference"] == {**report["inference"], "stride": [32, 32]}
    assert "stride=[32, 32] (command line)" in caplog.text
    folder = assert_model_zoo_row(run, toy_root, tmp_path / "zoo")
    recorded = yaml.safe_load((folder / "config.yaml").read_text())["inference"]
    assert recorded == report["inference"]
    scores = json.loads((folder / "scores-val.json").read_text())
    assert scores["metrics"]["mIoU"] == summary["val/mIoU"]
    again = run_evaluate(
        config("evaluate", f"checkpoint={folder}", *data_overrides(toy_root),
               f"output_dir={tmp_path / 'd'}")
    )  # fmt: skip
    assert again["metrics"]["mIoU"] == summary["val/mIoU"]


# --------------------------------------------------------------------------------------------
# The converter: the row's recipe from the file's config text, else its zoo file name

# mmseg 0.x's meta['config'] (mmcv's pretty_text) of a zoo fp16 row, cut to what is read, with a
# line that would delete a file if the text were run.
MMSEG0_CONFIG = """
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    decode_head=[dict(type='FCNHead', align_corners=False),
                 dict(type='PointHead', align_corners=True, num_classes=19)],
    test_cfg=dict(mode='slide', crop_size=(769, 769), stride=(513, 513)))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1281, 721),
        flip=False,
        transforms=[dict(type='Resize', keep_ratio=True)])
]
fp16 = dict(loss_scale=512.0)
trap = __import__('os').remove('{trap}')
"""


def test_recipe_from_mmseg0_config_text_never_runs_it(tmp_path: Path) -> None:
    trap = tmp_path / "still_here"
    trap.touch()
    recipe = recipe_from_config_text(MMSEG0_CONFIG.format(trap=trap), "meta['config']")
    assert trap.exists()
    assert recipe == MmsegRecipe("meta['config']", True, "slide", (769, 769), (513, 513),
                                 (1281, 721), "fp16")  # fmt: skip


def test_recipe_from_mmseg1_config_text() -> None:
    """mmseg 1.2.2's own 769x769 GCNet config as mmengine writes it to meta['cfg'] (Cityscapes':
    its test scale is 2049x1025)."""
    text = (FIXTURES / "recipe_mmseg1_cfg.txt").read_text()
    recipe = recipe_from_config_text(text, "meta['cfg']")
    assert recipe == MmsegRecipe("meta['cfg']", True, "slide", (769, 769), (513, 513),
                                 (2049, 1025), "fp32")  # fmt: skip


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gcnet_r50-d8_769x769_40k_sem_seg_bdd100k.pth", ROW_769),
        ("upernet_swin-s_fp16_512x1024_80k_sem_seg_bdd100k.pth", MmsegRecipe("", precision="fp16")),
        ("pspnet_r50-d8_512x1024_40k_sem_seg_bdd100k.pth", MmsegRecipe("")),
        ("my_model.pth", MmsegRecipe("")),
    ],
)  # fmt: skip
def test_recipe_from_zoo_file_name(name: str, expected: MmsegRecipe) -> None:
    recipe = recipe_from_filename(name)
    assert recipe.overrides() == expected.overrides()


def test_converter_records_the_config_in_the_file(tmp_path: Path, capsys) -> None:
    """An mmseg 1.x file with its config text and dataset meta: the recipe and the palette are
    recorded; a file of other classes than --dataset is refused in one line."""
    weights = reference.seeded_weights(CASES["semantic_fpn"]["shapes"])
    palette = [[i, 2 * i, 3 * i] for i in range(19)]
    meta = {"mmengine_version": "0.10.7", "cfg": (FIXTURES / "recipe_mmseg1_cfg.txt").read_text(),
            "dataset_meta": {"classes": BDD100K_CLASSES, "palette": palette}}  # fmt: skip
    src, out = tmp_path / "fpn.pth", tmp_path / "fpn.pt"
    torch.save({"meta": meta, "state_dict": weights}, src)
    converter = load_script("convert_mmseg_checkpoint")
    assert converter.main([str(src), str(out), "inference.stride=[400,400]"]) == 0
    assert "test recipe from the file's meta['cfg'] (mmseg 1.x)" in capsys.readouterr().out
    state = load_checkpoint(out)
    assert state["precision"] == "fp32" and state["meta"]["palette"] == palette
    assert state["config"]["model"]["align_corners"] is True
    assert state["config"]["dataset"]["test_pipeline"]["scale"] == [2049, 1025]
    inference = state["config"]["inference"]
    assert (inference["mode"], inference["crop_size"], inference["stride"]) == (
        "slide", [769, 769], [400, 400]
    )  # fmt: skip
    # ... and travels into a Hub folder, which loads back with it.
    folder = write_hub_folder(str(out), tmp_path / "hub")
    loaded = load_model_checkpoint(folder)
    assert loaded["precision"] == "fp32" and loaded["config"]["inference"] == inference
    assert loaded["config"]["dataset"]["test_pipeline"]["scale"] == [2049, 1025]
    meta["dataset_meta"]["classes"] = ["a"] * 19
    torch.save({"meta": meta, "state_dict": weights}, src)
    with pytest.raises(SystemExit):
        converter.main([str(src), str(out)])
    assert "pick the dataset config it was trained on" in capsys.readouterr().err


def test_converted_769_row_predicts_like_mmseg_with_no_flags(tmp_path: Path, caplog, capsys):
    """A file laid out and named like the zoo's GCNet 769x769 row (no meta, as the zoo publishes
    them), converted with IN and OUT only, then src/predict.py with no inference setting: mmseg's
    BDD100K test pipeline at the row's recipe (1281x721, 769x769 windows at stride 513,
    align_corners=True; two overlapping windows here) gives the same mask."""
    weights = reference.seeded_weights(CASES[reference.RECIPE_ROW]["shapes"])
    src = tmp_path / "gcnet_r50-d8_769x769_40k_sem_seg_bdd100k.pth"
    torch.save({"state_dict": weights}, src)
    out = tmp_path / "gcnet.pt"
    assert load_script("convert_mmseg_checkpoint").main([str(src), str(out)]) == 0
    assert "a 769x769 row" in capsys.readouterr().out
    images = tmp_path / "images"
    images.mkdir()
    (images / "scene.png").write_bytes((FIXTURES / reference.RECIPE_PNG).read_bytes())
    cfg = config("predict", f"checkpoint={out}", f"input_dir={images}", f"output_dir={tmp_path}")
    with caplog.at_level(logging.INFO, logger="semseg"):
        masks = run_predict(cfg) / "masks"
    assert (
        "mode=slide (checkpoint), crop_size=[769, 769] (checkpoint), stride=[513, 513]"
        in caplog.text
    )
    assert "test scale 1281x721 (checkpoint), model.align_corners=True" in caplog.text
    assert "in fp32" in caplog.text
    mask = np.array(Image.open(masks / "scene.png"))
    expected = np.load(FIXTURES / reference.RECIPE_FIXTURE)["row769_argmax"]
    assert len(np.unique(expected)) >= 3
    assert mask.shape == expected.shape
    assert (mask == expected).mean() >= 0.999


# --------------------------------------------------------------------------------------------
# Drivable-area files: 3 classes, recognised with no --dataset

DRIVABLE = compose_groups({"dataset": "bdd100k_drivable"})["dataset"]


@pytest.mark.parametrize(
    ("meta", "palette"),
    [
        ({}, DRIVABLE["palette"]),  # the zoo's files: no meta, the class count decides
        ({"CLASSES": DRIVABLE["class_names"], "PALETTE": [[1, 2, 3]] * 3}, [[1, 2, 3]] * 3),
        ({"mmengine_version": "0.10.7", "dataset_meta": {"classes": DRIVABLE["class_names"],
          "palette": [[4, 5, 6]] * 3}}, [[4, 5, 6]] * 3),
    ],
    ids=["class-count", "mmseg0-meta", "mmseg1-dataset-meta"],
)  # fmt: skip
def test_a_3_class_file_converts_as_a_drivable_model(tmp_path: Path, capsys, meta, palette):
    """A 3-class file is a drivable model with no flag: the drivable dataset (classes, palette,
    the toolkit's task and "ignored" class) from its meta's class names, else from its class
    count; a file with a palette of its own keeps it."""
    weights = reference.seeded_weights(reference.drivable_shapes(CASES["semantic_fpn"]["shapes"]))
    src, out = tmp_path / "fpn_r50_512x1024_40k_drivable_bdd100k.pth", tmp_path / "fpn.pt"
    torch.save({"meta": meta, "state_dict": weights}, src)
    assert load_script("convert_mmseg_checkpoint").main([str(src), str(out)]) == 0
    why = "class names" if meta else "3 classes"
    assert f"dataset=bdd100k_drivable (from the file's {why})" in capsys.readouterr().out
    state = load_checkpoint(out)
    assert state["meta"]["class_names"] == ["direct", "alternative", "background"]
    assert state["meta"]["palette"] == palette
    assert state["meta"]["toolkit_ignored_class"] == "background"
    dataset = state["config"]["dataset"]
    assert (dataset["name"], dataset["toolkit_task"], dataset["num_classes"]) == (
        "bdd100k_drivable", "drivable", 3
    )  # fmt: skip


def test_a_file_of_no_zoo_class_count_asks_for_the_dataset(tmp_path: Path, capsys) -> None:
    shapes = {k: [7, *v[1:]] if "conv_seg" in k else v
              for k, v in CASES["semantic_fpn"]["shapes"].items()}  # fmt: skip
    src = tmp_path / "fpn.pth"
    torch.save({"state_dict": reference.seeded_weights(shapes)}, src)
    with pytest.raises(SystemExit):
        load_script("convert_mmseg_checkpoint").main([str(src), str(tmp_path / "fpn.pt")])
    err = capsys.readouterr().err
    assert "has 7 classes, which no zoo dataset" in err and "--dataset NAME" in err
    assert not (tmp_path / "fpn.pt").exists()


def test_converted_drivable_row_predicts_like_mmseg_with_no_flags(tmp_path: Path, capsys):
    """A file laid out and named like the drivable zoo's DANet 769x769 row (3 classes, no meta),
    converted with IN and OUT only, then src/predict.py with no flags: mmseg's test pipeline at
    the row's recipe gives the same mask (scripts/mmseg_reference.py --recipe --drivable), the
    masks hold drivable ids and the test-server file is the toolkit's drivable.json."""
    shapes = reference.drivable_shapes(CASES[reference.DRIVABLE_ROW]["shapes"])
    src, out = tmp_path / reference.DRIVABLE_FILE, tmp_path / "danet.pt"
    torch.save({"state_dict": reference.seeded_weights(shapes)}, src)
    assert load_script("convert_mmseg_checkpoint").main([str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dataset=bdd100k_drivable (from the file's 3 classes)" in printed
    assert "a 769x769 row" in printed and "test scale 1281x721" in printed
    images = tmp_path / "images"
    images.mkdir()
    (images / "scene.png").write_bytes((FIXTURES / reference.RECIPE_PNG).read_bytes())
    cfg = config("predict", f"checkpoint={out}", f"input_dir={images}", f"output_dir={tmp_path}")
    predicted = run_predict(cfg)
    mask = np.array(Image.open(predicted / "masks" / "scene.png"))
    expected = np.load(FIXTURES / reference.DRIVABLE_FIXTURE)["argmax"]
    assert len(np.unique(expected)) >= 2
    assert mask.shape == expected.shape
    assert (mask == expected).mean() >= 0.999
    assert set(np.unique(mask)) <= {0, 1, 2}
    frames = json.loads((predicted / "submission" / "drivable.json").read_text())["frames"]
    assert [f["name"] for f in frames] == ["scene.png"]
    labels = {label["category"] for label in frames[0]["labels"]}
    assert labels == {("direct", "alternative", "background")[c] for c in np.unique(mask)} - {
        "background"
    }


# --------------------------------------------------------------------------------------------
# mmseg 1.x ViT files: no bias in the patch embedding


def test_mmseg1_vit_without_patch_bias_converts_exactly(
    tmp_path: Path, inputs_64x128: torch.Tensor
) -> None:
    shapes = dict(CASES["upernet_deit"]["shapes"])
    del shapes["backbone.patch_embed.projection.bias"]
    weights = reference.seeded_weights(shapes)
    src, out = tmp_path / "upernet_deit-s.pth", tmp_path / "upernet_deit-s.pt"
    torch.save({"meta": {"mmengine_version": "0.10.7"}, "state_dict": weights}, src)
    assert load_script("convert_mmseg_checkpoint").main([str(src), str(out)]) == 0
    model, _, config_ = model_from_checkpoint(out)
    assert config_["backbone"]["patch_bias"] is False
    ref = np.load(FIXTURES / reference.RECIPE_FIXTURE)
    with torch.no_grad():
        ours = reference.summary(model(inputs_64x128)[0].float())
    assert len(np.unique(ref["vit_no_bias_argmax"])) >= 3
    assert np.abs(ours["grid"] - ref["vit_no_bias_grid"]).max() < 1e-3
    assert (ours["argmax"] == ref["vit_no_bias_argmax"]).mean() >= 0.999


@pytest.fixture
def inputs_64x128() -> torch.Tensor:
    with np.load(FIXTURES / "inputs.npz") as data:
        return torch.from_numpy(data["64x128"]).permute(0, 3, 1, 2)
