"""UPerNet on Swin, the BDD100K zoo's Swin rows: the five experiments against the zoo's configs and
mmseg's models, the transformer recipe's parameter groups against mmengine's own constructor,
ImageNet weights in timm's layout, and everything around a model on a narrow UPerNet + Swin
(16-128 channels, 2 blocks per stage, narrow heads) with the zoo's optimizer and schedule:
training, exact resume, DDP, ONNX export, the model-zoo writer and the benchmark.

The full-size Swin-T UPerNet runs in tests/test_mmseg_exactness.py (mmseg's logits); the S and B
models are built here on the meta device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
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
from semseg.engine.optim import CustomKeys, build_optimizer
from semseg.errors import ConfigError
from semseg.models import build_model, count_parameters, model_from_checkpoint
from semseg.models.backbone_weights import WeightsError
from semseg.models.decoders import FCNHead, UPerHead
from semseg.models.mmseg_conversion import convert_mmseg_state_dict, recognise_mmseg, rename_keys
from semseg.models.swin import SwinBackbone, timm_to_unfold_order

FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
MMSEG = json.loads((FIXTURES / "cases.json").read_text())["cases"]
PARAM_GROUPS = json.loads((FIXTURES / "param_groups.json").read_text())

# The zoo's rows (SysCV/bdd100k-models sem_seg/configs/sem_seg/upernet_swin-*_bdd100k.py):
# experiment -> (backbone config, width, blocks, heads, iterations, precision, mmseg layout case).
T, S = [2, 2, 6, 2], [2, 2, 18, 2]
ROWS = {
    "upernet_swin-t_512x1024_40k_bdd100k": ("swin_tiny", 96, T, [3, 6, 12, 24], 40000, "fp32", "upernet_swin"),
    "upernet_swin-t_512x1024_80k_bdd100k": ("swin_tiny", 96, T, [3, 6, 12, 24], 80000, "fp32", "upernet_swin"),
    "upernet_swin-s_512x1024_80k_bdd100k": ("swin_small", 96, S, [3, 6, 12, 24], 80000, "fp32", "upernet_swin_small"),
    "upernet_swin-s_fp16_512x1024_80k_bdd100k": ("swin_small", 96, S, [3, 6, 12, 24], 80000, "fp16", "upernet_swin_small"),
    "upernet_swin-b_fp16_512x1024_80k_bdd100k": ("swin_base", 128, S, [4, 8, 16, 32], 80000, "fp16", "upernet_swin_base"),
}  # fmt: skip
NARROW_SWIN = ["backbone.embed_dims=16", "backbone.depths=[2,2,2,2]",
               "backbone.num_heads=[1,2,2,4]"]  # fmt: skip


def narrow(*extra: str) -> list[str]:
    """A narrow UPerNet + Swin (16-128 channels, 2 blocks per stage; heads of 32 and 16
    channels) with the zoo's optimizer and warm-up schedule, on the smoke config."""
    return [
        "model=upernet", "backbone=swin_tiny", *NARROW_SWIN, "backbone.pretrained=false",
        "model.decode_head.channels=32", "model.aux_head.channels=16",
        "optimizer=adamw_transformer", "schedule=warmup_poly_40k", "schedule.max_iters=2",
        "schedule.warmup_iters=1", "trainer.eval_interval=null",
        "trainer.checkpoint_interval=null", "trainer.log_interval=1", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# The zoo's rows


@pytest.mark.parametrize("row", list(ROWS))
def test_zoo_row_is_the_zoo_config(row: str) -> None:
    backbone, width, depths, heads, iters, precision, _ = ROWS[row]
    cfg = compose("train", [f"experiment={row}"])
    b = cfg.backbone
    assert b._target_.endswith("SwinBackbone") and b.pretrained and b.drop_path_rate == 0.3
    assert (b.embed_dims, list(b.depths), list(b.num_heads)) == (width, depths, heads)
    assert b.window_size == 7
    head, aux = cfg.model.decode_head, cfg.model.aux_head
    assert head._target_.endswith("UPerHead") and list(head.pool_scales) == [1, 2, 3, 6]
    assert (head.channels, head.dropout, list(head.in_index)) == (512, 0.1, [0, 1, 2, 3])
    assert (aux.in_index, aux.channels, aux.num_convs, aux.concat_input) == (2, 256, 1, False)
    assert not cfg.model.align_corners and aux.loss_weight == 0.4 and not aux.sample_pixels
    opt = cfg.optimizer
    assert opt._target_ == "torch.optim.AdamW" and (opt.lr, opt.weight_decay) == (6e-5, 0.01)
    assert list(opt.betas) == [0.9, 0.999]
    assert cfg.param_groups._target_.endswith("CustomKeys")
    s = cfg.schedule
    assert (s.max_iters, s.power, s.min_lr) == (iters, 1.0, 0.0)
    assert (s.warmup_iters, s.warmup_ratio) == (1500, 1e-6)
    assert cfg.trainer.precision == precision and cfg.trainer.sync_bn
    assert cfg.dataset.batch_size == 2 and list(cfg.dataset.train_pipeline.crop_size) == [512, 1024]
    assert cfg.inference.mode == "whole" and cfg.dataset.name == "bdd100k"
    assert backbone.replace("swin_", "swin-")[:6] in cfg.tags


# T, S (the fp16 rows share their model) and B.
SIZES = ["upernet_swin-t_512x1024_80k_bdd100k", "upernet_swin-s_512x1024_80k_bdd100k",
         "upernet_swin-b_fp16_512x1024_80k_bdd100k"]  # fmt: skip


@pytest.mark.parametrize("row", SIZES)
def test_zoo_row_builds_mmseg_model(row: str) -> None:
    """The row's model has mmseg's UPerNet + Swin layout, tensor for tensor (the converted key
    list of mmseg's model with the zoo's settings), and runs at 512x1024 (meta device)."""
    *_, case = ROWS[row]
    cfg = compose("train", [f"experiment={row}", "backbone.pretrained=false"])
    with torch.device("meta"):
        model = build_model(cfg).train()
        out = model(torch.zeros(2, 3, 512, 1024))
    assert out["out"].shape == out["aux"].shape == (2, 19, 512, 1024)
    layout = {k: torch.empty(s, device="meta") for k, s in MMSEG[case]["shapes"].items()}
    expected = {k: v.shape for k, v in convert_mmseg_state_dict(layout).items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert isinstance(model.backbone, SwinBackbone) and isinstance(model.decode_head, UPerHead)
    assert isinstance(model.aux_head, FCNHead)
    assert model.aux_head.convs[0][0].in_channels == model.backbone.out_channels[2]


def test_optimizer_groups_equal_mmengine_constructor() -> None:
    """Every parameter's lr and weight decay under optimizer=adamw_transformer equal mmengine's
    DefaultOptimWrapperConstructor with the zoo's Swin paramwise_cfg on mmseg's own UPerNet +
    Swin-T (tests/fixtures/mmseg/param_groups.json), parameter by converted name."""
    table = PARAM_GROUPS["upernet_swin"]["groups"]
    cfg = compose("train", ["experiment=upernet_swin-t_512x1024_40k_bdd100k",
                            "backbone.pretrained=false"])  # fmt: skip
    with torch.device("meta"):
        model = build_model(cfg)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)]: [g["lr"], g["weight_decay"]] for g in optimizer.param_groups
            for p in g["params"]}  # fmt: skip
    assert len(ours) == len(names)  # every parameter, once
    layout = {k: torch.empty(s, device="meta") for k, s in MMSEG["upernet_swin"]["shapes"].items()}
    renamed, unmatched = rename_keys(table, recognise_mmseg(layout).rules)
    assert not unmatched and set(renamed) == set(ours)
    wrong = {k: (ours[k], v) for k, v in renamed.items() if ours[k] != v}
    assert not wrong, wrong
    # Not a vacuous table: both rules occur, and the heads' BatchNorm and biases decay.
    assert {tuple(v) for v in table.values()} == {(6e-5, 0.01), (6e-5, 0.0)}
    assert table["decode_head.bottleneck.bn.weight"] == [6e-5, 0.01]
    assert table["backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table"][1] == 0.0
    assert table["backbone.stages.0.downsample.norm.bias"][1] == 0.0
    assert optimizer.param_groups[0]["weight_decay"] == 0.01  # the logged group decays


def test_custom_keys_follow_mmengine_order() -> None:
    """The longest key wins, ties alphabetically; lr_mult scales the lr; unknown settings are a
    ConfigError naming the config key."""
    rule = CustomKeys({"norm": {"decay_mult": 0.0}, "decode_head.norm": {"lr_mult": 10.0},
                       "head": {"lr_mult": 2.0, "decay_mult": 0.5}})  # fmt: skip
    assert rule.multipliers("backbone.norm0.weight") == (1.0, 0.0)
    assert rule.multipliers("decode_head.norm.weight") == (10.0, 1.0)
    assert rule.multipliers("decode_head.classifier.bias") == (2.0, 0.5)
    assert rule.multipliers("backbone.stages.0.blocks.0.mlp.fc1.weight") == (1.0, 1.0)
    with pytest.raises(ConfigError, match=r"custom_keys.*decay_multiplier"):
        CustomKeys({"norm": {"decay_multiplier": 0.0}})


# --------------------------------------------------------------------------------------------
# ImageNet weights


def narrow_timm_swin() -> torch.nn.Module:
    """timm's own Swin of the narrow size, random weights (LayerNorm affine included), shifting
    and partitioning windows at every stage as mmseg does (always_partition)."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2, 2, 2),
                              num_heads=(1, 2, 2, 4), always_partition=True).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) * 0.5 + (0.75 if name.endswith("weight") else -0.25))
            elif "relative_position_bias_table" in name:
                p.normal_(0, 1)
    return model


def test_timm_imagenet_weights_give_timm_features(tmp_path: Path) -> None:
    """backbone.weights in timm's layout: at 224x224 (whole windows everywhere, where timm's and
    mmseg's window order agree) each stage is timm's, patch merging reordered into mmseg's unfold
    order; the output norms start at identity, as mmseg leaves the classifier's norm out."""
    reference = narrow_timm_swin()
    path = tmp_path / "swin.safetensors"
    safetensors.torch.save_file(reference.state_dict(), path)
    ours = SwinBackbone("swin_tiny", 16, [2, 2, 2, 2], [1, 2, 2, 4], pretrained=True, weights=path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = ours.eval()(x)
        expected = reference.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(got, expected, strict=True):
        b = F.layer_norm(b.permute(0, 2, 3, 1), b.shape[1:2]).permute(0, 3, 1, 2)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # mmseg's layout of the same weights (the zoo's files) loads to the same model.
    merged = reference.layers[1].downsample.reduction.weight
    assert torch.equal(ours.stages[0].downsample.reduction.weight, timm_to_unfold_order(merged))
    with pytest.raises(WeightsError, match=r"does not fit backbone 'swin_tiny'"):
        SwinBackbone("swin_tiny", 32, [2, 2, 2, 2], [1, 2, 2, 4], pretrained=True, weights=path)


# --------------------------------------------------------------------------------------------
# A narrow model through everything around it


@pytest.fixture(scope="module")
def trained(toy_root: Path, module_tmp: Path) -> Path:
    """Two iterations of the narrow model, evaluated at the end; its run folder."""
    run_dir = module_tmp / "upernet_swin"
    train_in_process(toy_root, run_dir, *narrow())
    return run_dir


@pytest.mark.slow
def test_narrow_model_trains_with_the_zoo_recipe(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["loss"]) and 0 <= summary["val/mIoU"] <= 1
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    # lr for the next iteration i: 6e-5 * (1 - i/2), warmed up over 1 iteration.
    assert [x["lr"] for x in lines if "loss" in x] == pytest.approx([3e-5, 0.0], abs=1e-12)
    checkpoint = load_checkpoint(trained / "checkpoints/last.pt")
    assert any(k.startswith("aux_head.") for k in checkpoint["model"])
    model, _, _ = model_from_checkpoint(checkpoint)
    assert model.aux_head is None and isinstance(model.backbone, SwinBackbone)
    assert summary["params"] == count_parameters(model)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]


@pytest.mark.slow
def test_exact_resume_with_ema(toy_root: Path, tmp_path: Path) -> None:
    """4 iterations straight == 2, stop, resume to 4 (stochastic depth on): weights, AdamW
    moments and EMA, through the warm-up."""
    a, b = assert_resume_is_exact(toy_root, tmp_path, *narrow("schedule.warmup_iters=3"))
    states = a["optimizer"]["state"]
    assert states and all({"exp_avg", "exp_avg_sq"} <= set(s) for s in states.values())
    for key, state in states.items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)


@pytest.mark.slow
def test_ddp_two_processes(toy_root: Path, tmp_path: Path) -> None:
    """Two gloo processes, every parameter used in each step (both heads, every stage)."""
    train_on_two_ranks(toy_root, tmp_path / "ddp", *narrow())


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SEMSEG_HEAVY_TESTS") != "1",
    reason="Swin's dynamic-shape ONNX export takes 3-5 minutes on 2 CPU cores: SEMSEG_HEAVY_TESTS=1",
)
def test_onnx_export_at_two_sizes(trained: Path, tmp_path: Path) -> None:
    """Dynamic batch and size: the padding to whole windows and the shifted-window masks follow
    the input (75x110 needs padding at every stage)."""
    assert_onnx_export_matches(trained / "checkpoints/last.pt", tmp_path / "swin.onnx")


def test_model_zoo_row(trained: Path, toy_root: Path, tmp_path: Path) -> None:
    out = assert_model_zoo_row(trained, toy_root, tmp_path / "zoo")
    assert isinstance(model_from_checkpoint(out / "weights.pt")[0].backbone, SwinBackbone)


@pytest.mark.slow
def test_benchmark(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The benchmark's costs and its training step with the zoo's optimizer, with and without
    activation checkpointing (the recomputed blocks counted once more)."""
    plain, recompute = (
        benchmark_train_step(monkeypatch, tmp_path / f"bench_{checkpointing}.json",
                             *narrow(f"backbone.grad_checkpointing={checkpointing}"))
        for checkpointing in ("false", "true")
    )  # fmt: skip
    torch.manual_seed(0)
    assert plain["model"]["params"] == count_parameters(build_model(compose("train", narrow())))
    ratio = plain["model"]["train_gflops_per_image"] / plain["model"]["forward_gflops_per_image"]
    assert 2 < ratio < 4
    assert recompute["model"]["train_gflops_per_image"] > plain["model"]["train_gflops_per_image"]
