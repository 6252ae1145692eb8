"""UPerNet on ConvNeXt, the BDD100K zoo's best rows: the four experiments against the zoo's
configs and mmseg's models, and everything around a model on a narrow UPerNet + ConvNeXt
(convnext_atto, narrow heads) with the zoo's optimizer and schedule: training, exact resume with
EMA, DDP, inference, ONNX export, the model-zoo writer and the benchmark.

The full-size ConvNeXt-T UPerNet runs in tests/test_mmseg_exactness.py (mmseg's logits); the
full-size S and B models are built here on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    assert_model_zoo_row,
    assert_onnx_export_matches,
    assert_resume_is_exact,
    benchmark_train_step,
    train_in_process,
    train_on_two_ranks,
)

from semseg.checkpoints.file import load_checkpoint
from semseg.cli import compose
from semseg.engine.optim import LayerDecay
from semseg.models import build_model, count_parameters, model_from_checkpoint
from semseg.models.convnext import ConvNeXtBackbone
from semseg.models.decoders import FCNHead, UPerHead
from semseg.models.mmseg_conversion import convert_mmseg_state_dict

MMSEG = json.loads((REPO / "tests/fixtures/mmseg/cases.json").read_text())["cases"]

# The zoo's rows (SysCV/bdd100k-models sem_seg/configs/sem_seg/upernet_convnext-*_bdd100k.py):
# experiment -> (backbone config, timm weights, drop path, iterations, mmseg layout case).
ROWS = {
    "upernet_convnext-t_fp16_512x1024_40k_bdd100k":
        ("convnext_tiny", "convnext_tiny.fb_in1k", 0.4, 40000, "upernet_convnext"),
    "upernet_convnext-t_fp16_512x1024_80k_bdd100k":
        ("convnext_tiny", "convnext_tiny.fb_in1k", 0.4, 80000, "upernet_convnext"),
    "upernet_convnext-s_fp16_512x1024_80k_bdd100k":
        ("convnext_small", "convnext_small.fb_in1k", 0.3, 80000, "upernet_convnext_small"),
    "upernet_convnext-b_fp16_512x1024_80k_bdd100k":
        ("convnext_base", "convnext_base.fb_in22k_ft_in1k", 0.4, 80000, "upernet_convnext_base"),
}  # fmt: skip


def narrow(*extra: str) -> list[str]:
    """A narrow UPerNet + ConvNeXt (convnext_atto: 40-320 channels, 2/2/6/2 blocks; heads of
    32 and 16 channels) with the zoo's optimizer and warm-up schedule, on the smoke config."""
    return [
        "model=upernet", "backbone=convnext_tiny", "backbone.name=convnext_atto",
        "backbone.pretrained=false", "model.decode_head.channels=32",
        "model.aux_head.channels=16", "optimizer=adamw_convnext", "schedule=warmup_poly_40k",
        "schedule.max_iters=2", "schedule.warmup_iters=1", "trainer.eval_interval=null",
        "trainer.checkpoint_interval=null", "trainer.log_interval=1", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# The zoo's rows


@pytest.mark.parametrize("row", list(ROWS))
def test_zoo_row_is_the_zoo_config(row: str) -> None:
    _, weights, drop_path, iters, _ = ROWS[row]
    cfg = compose("train", [f"experiment={row}"])
    assert cfg.backbone._target_.endswith("ConvNeXtBackbone") and cfg.backbone.name == weights
    assert cfg.backbone.pretrained and cfg.backbone.drop_path_rate == drop_path
    assert cfg.backbone.ls_init_value == 1.0 and cfg.backbone.downsample_norm_eps == 1e-5
    head, aux = cfg.model.decode_head, cfg.model.aux_head
    assert head._target_.endswith("UPerHead") and list(head.pool_scales) == [1, 2, 3, 6]
    assert (head.channels, head.dropout, list(head.in_index)) == (512, 0.1, [0, 1, 2, 3])
    assert (aux.in_index, aux.channels, aux.num_convs, aux.concat_input) == (2, 256, 1, False)
    assert not cfg.model.align_corners and aux.loss_weight == 0.4 and not aux.sample_pixels
    opt = cfg.optimizer
    assert opt._target_ == "torch.optim.AdamW" and (opt.lr, opt.weight_decay) == (1e-4, 0.05)
    assert list(opt.betas) == [0.9, 0.999]
    groups = cfg.param_groups  # the optimizer's choice, a node of its own
    assert (groups.decay_rate, groups.decay_type, groups.num_layers) == (0.9, "stage_wise", 6)
    s = cfg.schedule
    assert (s.max_iters, s.power, s.min_lr) == (iters, 1.0, 0.0)
    assert (s.warmup_iters, s.warmup_ratio) == (1500, 1e-6)
    assert cfg.trainer.precision == "auto" and cfg.trainer.sync_bn
    assert cfg.dataset.batch_size == 2 and list(cfg.dataset.train_pipeline.crop_size) == [512, 1024]
    assert cfg.inference.mode == "whole" and cfg.dataset.name == "bdd100k"
    assert f"convnext-{row.split('-')[1][0]}" in cfg.tags


@pytest.mark.parametrize("row", list(ROWS))
def test_zoo_row_builds_mmseg_model(row: str) -> None:
    """The row's model has mmseg's UPerNet + ConvNeXt layout, tensor for tensor (the converted
    key list of mmseg's model with the zoo's settings), and runs at 512x1024 (meta device)."""
    *_, case = ROWS[row]
    cfg = compose("train", [f"experiment={row}", "backbone.pretrained=false"])
    with torch.device("meta"):
        model = build_model(cfg).train()
        out = model(torch.zeros(2, 3, 512, 1024))
    assert out["out"].shape == out["aux"].shape == (2, 19, 512, 1024)
    layout = {k: torch.empty(s, device="meta") for k, s in MMSEG[case]["shapes"].items()}
    expected = {k: v.shape for k, v in convert_mmseg_state_dict(layout).items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert isinstance(model.backbone, ConvNeXtBackbone) and isinstance(model.decode_head, UPerHead)
    assert isinstance(model.aux_head, FCNHead)
    assert model.aux_head.convs[0][0].in_channels == model.backbone.out_channels[2]


def test_zoo_optimizer_groups_on_upernet() -> None:
    """The experiment's LayerDecay groups on the whole model: stem/downsampling at 0.9^7, stage
    i at 0.9^(6-i), output norms and both heads at 1; no decay on 1-D tensors and biases."""
    cfg = compose("train", ["experiment=upernet_convnext-t_fp16_512x1024_40k_bdd100k",
                            "backbone.pretrained=false"])  # fmt: skip
    with torch.device("meta"):
        model = build_model(cfg)
    groups = LayerDecay(decay_rate=0.9, decay_type="stage_wise", num_layers=6)(model, 1e-4, 0.05)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)
    expected = {
        "backbone.model.stem_0.weight": (1e-4 * 0.9**7, 0.05),
        "backbone.model.stages_2.downsample.1.weight": (1e-4 * 0.9**7, 0.05),
        "backbone.model.stages_0.blocks.0.mlp.fc1.weight": (1e-4 * 0.9**6, 0.05),
        "backbone.model.stages_3.blocks.2.gamma": (1e-4 * 0.9**3, 0.0),
        "backbone.model.stages_1.blocks.1.conv_dw.bias": (1e-4 * 0.9**5, 0.0),
        "backbone.norm2.weight": (1e-4, 0.0),
        "decode_head.fpn_bottleneck.0.weight": (1e-4, 0.05),
        "decode_head.fpn_bottleneck.1.weight": (1e-4, 0.0),
        "aux_head.classifier.bias": (1e-4, 0.0),
    }
    for name, (lr, wd) in expected.items():
        assert by_param[id(named[name])] == (pytest.approx(lr, rel=1e-9), wd), name


# --------------------------------------------------------------------------------------------
# A narrow model through everything around it


@pytest.fixture(scope="module")
def trained(toy_root: Path, module_tmp: Path) -> Path:
    """Two iterations of the narrow model, evaluated at the end; its run folder."""
    run_dir = module_tmp / "upernet_convnext"
    train_in_process(toy_root, run_dir, *narrow())
    return run_dir


@pytest.mark.slow
def test_narrow_model_trains_with_the_zoo_recipe(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["loss"]) and 0 <= summary["val/mIoU"] <= 1
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    # The head group's lr for the next iteration i: 1e-4 * (1 - i/2), warmed up over 1 iteration.
    assert [x["lr"] for x in lines if "loss" in x] == pytest.approx([5e-5, 0.0], abs=1e-12)
    checkpoint = load_checkpoint(trained / "checkpoints/last.pt")
    assert any(k.startswith("aux_head.") for k in checkpoint["model"])
    model, _, _ = model_from_checkpoint(checkpoint)
    assert model.aux_head is None and isinstance(model.backbone, ConvNeXtBackbone)
    assert summary["params"] == count_parameters(model)
    # Six lr scales (stem/downsampling, 4 stages, output norms + heads) x with/without decay.
    groups = checkpoint["optimizer"]["param_groups"]
    assert len(groups) == 12 and len({g["lr_scale"] for g in groups}) == 6


@pytest.mark.slow
def test_exact_resume_with_ema(toy_root: Path, tmp_path: Path) -> None:
    """4 iterations straight == 2, stop, resume to 4: weights, AdamW moments per layer-decay
    group and EMA, through the warm-up."""
    a, b = assert_resume_is_exact(toy_root, tmp_path, *narrow("schedule.warmup_iters=3"))
    states = a["optimizer"]["state"]
    assert states and all({"exp_avg", "exp_avg_sq"} <= set(s) for s in states.values())
    for key, state in states.items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key in ("last_epoch", "base_lrs", "_last_lr"):  # not _step_count: calls since creation
        assert a["scheduler"][key] == b["scheduler"][key], key


@pytest.mark.slow
def test_ddp_two_processes(toy_root: Path, tmp_path: Path) -> None:
    """Two gloo processes, every parameter used in each step (both heads, every stage)."""
    train_on_two_ranks(toy_root, tmp_path / "ddp", *narrow())


@pytest.mark.slow
def test_onnx_export_at_two_sizes(trained: Path, tmp_path: Path) -> None:
    assert_onnx_export_matches(trained / "checkpoints/last.pt", tmp_path / "upernet_convnext.onnx")


@pytest.mark.slow
def test_model_zoo_row(trained: Path, toy_root: Path, tmp_path: Path) -> None:
    out = assert_model_zoo_row(trained, toy_root, tmp_path / "zoo")
    assert isinstance(model_from_checkpoint(out / "weights.pt")[0].backbone, ConvNeXtBackbone)


@pytest.mark.slow
def test_benchmark(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The benchmark's costs (inference without the auxiliary head) and its training step with
    the zoo's optimizer, with and without activation checkpointing (the same FLOPs counted
    once more for the recomputed backbone)."""
    plain, recompute = (
        benchmark_train_step(monkeypatch, tmp_path / f"bench_{checkpointing}.json",
                             *narrow(f"backbone.grad_checkpointing={checkpointing}"))
        for checkpointing in ("false", "true")
    )  # fmt: skip
    cfg = compose("train", narrow())
    torch.manual_seed(0)
    assert plain["model"]["params"] == count_parameters(build_model(cfg))
    ratio = plain["model"]["train_gflops_per_image"] / plain["model"]["forward_gflops_per_image"]
    assert 2 < ratio < 4
    assert recompute["model"]["train_gflops_per_image"] > plain["model"]["train_gflops_per_image"]
