"""DPT on ViT-B, the BDD100K zoo's dpt_vit row: the experiment against the zoo's config and mmseg's
model, the optimizer's parameter groups against mmengine's own constructor, the converter on a
DPT file, and the narrow DPT (ViT of width 32 and 4 layers; the model-contract row ``dpt``):
its parameter groups after training. Training, resume, DDP, ONNX, the model-zoo row and the
benchmark: tests/test_model_contract.py.

The full-size DPT runs in tests/test_mmseg_exactness.py (mmseg's logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    load_script,
    row_overrides,
)

from semseg.checkpoints.file import load_checkpoint
from semseg.cli import compose
from semseg.engine.optim import build_optimizer
from semseg.errors import ConfigError
from semseg.models import build_model, model_from_checkpoint
from semseg.models.dpt import DPTHead
from semseg.models.mmseg_conversion import convert_mmseg_state_dict, recognise_mmseg, rename_keys
from semseg.models.vit import VisionTransformerBackbone

FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
MMSEG = json.loads((FIXTURES / "cases.json").read_text())["cases"]
PARAM_GROUPS = json.loads((FIXTURES / "param_groups.json").read_text())
ROW = "dpt_vit-b_512x1024_80k_bdd100k"


def layout() -> dict[str, torch.Tensor]:
    """mmseg's DPT + ViT-B state dict (the zoo's settings): its keys, meta tensors of its shapes."""
    return {k: torch.empty(s, device="meta") for k, s in MMSEG["dpt"]["shapes"].items()}


# --------------------------------------------------------------------------------------------
# The zoo's row


def test_zoo_row_is_the_zoo_config() -> None:
    """SysCV/bdd100k-models sem_seg/configs/sem_seg/dpt_vit_512x1024_80k_sem_seg_bdd100k.py and
    its _base_/models/dpt_vit.py, value for value."""
    cfg = compose("train", [f"experiment={ROW}"])
    b = cfg.backbone
    assert b._target_.endswith("VisionTransformerBackbone") and b.pretrained
    assert list(b.img_size) == [224, 224] and b.patch_size == 16 and b.norm_eps == 1e-5
    assert (b.embed_dims, b.num_layers, b.num_heads, b.drop_path_rate) == (768, 12, 12, 0.0)
    assert list(b.out_indices) == [2, 5, 8, 11] and not b.final_norm
    model = cfg.model
    assert model._target_ == "semseg.models.dpt.dpt" and model.get("aux_head") is None
    assert model.get("neck") is None and not model.align_corners
    head = model.decode_head
    assert head._target_.endswith("DPTHead") and head.readout_type == "project"
    assert (head.channels, head.dropout, list(head.in_index)) == (256, 0.1, [0, 1, 2, 3])
    assert list(head.post_process_channels) == [96, 192, 384, 768]
    opt = cfg.optimizer
    assert opt._target_ == "torch.optim.AdamW" and (opt.lr, opt.weight_decay) == (6e-5, 0.01)
    assert list(opt.betas) == [0.9, 0.999]
    assert cfg.param_groups._target_.endswith("CustomKeys")
    keys = cfg.param_groups.custom_keys  # the zoo's: pos_embed, cls_token, norm (no decay)
    assert all(dict(keys[k]) == {"decay_mult": 0.0} for k in ("pos_embed", "cls_token", "norm"))
    s = cfg.schedule
    assert (s.max_iters, s.power, s.min_lr, s.warmup_iters, s.warmup_ratio) == (
        80000, 1.0, 0.0, 1500, 1e-6,
    )  # fmt: skip
    # _base_/models/dpt_vit.py: norm_cfg BN (the UPerNet rows': SyncBN).
    assert cfg.trainer.precision == "fp32" and not cfg.trainer.sync_bn
    assert cfg.dataset.name == "bdd100k" and cfg.dataset.batch_size == 2
    pipeline = cfg.dataset.train_pipeline
    assert list(pipeline.crop_size) == [512, 1024] and list(pipeline.scale) == [1280, 720]
    assert cfg.inference.mode == "whole" and cfg.loss.normalize == "all"
    assert {"dpt", "vit-b", "80k"} <= set(cfg.tags)


def test_zoo_row_builds_mmseg_model() -> None:
    """The row's model has mmseg's DPT + ViT-B layout, tensor for tensor (the converted key list
    of mmseg's model with the zoo's settings: 197 position embeddings, no auxiliary head), and
    runs at 512x1024 (meta device)."""
    cfg = compose("train", [f"experiment={ROW}", "backbone.pretrained=false"])
    with torch.device("meta"):
        model = build_model(cfg).train()
        out = model(torch.zeros(2, 3, 512, 1024))
    assert out.shape == (2, 19, 512, 1024)  # no auxiliary head: logits alone
    arch = recognise_mmseg(layout())
    assert arch.config_groups == {"model": "dpt", "backbone": "vit_base"} and not arch.has_aux
    assert set(arch.overrides) == {"backbone.img_size=[224,224]", "backbone.norm_eps=1e-5"}
    expected = {k: v.shape for k, v in convert_mmseg_state_dict(layout()).items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert model.backbone.pos_embed.shape == (1, 197, 768) and model.backbone.output_cls_token
    assert isinstance(model.decode_head, DPTHead) and model.aux_head is None
    assert model.decode_head.fusion_blocks[0].res_conv_unit1 is None


def test_optimizer_groups_equal_mmengine_constructor() -> None:
    """optimizer=adamw_transformer on the row equals mmengine's DefaultOptimWrapperConstructor
    with the zoo's paramwise_cfg (pos_embed, cls_token, norm) on mmseg's DPT, parameter by
    converted name: the head has no "norm" in its names, so all of it decays."""
    table = PARAM_GROUPS["dpt"]["groups"]
    cfg = compose("train", [f"experiment={ROW}", "backbone.pretrained=false"])
    with torch.device("meta"):
        model = build_model(cfg)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)]: [g["lr"], g["weight_decay"]] for g in optimizer.param_groups
            for p in g["params"]}  # fmt: skip
    assert len(ours) == len(names)  # every parameter, once
    renamed, unmatched = rename_keys(table, recognise_mmseg(layout()).rules)
    assert not unmatched and set(renamed) == set(ours)
    wrong = {k: (ours[k], v) for k, v in renamed.items() if ours[k] != v}
    assert not wrong, wrong
    assert table["backbone.pos_embed"] == table["backbone.cls_token"] == [6e-5, 0.0]
    assert table["backbone.layers.0.ln1.weight"] == [6e-5, 0.01]
    assert table["decode_head.fusion_blocks.1.res_conv_unit1.conv1.bn.weight"] == [6e-5, 0.01]


def test_dpt_needs_a_vit_without_aux_head() -> None:
    with pytest.raises(ConfigError, match=r"model=dpt reads a ViT's class tokens"):
        build_model(compose("train", ["model=dpt", "backbone=resnet18",
                                      "backbone.pretrained=false"]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.aux_head=null"):
        build_model(compose("train", row_overrides("dpt", "model/aux_head=fcn")))


# --------------------------------------------------------------------------------------------
# The converter script on a DPT file


@pytest.mark.slow
def test_script_converts_a_dpt_file(tmp_path: Path, capsys) -> None:
    """A zoo-like file (mmseg 0.x meta, seeded weights) converts with no argument but the paths;
    the rebuilt model holds its tensors."""
    weights = load_script("mmseg_reference").seeded_weights(MMSEG["dpt"]["shapes"])
    src, out = tmp_path / "dpt_vit.pth", tmp_path / "dpt_vit.pt"
    torch.save({"meta": {"mmseg_version": "0.20.2"}, "state_dict": weights}, src)
    assert load_script("convert_mmseg_checkpoint").main([str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recognised mmseg DPTHead on mmseg VisionTransformer" in printed
    assert "built model=dpt backbone=vit_base" in printed
    model, meta, _ = model_from_checkpoint(out)
    assert model.backbone.layers[0].ln1.eps == 1e-5 and model.backbone.output_cls_token
    assert meta["class_names"][0] == "road"
    head = model.decode_head
    pairs = [
        (head.reassemble_blocks.readout_projects[2][0].weight,
         "decode_head.reassemble_blocks.readout_projects.2.0.weight"),
        (head.reassemble_blocks.resize_layers[0].weight,
         "decode_head.reassemble_blocks.resize_layers.0.weight"),
        (head.fusion_blocks[3].res_conv_unit2.conv1[1].running_var,
         "decode_head.fusion_blocks.3.res_conv_unit2.conv1.bn.running_var"),
        (head.classifier.bias, "decode_head.conv_seg.bias"),
    ]  # fmt: skip
    for tensor, key in pairs:
        assert torch.equal(tensor, weights[key]), key


# --------------------------------------------------------------------------------------------
# The narrow model (the contract's row) with the zoo's recipe


@pytest.mark.slow
def test_narrow_model_trains_with_the_zoo_groups(trained_row) -> None:
    checkpoint = load_checkpoint(trained_row("dpt") / "checkpoints/last.pt")
    model, _, _ = model_from_checkpoint(checkpoint)
    assert isinstance(model.backbone, VisionTransformerBackbone) and model.aux_head is None
    assert isinstance(model.decode_head, DPTHead)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
