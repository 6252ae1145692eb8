"""UPerNet on ViT-B / DeiT-S through mmseg's MultiLevelNeck, the BDD100K zoo's ViT rows: the two
experiments against the zoo's configs and mmseg's models, the optimizer's parameter groups against
mmengine's own constructor, and a narrow UPerNet + ViT (width 32, 4 layers, narrow heads) through
training, exact resume, DDP, ONNX export, the model-zoo writer and the benchmark.

The full-size ViT-B UPerNet runs in tests/test_mmseg_exactness.py (mmseg's logits); DeiT-S is
built here on the meta device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
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
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from semseg.cli import compose
from semseg.engine.optim import build_optimizer
from semseg.models import build_model, count_parameters, model_from_checkpoint
from semseg.models.backbone_weights import WeightsError
from semseg.models.mmseg_conversion import convert_mmseg_state_dict, recognise_mmseg, rename_keys
from semseg.models.necks_transformer import MultiLevelNeck
from semseg.models.vit import VisionTransformerBackbone

FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
MMSEG = json.loads((FIXTURES / "cases.json").read_text())["cases"]
PARAM_GROUPS = json.loads((FIXTURES / "param_groups.json").read_text())

# experiment -> (backbone config, width, heads, drop path, mmseg layout case)
ROWS = {
    "upernet_vit-b_512x1024_80k_bdd100k": ("vit_base", 768, 12, 0.0, "upernet_vit"),
    "upernet_deit-s_512x1024_80k_bdd100k": ("deit_small", 384, 6, 0.1, "upernet_deit"),
}


def narrow(*extra: str) -> list[str]:
    """A narrow UPerNet + ViT (width 32, 2 heads, 4 layers, all returned; heads of 32 and 16
    channels) with the zoo's optimizer and warm-up schedule, on the smoke config."""
    return [
        "model=upernet_vit", "backbone=vit_base", "backbone.embed_dims=32",
        "backbone.num_heads=2", "backbone.num_layers=4", "backbone.out_indices=[0,1,2,3]",
        "backbone.img_size=[64,64]", "backbone.pretrained=false",
        "model.decode_head.channels=32", "model.aux_head.channels=16",
        "optimizer=adamw_transformer", "schedule=warmup_poly_40k", "schedule.max_iters=2",
        "schedule.warmup_iters=1", "trainer.eval_interval=null",
        "trainer.checkpoint_interval=null", "trainer.log_interval=1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("row", list(ROWS))
def test_zoo_row_is_the_zoo_config_and_mmseg_layout(row: str) -> None:
    name, width, heads, drop_path, case = ROWS[row]
    cfg = compose("train", [f"experiment={row}", "backbone.pretrained=false"])
    b = cfg.backbone
    assert b._target_.endswith("VisionTransformerBackbone") and list(b.img_size) == [512, 512]
    assert (b.embed_dims, b.num_heads, b.drop_path_rate) == (width, heads, drop_path)
    assert b.num_layers == 12
    assert list(b.out_indices) == [2, 5, 8, 11] and b.norm_eps == 1e-6 and not b.final_norm
    assert cfg.model.neck._target_.endswith("MultiLevelNeck")
    assert list(cfg.model.neck.scales) == [4, 2, 1, 0.5] and cfg.model.neck.out_channels == width
    assert cfg.model.aux_head.in_index == 3 and cfg.model.decode_head.channels == 512
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (6e-5, 0.01)
    assert (cfg.schedule.max_iters, cfg.schedule.warmup_iters) == (80000, 1500)
    assert cfg.trainer.precision == "fp32"
    with torch.device("meta"):
        model = build_model(cfg).train()
        out = model(torch.zeros(2, 3, 512, 1024))
    assert out["out"].shape == out["aux"].shape == (2, 19, 512, 1024)
    layout = {k: torch.empty(s, device="meta") for k, s in MMSEG[case]["shapes"].items()}
    assert recognise_mmseg(layout).config_groups == {"model": "upernet_vit", "backbone": name}
    expected = {k: v.shape for k, v in convert_mmseg_state_dict(layout).items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert isinstance(model.backbone, VisionTransformerBackbone)
    assert isinstance(model.neck, MultiLevelNeck)


def test_optimizer_groups_equal_mmengine_constructor() -> None:
    """optimizer=adamw_transformer on the ViT-B row equals mmengine's constructor with the zoo's
    ViT paramwise_cfg (pos_embed, cls_token, norm) on mmseg's model, parameter by parameter: the
    layers' LayerNorms (mmseg's ``ln1``/``ln2``, no "norm" in the name) do decay."""
    table = PARAM_GROUPS["upernet_vit"]["groups"]
    cfg = compose("train", ["experiment=upernet_vit-b_512x1024_80k_bdd100k",
                            "backbone.pretrained=false"])  # fmt: skip
    with torch.device("meta"):
        model = build_model(cfg)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)]: [g["lr"], g["weight_decay"]] for g in optimizer.param_groups
            for p in g["params"]}  # fmt: skip
    assert len(ours) == len(names)
    layout = {k: torch.empty(s, device="meta") for k, s in MMSEG["upernet_vit"]["shapes"].items()}
    renamed, unmatched = rename_keys(table, recognise_mmseg(layout).rules)
    assert not unmatched and set(renamed) == set(ours)
    wrong = {k: (ours[k], v) for k, v in renamed.items() if ours[k] != v}
    assert not wrong, wrong
    assert table["backbone.layers.0.ln1.weight"] == [6e-5, 0.01]
    assert table["backbone.pos_embed"] == table["backbone.cls_token"] == [6e-5, 0.0]


def _random_timm_vit() -> nn.Module:
    """A narrow timm ViT (width 32, 4 layers, 64x64) with random LayerNorm affines and position
    embeddings, so that no block is the identity."""
    torch.manual_seed(3)
    vit = VisionTransformer(img_size=64, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    with torch.no_grad():
        for name, tensor in vit.named_parameters():
            if "norm" in name or name in ("pos_embed", "cls_token"):
                tensor.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return vit.eval()


def _mmseg_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ViT keys -> mmseg's (what mmseg's vit2mmseg.py writes), under ``backbone.``."""
    rules = [(r"^blocks\.", "layers."), (r"\.norm([12])\.", r".ln\1."), (r"^norm\.", "ln1."),
             (r"\.attn\.qkv\.", ".attn.attn.in_proj_"), (r"\.attn\.proj\.", ".attn.attn.out_proj."),
             (r"\.mlp\.fc1\.", ".ffn.layers.0.0."), (r"\.mlp\.fc2\.", ".ffn.layers.1."),
             (r"^patch_embed\.proj\.", "patch_embed.projection.")]  # fmt: skip
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            continue
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out["backbone." + key.replace("in_proj_.", "in_proj_")] = value
    return out


def test_imagenet_weights_in_timm_and_mmseg_layouts(tmp_path: Path) -> None:
    """The original files' layout (timm's) gives timm's own layer outputs; the same weights in
    mmseg's layout load to the same model; the classifier and its final norm are left out."""
    timm_vit = _random_timm_vit()
    state = timm_vit.state_dict()
    safetensors.torch.save_file(state, tmp_path / "timm.safetensors")
    torch.save({"state_dict": _mmseg_layout(state)}, tmp_path / "mmseg.pth")
    x = torch.rand(2, 3, 64, 64) * 4 - 2
    expected = timm_vit.forward_intermediates(
        x, indices=[0, 1, 2, 3], norm=False, output_fmt="NCHW", intermediates_only=True
    )
    outputs = {}
    for name in ("timm.safetensors", "mmseg.pth"):
        ours = VisionTransformerBackbone(
            "vit_test", img_size=(64, 64), embed_dims=32, num_layers=4, num_heads=2,
            out_indices=(0, 1, 2, 3), pretrained=True, weights=tmp_path / name,
        ).eval()  # fmt: skip
        with torch.no_grad():
            # ours normalises nothing itself: feed timm's input as is.
            outputs[name] = ours(x)
    for got_timm, got_mmseg, want in zip(*outputs.values(), expected, strict=True):
        torch.testing.assert_close(got_timm, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got_timm, got_mmseg)


def test_hub_weights_offline_without_a_cached_copy_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match=r"deit_small_patch16_224\.fb_in1k.*no cached copy"):
        build_model(compose("train", ["experiment=upernet_deit-s_512x1024_80k_bdd100k"]))


@pytest.fixture(scope="module")
def trained(toy_root: Path, module_tmp: Path) -> Path:
    run_dir = module_tmp / "upernet_vit"
    train_in_process(toy_root, run_dir, *narrow())
    return run_dir


@pytest.mark.slow
def test_narrow_model_trains(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["loss"]) and 0 <= summary["val/mIoU"] <= 1
    model, _, _ = model_from_checkpoint(trained / "checkpoints/last.pt")
    assert isinstance(model.neck, MultiLevelNeck) and model.aux_head is None


@pytest.mark.slow
def test_exact_resume(toy_root: Path, tmp_path: Path) -> None:
    assert_resume_is_exact(toy_root, tmp_path, *narrow("schedule.warmup_iters=3"))


@pytest.mark.slow
def test_ddp_two_processes(toy_root: Path, tmp_path: Path) -> None:
    """Two gloo processes, every parameter used in each step (the class token and position
    embeddings, both heads)."""
    train_on_two_ranks(toy_root, tmp_path / "ddp", *narrow())


@pytest.mark.slow
def test_onnx_export_at_two_sizes(trained: Path, tmp_path: Path) -> None:
    """Dynamic batch and size: the class token follows the batch, the position embeddings the
    patch grid (75x110 is not a multiple of the patch size)."""
    assert_onnx_export_matches(trained / "checkpoints/last.pt", tmp_path / "vit.onnx")


@pytest.mark.slow
def test_model_zoo_row(trained: Path, toy_root: Path, tmp_path: Path) -> None:
    out = assert_model_zoo_row(trained, toy_root, tmp_path / "zoo")
    assert isinstance(
        model_from_checkpoint(out / "weights.pt")[0].backbone, VisionTransformerBackbone
    )


@pytest.mark.slow
def test_benchmark(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The benchmark's costs (attention counted; inference without the auxiliary head) and its
    training step with the zoo's optimizer."""
    result = benchmark_train_step(monkeypatch, tmp_path / "bench.json", *narrow())
    torch.manual_seed(0)
    assert result["model"]["params"] == count_parameters(build_model(compose("train", narrow())))
    costs = result["model"]
    assert 2 < costs["train_gflops_per_image"] / costs["forward_gflops_per_image"] < 4
