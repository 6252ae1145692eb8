"""Training options compose, are off by default, a local config is picked up, bad values exit 2."""

from __future__ import annotations

import inspect
import os
import shutil

import pytest
from helpers import REPO, compose_train, resolved, run_entry, smoke_overrides
from hydra.utils import get_class
from omegaconf import OmegaConf


def test_options_are_off_by_default():
    cfg = compose_train()
    assert cfg.loss._target_ == "semseg.losses.SegCrossEntropy"
    assert cfg.loss.normalize == "all" and "class_weight" not in cfg.loss
    assert cfg.trainer.clip_grad_norm is None and cfg.trainer.ema is None
    assert cfg.trainer.best_metric == "val/mIoU"
    assert OmegaConf.to_container(cfg.trainer.debug) == {
        "overfit_batches": 0,
        "detect_anomaly": False,
        "profile": None,
        "eval_images": None,
    }
    assert cfg.logger._target_ == "semseg.tracking.NullLogger"


@pytest.mark.parametrize(
    ("optimizer", "param_groups"),
    [("sgd", None), ("adamw", "no_decay_norm_and_bias"), ("adamw_convnext", "LayerDecay")],
)
def test_the_optimizer_node_holds_only_the_optimizers_arguments(
    optimizer: str, param_groups: str | None
) -> None:
    cfg = compose_train(f"optimizer={optimizer}")
    arguments = set(inspect.signature(get_class(cfg.optimizer._target_)).parameters)
    assert set(cfg.optimizer) - {"_target_", "_partial_"} <= arguments
    # Param-group settings are their own node, which the optimizer's config may pick.
    chosen = None if cfg.param_groups is None else cfg.param_groups._target_.rsplit(".", 1)[-1]
    assert chosen == param_groups


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        (["loss=ohem"], "loss.min_kept", 100000),
        (["loss=ohem"], "loss.thresh", 0.7),
        (["loss=ce_weighted"], "loss.class_weight", "auto"),
        (["debug=overfit"], "trainer.debug.overfit_batches", 1),
        (["debug=anomaly"], "trainer.debug.detect_anomaly", True),
        (["trainer/ema=timm"], "trainer.ema.decay", 0.999),
        (["debug=profile"], "trainer.debug.profile.active", 3),
        (["debug=fast"], "schedule.max_iters", 6),
        (["experiment=smoke", "debug=fast"], "schedule.max_iters", 6),  # debug wins over experiment
        (["logger=tensorboard"], "logger._target_", "semseg.tracking.TensorBoardLogger"),
        (["logger=many"], "logger.loggers.tensorboard.subdir", "tensorboard"),
        (["logger=many"], "logger.loggers.wandb._target_", "semseg.tracking.WandbLogger"),
    ],
)
def test_option_composes(overrides, key, value):
    cfg = compose_train(*overrides)
    assert OmegaConf.select(cfg, key) == value
    resolved(cfg)


def test_local_config_is_loaded_when_present(tmp_path):
    from hydra import compose, initialize_config_dir

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf, ignore=shutil.ignore_patterns("local"))
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose("train").paths.data_dir.endswith("/data")  # no local/ folder at all
    (conf / "local").mkdir()
    example = (REPO / "conf/local/default.yaml.example").read_text()
    (conf / "local/default.yaml").write_text(
        example.replace("data_dir: /data ", "data_dir: /mnt/datasets ")
        + "backbone:\n  weights: /w/r50.safetensors\n"
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart"])
        assert cfg.paths.data_dir == "/mnt/datasets"
        assert cfg.dataset.root == "/mnt/datasets/toy_bdd100k"
        assert cfg.backbone.weights == "/w/r50.safetensors"
        # The command line still wins.
        assert compose("train", overrides=["paths.data_dir=/x"]).dataset.root == "/x/bdd100k"
        # evaluate.py and predict.py read the same machine paths.
        for entry in ("evaluate", "predict"):
            assert compose(entry).dataset.root == "/mnt/datasets/bdd100k", entry


def test_local_config_is_git_ignored():
    import subprocess

    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=REPO, check=False
    )
    example = subprocess.run(
        ["git", "check-ignore", "-q", "conf/local/default.yaml.example"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0 and example.returncode == 1


@pytest.mark.slow
def test_bad_clip_norm_is_one_line_exit_2(toy_root, tmp_path):
    proc = run_entry(
        "train.py",
        *smoke_overrides(toy_root, tmp_path / "run", "trainer.clip_grad_norm=0"),
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: trainer.clip_grad_norm=0 must be a number > 0 (the largest global gradient norm), "
        "or null for no clipping"
    ]


@pytest.mark.parametrize("preset", ["default", "fast", "overfit", "profile", "anomaly"])
def test_debug_runs_land_apart_from_real_runs(preset):
    cfg = compose_train(f"debug={preset}")
    assert cfg.paths.log_dir.endswith("/outputs/debug")
    assert cfg.paths.multirun_dir.endswith("/multirun/debug")
    assert cfg.logger._target_ == "semseg.tracking.NullLogger" and not cfg.trainer.progress_bar
    assert "debug" in cfg.tags
    # Composing resolves no run folder (a stamp set here would leak into every child process).
    assert "SEMSEG_RUN_STAMP" not in os.environ
