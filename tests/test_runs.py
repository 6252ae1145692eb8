"""Loading run folders into pandas (semseg.tracking.runs) and the analysis figures (plots)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure
from PIL import Image

from semseg.tracking import RunRecorder, plots, runs

CLASS_NAMES = ["road", "sidewalk", "traffic light"]
PALETTE = [[128, 64, 128], [244, 35, 232], [250, 170, 30]]


def make_run(
    run_dir: Path,
    overrides: list[str],
    miou: float | None,
    lr: float = 0.01,
    finished: bool = True,
) -> Path:
    """A run folder as train.py writes it (only the parts the loaders read)."""
    (run_dir / ".hydra").mkdir(parents=True)
    config = {"optimizer": {"lr": lr}, "dataset": {"class_names": CLASS_NAMES, "palette": PALETTE}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    recorder = RunRecorder(run_dir)
    recorder.log(1, {"loss": 2.0, "lr": lr})
    recorder.log(2, {"loss": 1.0, "lr": lr / 2})
    if miou is not None:
        per_class = {f"val/IoU/{n}": miou + 0.1 * (i - 1) for i, n in enumerate(CLASS_NAMES)}
        recorder.log(2, {"val/mIoU": miou, "val/pixel_acc": 0.9, **per_class})
        if finished:
            recorder.write_summary(
                {"val/mIoU": miou, "val/pixel_acc": 0.9, **per_class, "steps": 2}
            )
    recorder.close()
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "train" / "2026-01-01" / "10-00-00_123"
    make_run(root / "0", ["experiment=smoke", "backbone=resnet18", "optimizer.lr=0.01"], 0.25)
    make_run(
        root / "1", ["experiment=smoke", "backbone=resnet50", "optimizer.lr=0.02"], 0.5, lr=0.02
    )
    make_run(
        root / "10", ["experiment=smoke", "backbone=resnet18", "+optimizer.lr=0.1"], 0.375, lr=0.1
    )
    make_run(
        root / "2",
        ["experiment=smoke", "backbone=resnet50", "optimizer.lr=0.1"],
        0.125,
        finished=False,
    )
    (root / "multirun.yaml").write_text("{}\n")
    (root / ".submitit").mkdir()  # not a run folder
    (root / "0" / "wandb").mkdir()
    return root


def test_load_runs_one_row_per_run(sweep: Path) -> None:
    df = runs.load_runs(sweep)
    # Sorted by val/mIoU, best first; the unfinished run shows its last logged values.
    assert df["run"].tolist() == ["1", "10", "0", "2"]
    assert df["status"].tolist() == ["finished", "finished", "finished", "running"]
    assert df["backbone"].tolist() == ["resnet50", "resnet18", "resnet18", "resnet50"]
    assert df["optimizer.lr"].tolist() == [0.02, 0.1, 0.01, 0.1]
    assert pd.api.types.is_float_dtype(df["optimizer.lr"])
    assert df["val/mIoU"].tolist() == [0.5, 0.375, 0.25, 0.125]
    assert df["val/IoU/traffic light"].tolist() == pytest.approx([0.6, 0.475, 0.35, 0.225])
    assert df.loc[0, "steps"] == 2
    assert df["run_dir"].tolist()[0] == str(sweep / "1")
    assert df.attrs["params"] == ["experiment", "backbone", "optimizer.lr"]
    assert runs.swept_params(df) == ["backbone", "optimizer.lr"]
    assert runs.swept_params(df.sort_values("run")) == ["backbone", "optimizer.lr"]  # attrs survive
    assert runs.class_iou_columns(df) == [f"val/IoU/{n}" for n in CLASS_NAMES]


def test_load_runs_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No folder"):
        runs.load_runs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="No run folders under"):
        runs.load_runs(tmp_path)


def test_load_run_and_single_run_folder(sweep: Path) -> None:
    run = runs.load_run(sweep / "1")
    assert run["overrides"] == ["experiment=smoke", "backbone=resnet50", "optimizer.lr=0.02"]
    assert run["params"] == {"experiment": "smoke", "backbone": "resnet50", "optimizer.lr": 0.02}
    assert run["config"]["optimizer"]["lr"] == 0.02
    assert run["summary"]["val/mIoU"] == 0.5
    df = runs.load_runs(sweep / "1")  # a run folder is a sweep of one
    assert df["run"].tolist() == ["1"]


def test_load_metrics_merges_steps_and_skips_a_torn_line(sweep: Path) -> None:
    run_dir = sweep / "0"
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "loss": 1.5}) + "\n")  # a resume re-logged step 1
        f.write('{"step": 3, "lo')  # killed mid-line
    with pytest.warns(UserWarning, match="not JSON"):
        raw = runs.load_metrics(run_dir, merge_steps=False)
        df = runs.load_metrics(run_dir)
    assert len(raw) == 4
    assert df["step"].tolist() == [1, 2]
    assert df["loss"].tolist() == [1.5, 1.0]
    assert df["val/mIoU"].isna().tolist() == [True, False]


def test_parse_overrides() -> None:
    parsed = runs.parse_overrides(
        [
            "model.dropout=0.1",
            "trainer.max_iters=4",
            "name=a b",
            "++tags=[x,y]",
            "~logger",
            "flag=true",
        ]
    )
    assert parsed == {
        "model.dropout": 0.1,
        "trainer.max_iters": 4,
        "name": "a b",
        "tags": "['x', 'y']",
        "flag": True,
    }


def test_latest_sweep(tmp_path: Path, sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    newer = tmp_path / "multirun" / "train" / "2026-01-02" / "09-00-00_7"
    make_run(newer / "0", ["optimizer.lr=0.01"], 0.1)
    future = time.time() + 10
    os.utime(newer / "0" / ".hydra" / "config.yaml", (future, future))
    assert runs.latest_sweep(tmp_path / "multirun") == newer
    monkeypatch.chdir(newer)  # found from a sub-folder too, as from notebooks/
    assert runs.latest_sweep() == newer


def test_confusion_matrix_and_examples(sweep: Path) -> None:
    run_dir = sweep / "1"
    with pytest.raises(FileNotFoundError, match=r"confusion_matrix\.npy"):
        runs.load_confusion_matrix(run_dir)
    (run_dir / "eval" / "examples").mkdir(parents=True)
    confmat = np.arange(16).reshape(4, 4)
    np.save(run_dir / "eval" / "confusion_matrix.npy", confmat)
    np.testing.assert_array_equal(runs.load_confusion_matrix(run_dir), confmat)
    pred = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    for name, gt in (("a", True), ("b", False)):
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(
            run_dir / f"eval/examples/{name}_image.png"
        )
        Image.fromarray(pred).save(run_dir / f"eval/examples/{name}_pred.png")
        if gt:
            Image.fromarray(pred[::-1]).save(run_dir / f"eval/examples/{name}_gt.png")
    examples = runs.load_examples(run_dir)
    assert [e["name"] for e in examples] == ["a", "b"]
    np.testing.assert_array_equal(examples[0]["pred"], pred)
    np.testing.assert_array_equal(examples[0]["gt"], pred[::-1])
    assert examples[0]["image"].shape == (2, 2, 3)
    assert examples[1]["gt"] is None
    assert len(runs.load_examples(run_dir, limit=1)) == 1


def test_load_wandb_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(RuntimeError, match="load_runs"):
        runs.load_wandb_runs("semseg-bdd100k")
    monkeypatch.delenv("WANDB_MODE")

    class FailingApi:
        def __init__(self) -> None:
            raise wandb.errors.UsageError("api_key not configured")

    monkeypatch.setattr(wandb, "Api", FailingApi)
    with pytest.raises(RuntimeError, match=r"api_key not configured.*wandb login"):
        runs.load_wandb_runs("semseg-bdd100k", entity="me")

    run = SimpleNamespace(
        name="0:backbone=resnet18",
        id="abc",
        group="sweep1",
        state="finished",
        config={"optimizer": {"lr": 0.01}, "backbone": {"name": "resnet18"}},
        summary=SimpleNamespace(_json_dict={"val/mIoU": 0.4, "_step": 3, "val/predictions": {}}),
    )

    class FakeApi:
        def runs(self, path: str, filters: dict | None = None) -> list:
            assert path == "me/semseg-bdd100k"
            return [run]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    df = runs.load_wandb_runs("semseg-bdd100k", entity="me")
    assert df.to_dict("records") == [
        {
            "run": "0:backbone=resnet18",
            "id": "abc",
            "group": "sweep1",
            "state": "finished",
            "optimizer.lr": 0.01,
            "backbone.name": "resnet18",
            "val/mIoU": 0.4,
        }
    ]


def test_plot_curves(sweep: Path) -> None:
    df = runs.load_runs(sweep)
    fig = plots.plot_curves(df, "loss")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.lines) == 4
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [2.0, 1.0])
    assert ax.lines[0].get_label() == "1: backbone=resnet50, optimizer.lr=0.02"
    fig = plots.plot_curves({"a": runs.load_metrics(sweep / "0"), "b": sweep / "1"}, "val/mIoU")
    assert [line.get_label() for line in fig.axes[0].lines] == ["a", "b"]
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), [50.0])  # percent
    with pytest.raises(KeyError, match="logged keys"):
        plots.plot_curves(df, "val/mAP")


def test_plot_metric_vs_param(sweep: Path) -> None:
    df = runs.load_runs(sweep)
    fig = plots.plot_metric_vs_param(df, "optimizer.lr")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"  # 0.01 .. 0.1
    assert len(ax.collections[0].get_offsets()) == 4
    fig = plots.plot_metric_vs_param(df, "backbone")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["resnet18", "resnet50"]
    np.testing.assert_allclose(ax.collections[1].get_offsets()[:, 1], [31.25, 31.25])  # means
    with pytest.raises(KeyError, match="momentum"):
        plots.plot_metric_vs_param(df, "momentum")


def test_plot_per_class_iou(sweep: Path) -> None:
    df = runs.load_runs(sweep)
    fig = plots.plot_per_class_iou(df, top_k=2)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * len(CLASS_NAMES)
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASS_NAMES
    np.testing.assert_allclose([p.get_height() for p in ax.patches[:3]], [40.0, 50.0, 60.0])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "1: backbone=resnet50, optimizer.lr=0.02 (val/mIoU 50.0)",
        "10: backbone=resnet18, optimizer.lr=0.1 (val/mIoU 37.5)",
    ]
    fig = plots.plot_per_class_iou(df, top_k=3, class_names=["road", "traffic light"])
    assert len(fig.axes[0].patches) == 6


def test_plot_confusion_matrix() -> None:
    confmat = np.array([[8, 2, 0, 0], [0, 5, 0, 5], [0, 0, 0, 0], [0, 0, 0, 0]])
    fig = plots.plot_confusion_matrix(confmat, CLASS_NAMES)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [*CLASS_NAMES, "ignored"]
    np.testing.assert_allclose(ax.images[0].get_array()[:2], [[0.8, 0.2, 0, 0], [0, 0.5, 0, 0.5]])
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion_matrix(confmat, ["road"])


def test_show_examples_and_colorize() -> None:
    pred = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(plots.colorize(pred, PALETTE)[1], [PALETTE[2], [0, 0, 0]])
    examples = [
        {"name": "a", "image": np.zeros((2, 2, 3), np.uint8), "pred": pred, "gt": pred},
        {"name": "b", "image": np.zeros((2, 2, 3), np.uint8), "pred": pred, "gt": None},
    ]
    fig = plots.show_examples(examples, PALETTE, CLASS_NAMES)
    assert len(fig.axes) == 6
    assert sum(len(ax.images) for ax in fig.axes) == 5
    assert [t.get_text() for t in fig.legends[0].get_texts()] == CLASS_NAMES


def test_eval_artifacts_round_trip(tmp_path):
    from semseg.tracking.record import write_eval_artifacts
    from semseg.tracking.runs import load_confusion_matrix, load_examples

    rng = np.random.default_rng(0)
    confmat = rng.integers(0, 100, (20, 20))
    example = {
        "name": "a",
        "image": rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
        "pred": rng.integers(0, 19, (6, 8), dtype=np.uint8),
        "gt": rng.integers(0, 19, (6, 8), dtype=np.uint8),
    }
    write_eval_artifacts(tmp_path, confmat, [example, {**example, "name": "b", "gt": None}])
    assert np.array_equal(load_confusion_matrix(tmp_path), confmat)
    loaded = load_examples(tmp_path)
    assert [e["name"] for e in loaded] == ["a", "b"] and loaded[1]["gt"] is None
    for part in ("image", "pred", "gt"):
        assert np.array_equal(loaded[0][part], example[part]), part
