"""src/evaluate.py and src/predict.py end to end on the tiny generated dataset, and bad input."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import data_overrides, run_entry, tiny_checkpoint
from helpers import entry_config as config
from PIL import Image

from semseg.apps.evaluate import run_evaluate
from semseg.apps.predict import run_predict
from semseg.errors import ConfigError, UserError


def test_evaluate_checkpoint(checkpoint: Path, toy_root: Path, tmp_path: Path, caplog) -> None:
    """evaluate.py's work, in this process (the command line itself: the tests below)."""
    with caplog.at_level(logging.INFO, logger="semseg"):
        report = run_evaluate(
            config("evaluate", f"checkpoint={checkpoint}", *data_overrides(toy_root),
                   f"output_dir={tmp_path / 'run'}")
        )  # fmt: skip
    assert "traffic light" in caplog.text and "mIoU" in caplog.text
    assert report == json.loads((tmp_path / "run" / "eval_val.json").read_text())
    assert report == json.loads((checkpoint.parent / "eval_val.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) >= {"mIoU", "pixel_acc", "fIoU", "IoU/road", "IoU/traffic light"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert np.sum(report["confusion_matrix"]) > 0
    assert report["inference"]["mode"] == "whole"

    # the same model's predictions written as PNG masks and scored as folders: same numbers
    pred_dir = run_predict(
        config("predict", f"checkpoint={checkpoint}", *data_overrides(toy_root),
               f"output_dir={tmp_path / 'pred'}")
    )  # fmt: skip
    gt_dir = toy_root / "labels" / "sem_seg" / "masks" / "val"
    folder = run_evaluate(
        config("evaluate", f"gt_dir={gt_dir}", f"pred_dir={pred_dir / 'masks'}",
               f"output_dir={tmp_path / 'folder'}")
    )  # fmt: skip
    assert json.loads((tmp_path / "folder" / "eval_folder.json").read_text()) == folder
    assert folder["confusion_matrix"] == report["confusion_matrix"]
    assert folder["metrics"] == pytest.approx(metrics, abs=1e-12)


@pytest.mark.slow
def test_predict_test_split_writes_bdd100k_files(
    checkpoint: Path, toy_root: Path, tmp_path: Path
) -> None:
    """The command line: Hydra's run folder and its log lines on stdout."""
    proc = run_entry(
        "predict.py", f"checkpoint={checkpoint}", *data_overrides(toy_root, "test"),
        "overlays=true", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    out = tmp_path / "run" / "predictions"
    assert f"wrote 2 predictions to {out}" in proc.stdout
    stems = sorted(p.stem for p in (toy_root / "images" / "10k" / "test").glob("*.jpg"))
    for sub, ext, mode in [
        ("masks", "png", "L"),
        ("colormaps", "png", "RGB"),
        ("overlays", "jpg", "RGB"),
    ]:
        assert sorted(p.stem for p in (out / sub).glob(f"*.{ext}")) == stems
        with Image.open(out / sub / f"{stems[0]}.{ext}") as img:
            assert (img.mode, img.size) == (mode, (128, 64))
    mask = np.array(Image.open(out / "masks" / f"{stems[0]}.png"))
    assert mask.dtype == np.uint8 and mask.max() < 19


@pytest.mark.slow
def test_predict_any_image_folder(checkpoint: Path, toy_root: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (90, 120, 200)).save(images / "street.png")
    cfg = config("predict", f"checkpoint={checkpoint}", f"input_dir={images}",
                 f"output_dir={tmp_path / 'out'}", "inference=slide", "inference.crop_size=[64,64]",
                 "inference.stride=[48,48]")  # fmt: skip
    # the image is first fitted into the training scale 256x128: a dozen overlapping windows
    out = run_predict(cfg)
    with Image.open(out / "masks" / "street.png") as img:
        assert (img.mode, img.size) == ("L", (40, 30))


@pytest.mark.slow
def test_missing_checkpoint_is_one_clear_line(toy_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    proc = run_entry(
        "evaluate.py", f"checkpoint={missing}", *data_overrides(toy_root),
        f"hydra.run.dir={tmp_path / 'run'}", check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_input_errors(checkpoint: Path, toy_root: Path, tmp_path: Path) -> None:
    out = f"output_dir={tmp_path / 'out'}"
    with pytest.raises(ConfigError, match=r"checkpoint=PATH.*gt_dir"):
        run_evaluate(config("evaluate", out))
    gt_dir = toy_root / "labels" / "sem_seg" / "masks" / "val"
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    with pytest.raises(UserError, match=rf"{re.escape(str(pred_dir))}.*no \.png"):
        run_evaluate(config("evaluate", f"gt_dir={gt_dir}", f"pred_dir={pred_dir}", out))
    bad = pred_dir / sorted(p.name for p in gt_dir.glob("*.png"))[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))}.*size"):
        run_evaluate(config("evaluate", f"gt_dir={gt_dir}", f"pred_dir={pred_dir}", out))
    other = tiny_checkpoint(tmp_path / "seven.pt", num_classes=7)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(other))}.*7 classes"):
        run_evaluate(config("evaluate", f"checkpoint={other}", *data_overrides(toy_root), out))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=re.escape(f"input_dir {empty} contains no images")):
        run_predict(config("predict", f"checkpoint={checkpoint}", f"input_dir={empty}", out))
