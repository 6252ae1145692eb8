"""Run record and loggers: RunRecorder files, W&B offline/disabled without network, failures never fatal."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import semseg.tracking.wandb_logger as wandb_logger
from semseg.errors import ConfigError
from semseg.tracking import NullLogger, RunRecorder, WandbLogger, build_logger, git_state

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["road", "sidewalk", "traffic light"]
PALETTE = [[128, 64, 128], [244, 35, 232], [250, 170, 30]]
CONFIG = {"dataset": {"class_names": CLASS_NAMES, "palette": PALETTE}, "optimizer": {"lr": 0.01}}


@pytest.fixture(autouse=True)
def _no_network_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing here may reach a server, whatever the user's environment says.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}


def make_logger(run_dir: Path, name: str = "wandb", **overrides: object) -> object:
    """Instantiate conf/logger/<name>.yaml as the engine does."""
    cfg = OmegaConf.create(
        {"tags": ["test"], "logger": OmegaConf.load(REPO / f"conf/logger/{name}.yaml")}
    )
    for key, value in overrides.items():
        cfg.logger[key] = value
    return build_logger(cfg.logger, run_dir, CONFIG)


def examples(with_gt: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "name": f"img{i}",
            "image": rng.integers(0, 255, (16, 32, 3), dtype=np.uint8),
            "pred": rng.integers(0, 3, (16, 32), dtype=np.uint8),
            "gt": np.full((16, 32), 255 if i else 1, dtype=np.uint8) if with_gt else None,
        }
        for i in range(2)
    ]


def test_run_recorder_writes_jsonl_and_summary(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path / "run")
    recorder.log(10, {"loss": torch.tensor(1.5), "lr": np.float32(0.25)})
    recorder.log(20, {"loss": 1.25, "val/mIoU": 0.5, "val/IoU/traffic light": float("nan")})
    # Each line is on disk at once (flushed), before close.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "loss": 1.5, "lr": 0.25},
        {"step": 20, "loss": 1.25, "val/mIoU": 0.5, "val/IoU/traffic light": None},
    ]
    recorder.write_summary({"val/mIoU": 0.5, "steps": 20})
    recorder.write_summary({"val/mIoU": 0.625, "steps": 40, "params": np.int64(7)})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {
        "val/mIoU": 0.625,
        "steps": 40,
        "params": 7,
    }
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "summary.json"]
    recorder.close()
    # A resumed run appends to the same file.
    with RunRecorder(tmp_path / "run") as again:
        again.log(30, {"loss": 1.0})
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_null_logger_from_config(tmp_path: Path) -> None:
    logger = make_logger(tmp_path, "none")
    assert isinstance(logger, NullLogger)
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.log_predictions(examples(), PALETTE, step=1)
    logger.log_summary({"val/mIoU": 0.5})
    logger.finish()
    assert list(tmp_path.iterdir()) == []
    # Ranks other than 0 never log, whatever the config.
    assert isinstance(
        build_logger(
            OmegaConf.load(REPO / "conf/logger/wandb.yaml"), tmp_path, CONFIG, is_main=False
        ),
        NullLogger,
    )


@pytest.mark.parametrize("image_style", ["masks", "side_by_side"])
def test_wandb_offline_logs_into_run_folder(tmp_path: Path, image_style: str) -> None:
    environ = wandb_environ()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a W&B failure would warn: fail instead
        logger = make_logger(tmp_path, image_style=image_style)
        assert isinstance(logger, WandbLogger) and logger.active
        assert logger.run.config["optimizer"]["lr"] == 0.01
        assert logger.run.config["git"]["commit"] == git_state()["commit"]
        assert logger.run.tags == ("test",)
        logger.log_metrics({"loss": 1.5, "lr": 0.01, "img_per_s": 3.0}, step=1)
        logger.log_metrics({"val/mIoU": 0.4, "val/IoU/road": 0.8}, step=2)
        logger.log_predictions(examples(with_gt=image_style == "masks"), PALETTE, step=2)
        logger.log_summary({"val/mIoU": 0.4})
        assert "WANDB_SERVICE" in os.environ  # W&B's service runs while the run does ...
        logger.finish()
        logger.finish()  # idempotent
    assert not logger.active
    assert wandb_environ() == environ  # ... and leaves the environment as it was
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))
    assert len(list((offline[0] / "files" / "media" / "images").rglob("*.png"))) >= 2
    run_id = (tmp_path / "wandb" / "run_id").read_text()
    assert offline[0].name.endswith(run_id)


def test_wandb_resumed_run_keeps_its_id(tmp_path: Path) -> None:
    first = make_logger(tmp_path)
    run_id = first.run.id
    first.finish()
    second = make_logger(tmp_path)
    assert second.run.id == run_id
    second.finish()


def test_wandb_disabled_writes_no_run(tmp_path: Path) -> None:
    logger = make_logger(tmp_path, mode="disabled")
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.log_predictions(examples(), PALETTE, step=1)
    logger.log_summary({"val/mIoU": 0.5})
    logger.finish()
    assert not list((tmp_path / "wandb").glob("*run-*"))


def test_wandb_bad_mode_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        make_logger(tmp_path, mode="offlin")
    assert str(info.value) == (
        "logger.mode='offlin' is not one of online | offline | disabled (conf/logger/wandb.yaml)"
    )
    with pytest.raises(ConfigError, match=r"^logger\.image_style='grid' must be masks \| side"):
        make_logger(tmp_path, image_style="grid")


def test_wandb_init_failure_warns_once_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    def broken_init(**kwargs: object) -> None:
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="W&B init failed.*no network") as record:
        logger = make_logger(tmp_path, mode="online")
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.log_predictions(examples(), PALETTE, step=1)
        logger.log_summary({"val/mIoU": 0.5})
        logger.finish()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert not logger.active


def test_wandb_failure_while_logging_warns_once(tmp_path: Path) -> None:
    logger = make_logger(tmp_path, mode="disabled")

    class DeadRun:
        def log(self, *args: object, **kwargs: object) -> None:
            raise ConnectionError("stream closed")

    logger.run = DeadRun()
    with pytest.warns(RuntimeWarning, match="W&B log failed") as record:
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.log_metrics({"loss": 0.5}, step=2)
        logger.finish()
    assert len(record) == 1


def test_git_state(tmp_path: Path) -> None:
    assert git_state(tmp_path) == {"commit": "unknown", "dirty": "unknown"}
    state = git_state(REPO)
    if state["commit"] != "unknown":  # the repository may be exported without .git
        assert re.fullmatch(r"[0-9a-f]{40}", state["commit"])
        assert isinstance(state["dirty"], bool)


def test_run_names_outside_hydra() -> None:
    assert wandb_logger.hydra_run_names() == (None, None)


def test_run_names_in_a_multirun_job() -> None:
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    sweep = "/x/multirun/train/2026-01-01/10-00-00_42"
    hydra = {
        "mode": RunMode.MULTIRUN,
        "sweep": {"dir": sweep},
        "runtime": {"output_dir": f"{sweep}/3"},
        "job": {"num": 3, "override_dirname": "optimizer.lr=0.02"},
    }
    cfg = OmegaConf.create({"hydra": OmegaConf.merge(OmegaConf.structured(HydraConf), hydra)})
    HydraConfig.instance().set_config(cfg)
    try:
        assert wandb_logger.hydra_run_names() == ("2026-01-01_10-00-00_42", "3:optimizer.lr=0.02")
    finally:
        HydraConfig.instance().cfg = None


def read_events(log_dir: Path) -> object:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_logs_scalars_masks_config_and_summary(tmp_path: Path) -> None:
    logger = make_logger(tmp_path, "tensorboard")
    logger.log_metrics({"train/loss": 1.5, "train/lr": 0.01, "train/img_per_s": 3.0}, step=2)
    logger.log_metrics({"train/loss": 0.5}, step=4)
    logger.log_metrics({"val/mIoU": 0.25, "val/IoU/traffic light": 0.125}, step=4)
    logger.log_predictions(examples(), PALETTE, step=4)
    logger.log_summary({"val/mIoU": 0.25, "steps": 4})
    logger.finish()
    events = read_events(tmp_path / "tensorboard")
    tags = events.Tags()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 1.5), (4, 0.5)]
    assert events.Scalars("val/IoU/traffic_light")[0].value == 0.125
    assert {"train/lr", "train/img_per_s", "val/mIoU"} <= set(tags["scalars"])
    # image | prediction | ground truth side by side
    assert sorted(tags["images"]) == ["val/predictions/img0", "val/predictions/img1"]
    image = events.Images("val/predictions/img0")[0]
    assert (image.step, image.width, image.height) == (4, 3 * 32, 16)
    assert {"config/text_summary", "summary/text_summary"} <= set(tags["tensors"])


def test_tensorboard_missing_package_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import sys

    from semseg.errors import UserError

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(UserError, match=r"^logger=tensorboard needs .*: pip install tensorboard"):
        make_logger(tmp_path, "tensorboard")


def test_many_logs_to_wandb_and_tensorboard(tmp_path: Path) -> None:
    import semseg.cli
    from semseg.tracking import MultiLogger, TensorBoardLogger

    cfg = semseg.cli.compose("train", ["logger=many", "logger.loggers.wandb.mode=offline"])
    logger = build_logger(cfg.logger, tmp_path, CONFIG)
    assert isinstance(logger, MultiLogger)
    wandb, tensorboard = logger.loggers
    assert isinstance(wandb, WandbLogger) and wandb.active
    assert isinstance(tensorboard, TensorBoardLogger)
    logger.log_metrics({"train/loss": 0.75}, step=3)
    logger.log_predictions(examples(), PALETTE, step=3)
    logger.finish()
    assert not wandb.active
    assert [e.value for e in read_events(tmp_path / "tensorboard").Scalars("train/loss")] == [0.75]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_tracking_imports_neither_wandb_nor_tensorboard() -> None:
    import subprocess
    import sys

    # (timm itself imports wandb when present, so the engine is checked for tensorboard only.)
    code = (
        "import sys, semseg.tracking; a = [m for m in ('wandb', 'tensorboard') if m in sys.modules]; "
        "import semseg.engine.trainer; print(a, 'tensorboard' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False"
