"""UPerNet on Swin, the BDD100K zoo's Swin rows: the five experiments against the zoo's configs and
mmseg's models, the transformer recipe's parameter groups against mmengine's own constructor,
ImageNet weights in timm's layout, and the narrow UPerNet + Swin (16-128 channels, 2 blocks per
stage; the model-contract row ``upernet_swin``) with the zoo's optimizer and schedule: its lr per
iteration and groups, activation checkpointing in the benchmark. Training, resume, DDP, ONNX
(with SEMSEG_HEAVY_TESTS=1), the model-zoo row: tests/test_model_contract.py.

The full-size Swin-T UPerNet runs in tests/test_mmseg_exactness.py (mmseg's logits); the S and B
models are built here on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    benchmark_train_step,
    read_jsonl,
    row_overrides,
)

from semseg.checkpoints.file import load_checkpoint
from semseg.cli import compose
from semseg.engine.optim import CustomKeys, build_optimizer
from semseg.errors import ConfigError
from semseg.models import build_model, model_from_checkpoint
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
# The narrow model (the contract's row) with the zoo's recipe


@pytest.mark.slow
def test_narrow_model_trains_with_the_zoo_recipe(trained_row) -> None:
    trained = trained_row("upernet_swin")
    lines = read_jsonl(trained / "metrics.jsonl")
    # lr for the next iteration i: 6e-5 * (1 - i/2), warmed up over 1 iteration.
    assert [x["lr"] for x in lines if "loss" in x] == pytest.approx([3e-5, 0.0], abs=1e-12)
    checkpoint = load_checkpoint(trained / "checkpoints/last.pt")
    assert isinstance(model_from_checkpoint(checkpoint)[0].backbone, SwinBackbone)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]


@pytest.mark.slow
def test_benchmark_counts_the_recomputed_blocks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With activation checkpointing the recomputed blocks are counted once more."""
    plain, recompute = (
        benchmark_train_step(monkeypatch, tmp_path / f"bench_{checkpointing}.json",
                             *row_overrides("upernet_swin",
                                            f"backbone.grad_checkpointing={checkpointing}"))
        for checkpointing in ("false", "true")
    )  # fmt: skip
    assert recompute["model"]["train_gflops_per_image"] > plain["model"]["train_gflops_per_image"]
