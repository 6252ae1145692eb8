"""UPerNet on ViT-B / DeiT-S through mmseg's MultiLevelNeck, the BDD100K zoo's ViT rows: the two
experiments against the zoo's configs and mmseg's models, the optimizer's parameter groups against
mmengine's own constructor, ImageNet weights in timm's and mmseg's layouts. The narrow UPerNet +
ViT (width 32, 4 layers; the model-contract row ``upernet_vit``) through training, resume, DDP,
ONNX, the model-zoo row and the benchmark: tests/test_model_contract.py.

The full-size ViT-B UPerNet runs in tests/test_mmseg_exactness.py (mmseg's logits); DeiT-S is
built here on the meta device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from helpers import (
    REPO,
    build_row,
)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from semseg.cli import compose
from semseg.engine.optim import build_optimizer
from semseg.models import build_model
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


def test_narrow_model_reads_the_vit_through_the_multilevel_neck() -> None:
    model = build_row("upernet_vit")
    assert isinstance(model.neck, MultiLevelNeck)
    assert isinstance(model.backbone, VisionTransformerBackbone)
