"""The ConvNeXt recipe's optimizer and schedule against mmseg's and mmengine's own numbers
(tests/fixtures/convnext/, written by scripts/mmpretrain_reference.py), and the reference SGD recipe
and the AdamW no-decay split kept as they were."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO
from omegaconf import OmegaConf

from semseg.cli import compose_groups
from semseg.engine.optim import build_optimizer, build_scheduler
from semseg.errors import ConfigError
from semseg.models import build_model
from semseg.models.convnext import ConvNeXtBackbone, mmcls_convnext_rules, rename_keys
from semseg.models.semantic_fpn import semantic_fpn

FIXTURES = REPO / "tests" / "fixtures" / "convnext"
MMSEG = json.loads((FIXTURES / "mmseg_param_groups.json").read_text())
SCHEDULES = json.loads((FIXTURES / "schedules.json").read_text())


def optimizer_config(*overrides: str):
    cfg = OmegaConf.load(REPO / "conf" / "optimizer" / "adamw_convnext.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def resnet18_fpn(model: str = "semantic_fpn") -> torch.nn.Module:
    groups = {"model": model, "backbone": "resnet18", "dataset": "bdd100k"}
    return build_model(compose_groups(groups, ["backbone.pretrained=false"]))


def per_parameter(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """name -> (lr, weight decay) as the optimizer's groups give them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups
            for p in g["params"]}  # fmt: skip


@pytest.mark.parametrize("key", sorted(MMSEG["groups"]))
def test_convnext_groups_equal_mmseg_constructor(key: str) -> None:
    arch, decay_type, num_layers = key.split("/")
    with torch.device("meta"):  # shapes only: the grouping reads names and ranks
        model = semantic_fpn(ConvNeXtBackbone(f"convnext_{arch}"), num_classes=19)
    cfg = optimizer_config(f"param_groups.decay_type={decay_type}",
                           f"param_groups.num_layers={num_layers}")  # fmt: skip
    ours = per_parameter(build_optimizer(cfg, model), model)
    assert len(ours) == sum(1 for _ in model.parameters())  # every parameter, once

    table = MMSEG["groups"][key]
    backbone = {k: v for k, v in table.items() if k.startswith("backbone.")}
    renamed, unmatched = rename_keys(backbone, mmcls_convnext_rules("backbone.", "backbone."))
    assert not unmatched
    assert set(renamed) == {k for k in ours if k.startswith("backbone.")}
    # Exactly mmseg's numbers for each backbone parameter: lr = scale * 1e-4, weight decay 0.05/0.
    wrong = {k: (ours[k], tuple(v)) for k, v in renamed.items() if ours[k] != tuple(v)}
    assert not wrong, wrong
    # Decoder parameters (UPerHead/FCNHead there, Semantic FPN here): the rule's top id, lr scale 1;
    # weight decay on conv/linear weights only.
    heads = {k: tuple(v) for k, v in table.items() if not k.startswith("backbone.")}
    assert {v for k, v in heads.items() if k.endswith("conv.weight")} == {(1e-4, 0.05)}
    assert {v for k, v in heads.items() if k.endswith(("bias", "bn.weight"))} == {(1e-4, 0.0)}
    shapes = dict(model.named_parameters())
    for name, value in ours.items():
        if not name.startswith("backbone."):
            assert value == (1e-4, 0.05 if shapes[name].ndim > 1 else 0.0), name
    # The first group is the head's: the lr the trainer logs is the schedule's.
    assert build_optimizer(cfg, model).param_groups[0]["lr"] == 1e-4


def test_zoo_groups_have_the_stage_wise_scales() -> None:
    table = MMSEG["groups"]["tiny/stage_wise/6"]
    scale = {k: round(v[0] / 1e-4, 12) for k, v in table.items()}
    assert scale["backbone.downsample_layers.0.0.weight"] == round(0.9**7, 12)
    assert scale["backbone.downsample_layers.3.1.weight"] == round(0.9**7, 12)
    assert scale["backbone.stages.0.2.pointwise_conv1.weight"] == round(0.9**6, 12)
    assert scale["backbone.stages.3.0.gamma"] == round(0.9**3, 12)
    assert scale["backbone.norm1.weight"] == 1.0
    assert table["backbone.stages.3.0.gamma"][1] == 0.0  # layer scale: no weight decay


@pytest.mark.parametrize("max_iters", [40000, 80000])
def test_warmup_poly_schedule_equals_mmengine(max_iters: int) -> None:
    expected = SCHEDULES["lr"][str(max_iters)]
    base = SCHEDULES["base_lr"]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in SCHEDULES["scales"]]
    groups = [{"params": [p], "lr": base * s} for p, s in zip(params, SCHEDULES["scales"])]
    optimizer = torch.optim.AdamW(groups, lr=base)
    schedule = OmegaConf.load(REPO / "conf" / "schedule" / f"warmup_poly_{max_iters // 1000}k.yaml")
    schedule = OmegaConf.merge(
        OmegaConf.load(REPO / "conf" / "schedule" / "poly_40k.yaml"), schedule
    )
    schedule.max_iters = max_iters
    assert (schedule.power, schedule.min_lr, schedule.warmup_iters, schedule.warmup_ratio) == (
        SCHEDULES["power"], SCHEDULES["min_lr"], SCHEDULES["warmup_iters"], SCHEDULES["warmup_ratio"]
    )  # fmt: skip
    scheduler = build_scheduler(optimizer, schedule)
    # Step through the warm-up; later iterations through a resumed schedule (start_iter).
    for it in range(SCHEDULES["warmup_iters"] + 2):
        if str(it) in expected:
            assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
                expected[str(it)], rel=1e-9, abs=1e-20
            ), it
        optimizer.step()
        scheduler.step()
    for it, lrs in expected.items():
        build_scheduler(optimizer, schedule, start_iter=int(it))
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
            lrs, rel=1e-9, abs=1e-20
        ), it


def test_groups_keep_their_own_base_lr_down_to_the_absolute_min_lr() -> None:
    # mmcv's PolyLrUpdaterHook: each group from its own initial lr to the same absolute min_lr.
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD(
        [{"params": [a], "lr": 0.01}, {"params": [b], "lr": 0.001}], lr=0.01
    )
    schedule = OmegaConf.create({"max_iters": 100, "power": 0.9, "min_lr": 1e-4})
    build_scheduler(optimizer, schedule)  # sets each group's initial_lr
    build_scheduler(optimizer, schedule, start_iter=50)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [(0.01 - 1e-4) * 0.5**0.9 + 1e-4, (0.001 - 1e-4) * 0.5**0.9 + 1e-4]
    )


def test_sgd_reference_recipe_is_one_group_in_parameter_order() -> None:
    model = resnet18_fpn()
    optimizer = build_optimizer(OmegaConf.load(REPO / "conf" / "optimizer" / "sgd.yaml"), model)
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 5e-4)


def test_no_decay_split_is_the_former_rule() -> None:
    # The rule before timm's helper: norm-layer parameters, biases and 1-D tensors get no decay.
    model = resnet18_fpn("semantic_fpn_gn")
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            former = isinstance(module, norm_types) or name == "bias" or p.ndim <= 1
            (no_decay if former else decay).append(id(p))
    optimizer = build_optimizer(OmegaConf.load(REPO / "conf" / "optimizer" / "adamw.yaml"), model)
    first, second = optimizer.param_groups
    assert [id(p) for p in first["params"]] == decay and first["weight_decay"] == 0.01
    assert [id(p) for p in second["params"]] == no_decay and second["weight_decay"] == 0.0


def test_layer_decay_config_errors() -> None:
    model = semantic_fpn(ConvNeXtBackbone("convnext_atto"), num_classes=3)
    with pytest.raises(ConfigError, match="decay_type='block_wise' must be one of"):
        build_optimizer(optimizer_config("param_groups.decay_type=block_wise"), model)
    with pytest.raises(ConfigError, match=r"no_decay_norm_and_bias and optimizer\.param_groups"):
        build_optimizer(optimizer_config("no_decay_norm_and_bias=true"), model)
    with pytest.raises(ConfigError, match=r"numbers its layers.*TimmBackbone"):
        build_optimizer(optimizer_config(), resnet18_fpn())
