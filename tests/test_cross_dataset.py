"""Train a few iterations on each layout, evaluate across layouts, and evaluate at the training scale."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import SMOKE_ITERS
from helpers import entry_config as config
from omegaconf import DictConfig, OmegaConf

from semseg.apps.evaluate import run_evaluate
from semseg.apps.predict import run_predict
from semseg.data import build_dataset, make_toy_bdd100k
from semseg.errors import ConfigError

LAYOUTS = ("bdd100k", "cityscapes", "folder")


@pytest.fixture(scope="module")
def roots(toy_layout) -> dict[str, Path]:
    """The three toy layouts, 8 / 4 / 2 scenes of 64x128 each."""
    return {layout: toy_layout(layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def checkpoints(smoke_run) -> dict[str, Path]:
    """last.pt of the session's smoke run on each layout."""
    return {layout: smoke_run(layout) / "checkpoints" / "last.pt" for layout in LAYOUTS}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_smoke_training_on_each_layout(smoke_run, layout):
    """Each layout trains end to end and ends with its own evaluation."""
    summary = json.loads((smoke_run(layout) / "summary.json").read_text())
    assert 0.0 <= summary["val/mIoU"] <= 1.0 and summary["steps"] == SMOKE_ITERS


def labelled_pixels(dataset_cfg: DictConfig) -> int:
    """Pixels with a train id (not 255) in the val split, read through the dataset."""
    ds = build_dataset(dataset_cfg, "val", train=False)
    return sum(int((ds[i]["mask"] != 255).sum()) for i in range(len(ds)))


@pytest.mark.parametrize(
    ("trained_on", "evaluated_on"),
    [("bdd100k", "cityscapes"), ("cityscapes", "bdd100k"), ("folder", "cityscapes")],
)
def test_evaluate_across_layouts(checkpoints, roots, tmp_path, trained_on, evaluated_on):
    cfg = config(
        "evaluate", f"checkpoint={checkpoints[trained_on]}", f"dataset=toy_{evaluated_on}",
        f"dataset.root={roots[evaluated_on]}", "dataset.num_workers=0", "device=cpu",
        f"output_dir={tmp_path}",
    )  # fmt: skip
    report = run_evaluate(cfg)
    assert report["scale"] == [128, 64]  # the smoke runs' training base scale
    # Every labelled pixel is scored once; Cityscapes' ego vehicle / border / out of roi never are.
    assert np.sum(report["confusion_matrix"]) == labelled_pixels(cfg.dataset)
    assert 0.0 <= report["metrics"]["mIoU"] <= 1.0 and "IoU/traffic light" in report["metrics"]
    assert json.loads((tmp_path / "eval_val.json").read_text()) == report


def test_other_class_names_stop_with_the_differences(checkpoints, roots, tmp_path):
    """One line naming only the differing classes (the exit code 2 of a ConfigError is checked
    once for evaluate.py in test_evaluate_cli)."""
    names = ["road", "sidewalk", "building", "walls", "fence", "pole", "traffic light",
             "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
             "bus", "train", "motorcycle", "bike"]  # fmt: skip
    cfg = config(
        "evaluate", f"checkpoint={checkpoints['bdd100k']}", "dataset=toy_folder",
        f"dataset.root={roots['folder']}", f"dataset.class_names=[{','.join(names)}]",
        f"output_dir={tmp_path}", "device=cpu",
    )  # fmt: skip
    with pytest.raises(ConfigError) as error:
        run_evaluate(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert (
        "3: 'wall' (checkpoint) vs 'walls' (dataset); 18: 'bicycle' (checkpoint) vs 'bike'"
        in message
    )
    assert "dataset=toy_folder" in message and "'road'" not in message


@pytest.mark.slow
def test_evaluation_runs_at_the_training_scale(checkpoints, tmp_path, caplog):
    """Trained at 128x64, evaluated on 256x128 scenes: images are fitted into 128x64, the metric
    is computed at the labels' 256x128, and the scale is reported; an explicit scale wins."""
    root = make_toy_bdd100k(
        tmp_path / "big", 1, 2, 1, height=128, width=256, seed=9, progress=False
    )
    common = [f"checkpoint={checkpoints['bdd100k']}", "dataset=toy_bdd100k", f"dataset.root={root}",
              "dataset.num_workers=0", "device=cpu"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="semseg"):
        report = run_evaluate(config("evaluate", *common, f"output_dir={tmp_path / 'run'}"))
    assert any("evaluating at scale 128x64" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "run" / "eval_val.json").read_text()) == report
    assert report["scale"] == [128, 64]
    masks = [
        cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        for p in (root / "labels/sem_seg/masks/val").glob("*.png")
    ]
    assert np.sum(report["confusion_matrix"]) == sum(int((m != 255).sum()) for m in masks)

    cfg = config(
        "evaluate", *common, "dataset.test_pipeline.scale=[256,128]", f"output_dir={tmp_path / 'x'}"
    )
    assert run_evaluate(cfg)["scale"] == [256, 128]

    # What the model sees: the image at the training scale, the label at its own size.
    dataset_cfg = OmegaConf.merge(cfg.dataset, {"test_pipeline": {"scale": [128, 64]}})
    item = build_dataset(dataset_cfg, "val", train=False)[0]
    assert item["image"].shape == (3, 64, 128) and item["mask"].shape == (128, 256)
    assert item["size"].tolist() == [128, 256]

    # Predictions are written at the size of the images read.
    out = run_predict(config("predict", *common, "dataset.split=test", "overlays=true",
                             f"output_dir={tmp_path / 'pred'}"))  # fmt: skip
    for sub, ext in (("masks", "png"), ("overlays", "jpg")):
        (written,) = (out / sub).glob(f"*.{ext}")
        assert cv2.imread(str(written)).shape[:2] == (128, 256)
