"""Every option of every config group composes; the defaults are the reference recipe."""

from __future__ import annotations

import pytest
from helpers import REPO, compose_train, resolved, run_entry

from semseg.errors import ConfigError

CONF = REPO / "conf"
GROUPS = [
    "model",
    "backbone",
    "dataset",
    "schedule",
    "optimizer",
    "loss",
    "trainer",
    "logger",
    "inference",
    "experiment",
    "hparams_search",
    "debug",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed_options(group: str) -> list[str]:
    """The options composed here: the drivable zoo rows compose in test_drivable_zoo.py."""
    return [o for o in options(group) if not o.endswith("_drivable_bdd100k")]


# Options that leave values for the user to fill in (???), with the values conf/ documents for them.
USER_VALUES = {
    ("dataset", "folder"): [
        "dataset.root=/data/mine", "dataset.num_classes=3",
        "dataset.class_names=[background,crack,rust]",
        "dataset.palette=[[0,0,0],[255,0,0],[0,0,255]]",
    ],
}  # fmt: skip


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in composed_options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_train(f"{group}={option}", *USER_VALUES.get((group, option), []))
    assert resolved(cfg)
    assert cfg.dataset.num_classes == len(cfg.dataset.class_names) == len(cfg.dataset.palette)


@pytest.mark.parametrize("group", ["model", "backbone", "dataset", "schedule", "optimizer"])
def test_required_groups_have_options(group):
    assert options(group), f"conf/{group}/ is empty"


def test_defaults_are_the_reference_recipe():
    cfg = compose_train()
    assert cfg.model._target_.endswith("encoder_decoder") and cfg.model.neck.out_channels == 256
    assert cfg.model.decode_head._target_.endswith("FPNHead") and "aux_head" not in cfg.model
    assert cfg.model.decode_head.channels == 128 and cfg.model.decode_head.dropout == 0.1
    assert cfg.backbone.name == "resnet50" and cfg.backbone.pretrained is True
    assert cfg.dataset.name == "bdd100k" and list(cfg.dataset.train_pipeline.crop_size) == [
        512,
        1024,
    ]
    assert list(cfg.dataset.train_pipeline.ratio_range) == [0.5, 2.0]
    assert cfg.dataset.train_pipeline.cat_max_ratio == 0.75 and cfg.dataset.batch_size == 2
    assert (
        cfg.schedule.max_iters == 40000
        and cfg.schedule.power == 0.9
        and cfg.schedule.min_lr == 1e-4
    )
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.01
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 5e-4
    assert cfg.loss.normalize == "all" and cfg.trainer.compile is False
    assert cfg.trainer.channels_last == "auto" and cfg.inference.mode == "whole"


def test_reference_experiment_uses_v1c_backbone():
    cfg = compose_train("experiment=semantic_fpn_r50_40k_bdd100k")
    default = compose_train()
    assert cfg.backbone.name == "resnet50c" and cfg.backbone.pretrained is True
    # Spelling the reference out changes nothing else than the backbone variant.
    a, b = resolved(cfg), resolved(default)
    a["backbone"].pop("name"), b["backbone"].pop("name")
    a.pop("tags"), b.pop("tags")
    a["logger"].pop("tags", None), b["logger"].pop("tags", None)
    assert a == b


def test_cfg_job_prints_the_composition():
    proc = run_entry("train.py", "--cfg", "job", "model=semantic_fpn", "backbone=resnet50")
    assert "name: resnet50" in proc.stdout and "max_iters: 40000" in proc.stdout


def test_unknown_group_option_lists_available():
    """Hydra's message, which train.py prints, lists the options of the group, on one line."""
    with pytest.raises(ConfigError, match="backbone/resnet9000") as error:
        compose_train("backbone=resnet9000")
    message = str(error.value)
    assert "\n" not in message
    assert "Available options in 'backbone':" in message
    assert {"resnet18", "resnet50"} <= set(message.rpartition(":")[2].replace(",", " ").split())
