"""BDD100K drivable area: the dataset (real layout, toy streets with lanes, checker), the toolkit's
drivable metric against its own CLI's numbers, and the test-server file of predict.py."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import entry_config, load_script, run_entry, tiny_checkpoint, train_in_process
from PIL import Image

from semseg.apps.evaluate import run_evaluate
from semseg.apps.predict import run_predict
from semseg.apps.zoo import build_model_zoo_row
from semseg.checkpoints.file import save_checkpoint
from semseg.cli import compose
from semseg.data import build_dataset, dataset_meta, make_toy_bdd100k, make_toy_bdd100k_drivable
from semseg.data.checker import check_dataset
from semseg.data.toy import default_classes
from semseg.data.toy_scene import render_drivable_scene, render_scene_regions
from semseg.evaluation.metrics import (
    EvaluationError,
    SegmentationMetric,
    evaluate_mask_folders,
    format_table,
    summarize,
)
from semseg.evaluation.submission import evaluate_rle_file, write_rle_file

REPO = Path(__file__).resolve().parents[1]
CASES = REPO / "tests/fixtures/conformance/bdd100k_drivable_eval"
NAMES = ["direct", "alternative", "background"]
PALETTE = [[219, 94, 86], [86, 211, 219], [0, 0, 0]]
IMAGES, MASKS = "images/100k", "labels/drivable/masks"


def tree_digest(root: Path) -> str:
    """One sha256 over every file's relative path and bytes, in path order."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def drivable_config(root: Path, *overrides: str):
    return compose("train", ["dataset=bdd100k_drivable", f"dataset.root={root}", *overrides])


@pytest.fixture(scope="module")
def drivable_toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drivable") / "toy"
    return make_toy_bdd100k_drivable(
        root, 6, 3, 2, height=64, width=128, class_names=NAMES, palette=PALETTE, progress=False
    )


# -- the toy data ------------------------------------------------------------------------------


def test_sem_seg_toy_set_is_unchanged_by_the_lanes(tmp_path):
    """The lanes have random draws of their own: the sem_seg toy set (and with it the quickstart's
    numbers) is byte for byte what the generator wrote before drivable area existed (digest
    recorded from that code)."""
    root = make_toy_bdd100k(tmp_path / "t", 3, 2, 1, height=64, width=128, progress=False)
    assert tree_digest(root) == "ff415470c65ab0497f178807eab756d4f9a2cfb9525951a86c44fec631ef45bd"


def test_drivable_scene_is_the_street_with_lanes_on_its_road():
    names, palette = default_classes()
    key = [0, 0, 5]
    image, label, _ = render_scene_regions(np.random.default_rng(key), 64, 128, names, palette)
    lanes_image, drivable = render_drivable_scene(
        np.random.default_rng(key), np.random.default_rng([*key, 1]), 64, 128, names, palette
    )
    road = label == names.index("road")
    # direct / alternative exactly on the road, background everywhere else
    assert np.array_equal(drivable < 2, road) and set(np.unique(drivable)) == {0, 1, 2}
    # the same street: the images differ only on the road (the markings, spread by the blur)
    near_road = cv2.dilate(road.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    changed = (image != lanes_image).any(-1)
    assert changed.any() and not (changed & ~near_road).any()


def test_drivable_toy_layout_values_and_rles(drivable_toy):
    dirs = {str(p.parent.relative_to(drivable_toy)) for p in drivable_toy.rglob("*.*")}
    assert dirs == {
        f"{IMAGES}/train", f"{IMAGES}/val", f"{IMAGES}/test",
        f"{MASKS}/train", f"{MASKS}/val",
        "labels/drivable/colormaps/train", "labels/drivable/colormaps/val",
        "labels/drivable/rles",
    }  # fmt: skip
    counts = np.zeros(256, np.int64)
    for mask in (drivable_toy / MASKS).rglob("*.png"):
        counts += np.bincount(np.array(Image.open(mask)).ravel(), minlength=256)
    assert np.flatnonzero(counts).tolist() == [0, 1, 2]  # every class, nothing else
    # the toolkit's drivable RLE files label direct and alternative only: the rest is background
    frames = json.loads((drivable_toy / "labels/drivable/rles/drivable_val.json").read_text())
    assert {c["category"] for f in frames["frames"] for c in f["labels"]} == set(NAMES[:2])
    cfg = drivable_config(drivable_toy, "dataset.labels=rles")
    from_rles = build_dataset(cfg.dataset, "val", train=False)
    from_masks = build_dataset(drivable_config(drivable_toy).dataset, "val", train=False)
    for i in range(len(from_masks)):
        assert np.array_equal(from_rles.read_label(i)[0], from_masks.read_label(i)[0])


def test_toy_config_generates_into_its_layout_folders(tmp_path, monkeypatch):
    """dataset=toy_bdd100k_drivable writes itself on first use, into the folders its layout reads
    (the generator takes them from the layout by interpolation); the script writes the same."""
    sizes = ["num_train=2", "num_val=1", "num_test=1", "height=32", "width=64"]
    cfg = compose("train", ["dataset=toy_bdd100k_drivable", f"dataset.root={tmp_path / 'cfg'}",
                            *(f"dataset.generate.{s}" for s in sizes)])  # fmt: skip
    assert len(build_dataset(cfg.dataset, "train", train=False)) == 2
    args = ["--layout", "bdd100k_drivable", "--root", str(tmp_path / "cli"), "--num-train", "2",
            "--num-val", "1", "--num-test", "1", "--height", "32", "--width", "64"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["make_toy_dataset.py", *args])
    load_script("make_toy_dataset").main()
    assert tree_digest(tmp_path / "cli") == tree_digest(tmp_path / "cfg")
    frames = json.loads((tmp_path / "cli/labels/drivable/rles/drivable_train.json").read_text())
    assert {c["category"] for f in frames["frames"] for c in f["labels"]} <= set(NAMES)


def test_real_layout_is_read_from_configuration(tmp_path):
    """dataset=bdd100k_drivable reads images/100k and labels/drivable/masks, 3 classes, background
    trained as a class (its id stays 2), padding 255."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for name in ("a1", "b2"):
            image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
            cv2.imwrite(str(_mkdir(tmp_path / IMAGES / split) / f"{name}.jpg"), image)
            if split != "test":
                mask = rng.choice([0, 1, 2], (40, 60)).astype(np.uint8)
                cv2.imwrite(str(_mkdir(tmp_path / MASKS / split) / f"{name}.png"), mask)
    cfg = drivable_config(tmp_path, "dataset.train_pipeline.crop_size=[64,64]")
    assert cfg.dataset.num_classes == 3 and list(cfg.dataset.class_names) == NAMES
    assert dataset_meta(cfg.dataset)["toolkit_ignored_class"] == "background"
    val = build_dataset(cfg.dataset, "val", train=False)
    assert val.names == ["a1", "b2"] and val.image_paths[0] == tmp_path / IMAGES / "val/a1.jpg"
    expected = np.array(Image.open(tmp_path / MASKS / "val/a1.png"))
    assert np.array_equal(val[0]["mask"].numpy(), expected)
    train = build_dataset(cfg.dataset, "train", train=True)
    assert set(torch.unique(train[(0, 1)]["mask"]).tolist()) <= {0, 1, 2, 255}
    assert not build_dataset(cfg.dataset, "test", train=False).has_labels
    with pytest.raises(Exception, match="images/100k"):  # the hint names the drivable folders
        build_dataset(drivable_config(tmp_path / "nowhere").dataset, "val", train=False)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_checker_names_the_file_and_the_bad_value(drivable_toy, tmp_path):
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(drivable_toy, root)
    bad = sorted((root / MASKS / "train").glob("*.png"))[0]
    mask = np.array(Image.open(bad))
    mask[0, 0] = 3
    Image.fromarray(mask).save(bad)
    lines: list[str] = []
    assert not check_dataset(drivable_config(root).dataset, ["train", "val"], 1, lines.append)
    report = "\n".join(lines)
    bad_lines = [line for line in lines if bad.name in line]
    assert len(bad_lines) == 1 and "[3]" in bad_lines[0], report
    assert "[val] OK" in report and "direct" in report and "background" in report


# -- the metric --------------------------------------------------------------------------------


def _expected() -> dict:
    return json.loads((CASES / "expected.json").read_text())


@pytest.mark.parametrize("case", sorted(_expected()))
def test_metric_equals_the_toolkit_cli_and_mmseg(case):
    """One confusion matrix: the toolkit's drivable figures (its CLI's numbers, percentages) and
    mmseg's 3-class IoUs (its IoUMetric, float32) beside them."""
    spec = _expected()[case]
    metrics, confmat = evaluate_mask_folders(
        CASES / spec["gt"], CASES / spec["pred"], 3, NAMES, 255, ignored_class="background"
    )
    toolkit = spec["toolkit"]
    ours = {
        "IoU/direct": toolkit["IoU"][0]["direct"],
        "IoU/alternative": toolkit["IoU"][0]["alternative"],
        "mIoU": toolkit["IoU"][1]["AVERAGE"],
        "pixel_acc": toolkit["pAcc"],
        "fIoU": toolkit["fIoU"],
    }
    for key, value in ours.items():
        assert 100 * metrics[key] == pytest.approx(value, abs=1e-6), key
    assert "IoU/background" not in metrics  # the toolkit's "ignored" class is not a figure
    mmseg = spec["mmseg"]
    assert metrics["mmseg_mIoU"] == pytest.approx(mmseg["mIoU"], abs=1e-6)
    for name in NAMES:
        want = mmseg["IoU"][name]
        assert metrics[f"mmseg_IoU/{name}"] == pytest.approx(
            0.0 if np.isnan(want) else want, abs=1e-6
        )
    assert confmat.shape == (4, 4)


def _labels(frames: list[dict]) -> list:
    """(name, [(id, category, counts, size)]) per frame: the fields the toolkit reads."""
    return [
        (f["name"], [(c["id"], c["category"], c["rle"]["counts"], list(c["rle"]["size"]))
                     for c in f["labels"]])
        for f in frames
    ]  # fmt: skip


def test_rle_file_is_the_toolkits_and_scores_as_the_masks(tmp_path):
    """The frames equal the toolkit's `bdd100k.label.to_rle -m drivable` of the same masks
    (direct and alternative labelled, background not), and score as the masks."""
    spec = _expected()["mixed"]
    pred_dir = CASES / spec["pred"]
    masks = [(f"{p.stem}.jpg", p) for p in sorted(pred_dir.glob("*.png"))]
    rle = write_rle_file(tmp_path / "drivable.json", masks, NAMES[:2])
    frames = json.loads(rle.read_text())["frames"]
    toolkit = json.loads((CASES / "mixed/pred_rle.json").read_text())["frames"]
    assert _labels(frames) == _labels(sorted(toolkit, key=lambda f: f["name"]))
    assert [f["name"] for f in frames] == ["a.jpg", "b.jpg", "d.jpg"]
    from_rle, _ = evaluate_rle_file(CASES / spec["gt"], rle, 3, NAMES, 255, "background")
    from_masks, _ = evaluate_mask_folders(CASES / spec["gt"], pred_dir, 3, NAMES, 255, "background")
    # the toolkit's figures: uncovered pixels and predictions >= 3 alike are background
    for key in ("mIoU", "pixel_acc", "fIoU", "IoU/direct", "IoU/alternative"):
        assert from_rle[key] == pytest.approx(from_masks[key], abs=1e-12), key


def test_toolkit_figures_leave_ground_truth_background_out():
    """Predicting direct on background costs nothing in the toolkit's figures, but mmseg's."""
    metric = SegmentationMetric(3, 255, sync_on_compute=False)
    gt = torch.tensor([[[0, 0, 1, 1, 2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 0, 1, 1, 0, 0, 0, 9]]])
    metric.update(pred, gt)
    metrics = summarize(metric.compute(), NAMES, "background")
    assert metrics["mIoU"] == metrics["pixel_acc"] == metrics["IoU/direct"] == 1.0
    assert metrics["mmseg_IoU/direct"] == 0.5 and metrics["mmseg_IoU/background"] == 0.0
    assert summarize(metric.compute(), NAMES)["IoU/background"] == 0.0  # sem_seg rules: scored
    table = format_table(metrics, NAMES)
    assert "mmseg IoU" in table and "background" in table
    with pytest.raises(EvaluationError, match="toolkit_ignored_class='direct'"):
        summarize(metric.compute(), NAMES, "direct")


def test_evaluate_folders_reports_the_toolkit_headline(tmp_path):
    spec = _expected()["mixed"]
    report = run_evaluate(
        entry_config(
            "evaluate",
            "dataset=bdd100k_drivable",
            f"gt_dir={CASES / spec['gt']}",
            f"pred_dir={CASES / spec['pred']}",
            f"output_dir={tmp_path}",
        )
    )
    saved = json.loads((tmp_path / "eval_folder.json").read_text())
    assert saved["metrics"] == report["metrics"]
    assert 100 * saved["metrics"]["mIoU"] == pytest.approx(
        spec["toolkit"]["IoU"][1]["AVERAGE"], abs=1e-6
    )
    assert saved["metrics"]["mmseg_mIoU"] == pytest.approx(spec["mmseg"]["mIoU"], abs=1e-6)


# -- predict.py and evaluate.py with a drivable checkpoint ---------------------------------------


@pytest.fixture(scope="module")
def drivable_checkpoint(tmp_path_factory, drivable_toy) -> Path:
    """The tiny checkpoint with 3 classes and the drivable dataset's meta and config."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", num_classes=3)
    state = torch.load(path, map_location="cpu", weights_only=False)
    dataset = drivable_config(drivable_toy, "dataset=toy_bdd100k_drivable").dataset
    from omegaconf import OmegaConf

    state["config"]["dataset"] = OmegaConf.to_container(dataset, resolve=True)
    state["meta"] = dataset_meta(dataset)
    return save_checkpoint(state, path)


def test_predict_writes_drivable_ids_and_the_test_server_file(
    drivable_checkpoint, drivable_toy, tmp_path, caplog
):
    data = ["dataset=toy_bdd100k_drivable", f"dataset.root={drivable_toy}", "device=cpu"]
    out = run_predict(
        entry_config(
            "predict", f"checkpoint={drivable_checkpoint}", *data, "dataset.split=val",
            f"output_dir={tmp_path / 'pred'}",
        )
    )  # fmt: skip
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == 3
    values = set(np.unique(np.concatenate([np.array(Image.open(m)).ravel() for m in masks])))
    assert values <= {0, 1, 2}
    frames = json.loads((out / "submission/drivable.json").read_text())["frames"]
    assert [f["name"] for f in frames] == [f"{m.stem}.jpg" for m in masks]
    assert {c["category"] for f in frames for c in f["labels"]} <= set(NAMES[:2])
    # the file scores as the masks (the toolkit's drivable metric, headline)
    gt = drivable_toy / MASKS / "val"
    from_masks, _ = evaluate_mask_folders(gt, out / "masks", 3, NAMES, 255, "background")
    from_rle, _ = evaluate_rle_file(
        gt, out / "submission/drivable.json", 3, NAMES, 255, "background"
    )
    # predictions are 0/1/2: uncovered pixels decode as background, every figure agrees
    assert from_rle == pytest.approx(from_masks, abs=1e-12)
    # evaluate.py on the checkpoint gives the same numbers
    with caplog.at_level(logging.INFO, logger="semseg"):
        report = run_evaluate(
            entry_config("evaluate", f"checkpoint={drivable_checkpoint}", *data,
                         f"output_dir={tmp_path / 'eval'}")
        )  # fmt: skip
    assert report["metrics"] == pytest.approx(from_masks, abs=1e-12)
    assert "mmseg_mIoU" in caplog.text


@pytest.mark.slow
def test_quickstart_drivable_trains_and_reports_the_drivable_metric(tmp_path):
    data = tmp_path / "data"
    proc = run_entry(
        "train.py", "experiment=quickstart_drivable", "device=cpu", "logger=none",
        f"paths.data_dir={data}", f"hydra.run.dir={tmp_path / 'run'}",
        "schedule.max_iters=4", "trainer.eval_interval=4", "trainer.checkpoint_interval=4",
        "dataset.generate.num_train=8", "dataset.generate.num_val=4", "dataset.generate.num_test=2",
        "dataset.generate.height=64", "dataset.generate.width=128",
        "dataset.train_pipeline.scale=[128,64]", "dataset.train_pipeline.crop_size=[64,64]",
        timeout=600,
    )  # fmt: skip
    assert "val mIoU" in proc.stdout + proc.stderr
    assert "(mmseg mIoU" in proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"val/mIoU", "val/IoU/direct", "val/IoU/alternative", "val/mmseg_mIoU"} <= set(metrics)
    assert "val/IoU/background" not in metrics and "val/mmseg_IoU/background" in metrics


@pytest.mark.slow
def test_model_zoo_row_of_a_drivable_run(drivable_toy, tmp_path):
    """A tiny drivable training run published as a model-zoo row: the scores are the toolkit's
    drivable figures with mmseg's 3-class mIoU beside them, the card names the drivable mIoU
    and the classes, and the RLE files are named by the toolkit's task (drivable_<split>.json,
    frames without the ignored background)."""
    run = tmp_path / "run"
    summary = train_in_process(drivable_toy, run, "dataset=toy_bdd100k_drivable",
                               "schedule.max_iters=2", "trainer.eval_at_end=true")  # fmt: skip
    out = build_model_zoo_row(
        compose("model_zoo", [f"run_dir={run}", f"dataset.root={drivable_toy}", "device=cpu",
                              "progress=false", "visuals.count=1", f"output_dir={tmp_path / 'zoo'}",
                              "checkpoint=last.pt", "dataset.test_server=https://server.example"])
    )  # fmt: skip
    scores = json.loads((out / "scores-val.json").read_text())
    assert scores["dataset"] == "toy_bdd100k_drivable" and scores["class_names"] == NAMES
    metrics = scores["metrics"]
    assert {"mIoU", "IoU/direct", "IoU/alternative", "mmseg_mIoU", "mmseg_IoU/background"} <= set(
        metrics
    )
    assert "IoU/background" not in metrics
    assert metrics["mIoU"] == pytest.approx(summary["val/mIoU"], abs=1e-9)
    assert metrics["mmseg_mIoU"] == pytest.approx(summary["val/mmseg_mIoU"], abs=1e-9)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"][0]["metrics"]
    assert front == [{"type": "mean_iou", "value": metrics["mIoU"], "name": "drivable mIoU (val)"}]
    assert metrics["mmseg_mIoU"] > 0  # background is scored there
    assert "| split | drivable mIoU (%) | source |" in card
    assert "Classes (mask ids 0-2): direct, alternative, background." in card
    assert f"| **drivable mIoU** | **{100 * metrics['mIoU']:.2f}** |" in card
    assert f"| mmseg mIoU (all 3 classes) | {100 * metrics['mmseg_mIoU']:.2f} |" in card
    assert "| background |" not in card
    assert "submission/drivable_test_masks.zip" in card and "sem_seg" not in card
    assert sorted(p.name for p in (out / "submission").iterdir()) == [
        "drivable_test.json", "drivable_test_masks.zip"
    ]  # fmt: skip
    assert not list(out.glob("preds/sem_seg_*"))
    frames = json.loads((out / "preds" / "drivable_val.json").read_text())["frames"]
    assert len(frames) == 3
    assert {c["category"] for f in frames for c in f["labels"]} <= set(NAMES[:2])
