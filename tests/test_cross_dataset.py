"""Train a few iterations on each layout, evaluate across layouts, and evaluate at the training scale."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, run_entry, smoke_overrides
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from semseg.data import build_dataset, make_toy_bdd100k, make_toy_cityscapes, make_toy_folder
from semseg.evaluation.runner import run_evaluate, run_predict


def config(name: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="module")
def roots(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three toy layouts, 8 / 4 / 2 scenes of 64x128 each."""
    base = tmp_path_factory.mktemp("layouts")
    size = dict(num_train=8, num_val=4, num_test=2, height=64, width=128, seed=0, progress=False)
    return {
        "bdd100k": toy_root,
        "cityscapes": make_toy_cityscapes(base / "cityscapes", **size),
        "folder": make_toy_folder(base / "folder", **size),
    }


@pytest.fixture(scope="module")
def checkpoints(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4-iteration smoke run on each layout (ending with its own evaluation)."""
    out = {}
    for layout, root in roots.items():
        run_dir = tmp_path_factory.mktemp(f"train_{layout}")
        run_entry("train.py", *smoke_overrides(root, run_dir, f"dataset=toy_{layout}"))
        summary = json.loads((run_dir / "summary.json").read_text())
        assert 0.0 <= summary["val/mIoU"] <= 1.0 and summary["steps"] == 4
        out[layout] = run_dir / "checkpoints" / "last.pt"
    return out


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
    names = ["road", "sidewalk", "building", "walls", "fence", "pole", "traffic light",
             "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
             "bus", "train", "motorcycle", "bike"]  # fmt: skip
    proc = run_entry(
        "evaluate.py", f"checkpoint={checkpoints['bdd100k']}", "dataset=toy_folder",
        f"dataset.root={roots['folder']}", f"dataset.class_names=[{','.join(names)}]",
        f"hydra.run.dir={tmp_path}", "device=cpu", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert (
        "3: 'wall' (checkpoint) vs 'walls' (dataset); 18: 'bicycle' (checkpoint) vs 'bike'"
        in lines[0]
    )
    assert "dataset=toy_folder" in lines[0] and "'road'" not in lines[0]


def test_evaluation_runs_at_the_training_scale(checkpoints, tmp_path):
    """Trained at 128x64, evaluated on 256x128 scenes: images are fitted into 128x64, the metric
    is computed at the labels' 256x128, and the scale is reported; an explicit scale wins."""
    root = make_toy_bdd100k(
        tmp_path / "big", 1, 2, 1, height=128, width=256, seed=9, progress=False
    )
    common = [f"checkpoint={checkpoints['bdd100k']}", "dataset=toy_bdd100k", f"dataset.root={root}",
              "dataset.num_workers=0", "device=cpu"]  # fmt: skip
    proc = run_entry("evaluate.py", *common, f"hydra.run.dir={tmp_path / 'run'}")
    assert "evaluating at scale 128x64" in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "run" / "eval_val.json").read_text())
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
