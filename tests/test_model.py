"""Semantic FPN (the encoder-decoder with the FPN neck and FPNHead): shapes, size, backbones from config, offline weights, whole-model checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from semseg.checkpoints.file import save_checkpoint
from semseg.cli import CONF_DIR, compose_groups
from semseg.data import dataset_meta
from semseg.errors import CheckpointError
from semseg.models import (
    EncoderDecoder,
    TimmBackbone,
    WeightsError,
    build_model,
    count_parameters,
    forward_gflops,
    load_model_weights,
    model_from_checkpoint,
)
from semseg.models.semantic_fpn import semantic_fpn

BACKBONE_CONFIGS = sorted((CONF_DIR / "backbone").glob("*.yaml"))


def config(backbone: str = "resnet18", model: str = "semantic_fpn", *overrides: str) -> dict:
    """Resolved model/backbone/dataset config from conf/, without pretrained weights."""
    groups = {"model": model, "backbone": backbone, "dataset": "bdd100k"}
    return compose_groups(groups, ["backbone.pretrained=false", *overrides])


@pytest.fixture(scope="module")
def cfg_r18() -> dict:
    return config()


@pytest.fixture(scope="module")
def model_r18(cfg_r18: dict) -> EncoderDecoder:
    torch.manual_seed(0)
    return build_model(cfg_r18)


# Sizes that stride 32 does not divide, down to 8 (72x136) and to 1 (97x131).
@pytest.mark.parametrize("size", [(100, 150), (97, 131), (72, 136)])
def test_output_is_input_size(model_r18: EncoderDecoder, size: tuple[int, int]) -> None:
    images = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    with torch.no_grad():
        logits = model_r18.eval()(images)
    assert logits.shape == (1, 19, *size)
    assert torch.isfinite(logits).all()


def test_gradients_reach_backbone(model_r18: EncoderDecoder) -> None:
    model_r18.train()
    model_r18.zero_grad()
    images = torch.rand(2, 3, 32, 64) * 255
    target = torch.randint(0, 19, (2, 32, 64))
    F.cross_entropy(model_r18(images), target).backward()
    stem = model_r18.backbone.model.conv1.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model_r18.parameters())


def test_normalisation_inside_with_config_stats(model_r18: EncoderDecoder) -> None:
    mean = model_r18.pixel_mean.flatten().tolist()
    assert mean == pytest.approx([123.675, 116.28, 103.53])
    assert model_r18.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375])
    # Non-persistent: the statistics are config, not weights.
    assert "pixel_mean" not in model_r18.state_dict()
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        model_r18.eval()
        assert torch.allclose(model_r18(images), model_r18(images.float()))


def test_architecture_matches_reference(model_r18: EncoderDecoder) -> None:
    heads = model_r18.decode_head.scale_heads
    assert [len([m for m in h if isinstance(m, torch.nn.Sequential)]) for h in heads] == [
        1,
        1,
        2,
        3,
    ]
    assert model_r18.backbone.out_strides == [4, 8, 16, 32]
    assert model_r18.neck.lateral_convs[0][0].out_channels == 256
    assert model_r18.neck.fpn_convs[0][0].kernel_size == (3, 3)
    assert heads[2][0][0].bias is None  # conv before norm: no bias
    assert isinstance(heads[1][1], torch.nn.Upsample)
    assert model_r18.decode_head.dropout.p == 0.1
    assert model_r18.decode_head.classifier.out_channels == 19


def test_parameter_count_and_flops_resnet50_resnet101() -> None:
    # meta device: shapes only, so the big backbones cost nothing to build.
    with torch.device("meta"):
        r50 = build_model(config("resnet50"))
        r101 = build_model(config("resnet101"))
    assert count_parameters(r50) == pytest.approx(28.48e6, rel=0.005)
    assert count_parameters(r101) == pytest.approx(47.5e6, rel=0.01)
    assert forward_gflops(r50, 512, 1024) == pytest.approx(176, rel=0.02)


def test_group_norm_variant() -> None:
    model = build_model(config("resnet18", "semantic_fpn_gn"))
    norm = model.decode_head.scale_heads[3][2][1]
    assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == 32
    assert model(torch.rand(1, 3, 64, 64) * 255).shape == (1, 19, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("path", BACKBONE_CONFIGS, ids=lambda p: p.stem)
def test_backbone_config_builds_and_trains(path: Path) -> None:
    bb_cfg = OmegaConf.load(path)
    bb_cfg.pretrained = False
    backbone = instantiate(bb_cfg)
    # [4, 8, 16, 32]; the dilated *_d8 configs: [4, 8, 8, 8]; HRNet's are fixed (no config key)
    if "out_strides" in bb_cfg:  # HRNet's and the ViTs' are fixed (no config key)
        assert backbone.out_strides == list(bb_cfg.out_strides)
    assert backbone.out_strides in ([4, 8, 16, 32], [4, 8, 8, 8], [16, 16, 16, 16])
    assert len(backbone.out_channels) == 4
    model = semantic_fpn(backbone, num_classes=19)
    # 32x32, the smallest input every level sees (1x1 at stride 32); a batch of 2 so that
    # BatchNorm in training mode has two values per channel there.
    logits = model(torch.rand(2, 3, 32, 32) * 255)
    assert logits.shape == (2, 19, 32, 32)
    logits.mean().backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:3])


def test_taps_chosen_by_reduction() -> None:
    # ConvNeXt has no stride-2 tap: its stride-4..32 maps are feature indices 0..3, ResNet's 1..4.
    convnext = TimmBackbone("convnext_tiny")
    assert convnext.model.feature_info.out_indices == (0, 1, 2, 3)
    assert TimmBackbone("resnet18").model.feature_info.out_indices == (1, 2, 3, 4)


def test_wrong_strides_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"resnet18.*\[64\].*\[2, 4, 8, 16, 32\]"):
        TimmBackbone("resnet18", out_strides=(4, 8, 16, 64))
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224.*reductions"):
        TimmBackbone("vit_tiny_patch16_224")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_offline_pretrained_weights(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source, path)
    else:
        torch.save(source, path)
    backbone = TimmBackbone("resnet18", pretrained=True, weights=str(path))
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(source) - {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, source[key]), key


def test_missing_weights_file_names_the_config_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match=rf"backbone\.weights={missing}.*not found"):
        TimmBackbone("resnet18", pretrained=True, weights=missing)


def test_weights_file_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit backbone 'resnet34'"):
        TimmBackbone("resnet34", pretrained=True, weights=path)


def test_hub_offline_without_cached_copy_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"backbone\.weights=.*backbone\.pretrained=false"):
        TimmBackbone("resnet18", pretrained=True)
    # A hang guard, not a benchmark: hub retries without network take ~46 s.
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("path", BACKBONE_CONFIGS, ids=lambda p: p.stem)
def test_every_backbone_has_imagenet_weights_that_timm_loads(path: Path) -> None:
    # backbone.pretrained=true reads the classification weights that timm's pretrained_cfg names
    # (the hub, else a URL) and maps them into the backbone: every configured backbone must have some.
    name = OmegaConf.load(path).name
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file), name


def test_convnext_weights_load_through_the_flattened_names(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = timm.create_model("convnext_atto", pretrained=False).state_dict()
    path = tmp_path / "convnext_atto.safetensors"
    safetensors.torch.save_file(source, path)
    backbone = TimmBackbone("convnext_atto", pretrained=True, weights=str(path))
    loaded = backbone.model.state_dict()
    assert "stages_0.blocks.0.conv_dw.weight" in loaded
    assert torch.equal(loaded["stages_0.blocks.0.conv_dw.weight"],
                       source["stages.0.blocks.0.conv_dw.weight"])  # fmt: skip
    assert torch.equal(loaded["stem_0.weight"], source["stem.0.weight"])


def test_channels_last_bf16_autocast(model_r18: EncoderDecoder) -> None:
    model = model_r18.eval().to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert logits.shape == (2, 19, 64, 96)
    assert torch.isfinite(logits.float()).all()
    model.to(memory_format=torch.contiguous_format)


def test_flops_of_small_model(model_r18: EncoderDecoder) -> None:
    gflops = forward_gflops(model_r18, 64, 128)
    assert 0 < gflops < 10
    assert model_r18.backbone.model.conv1.weight.device.type == "cpu"  # counted on a copy


def _save(model: EncoderDecoder, cfg: dict, path: Path) -> Path:
    state = {"model": model.state_dict(), "config": cfg, "meta": dataset_meta(cfg["dataset"])}
    return save_checkpoint(state | {"iteration": 3, "metrics": {}}, path)


def test_model_from_checkpoint_round_trip(
    model_r18: EncoderDecoder, cfg_r18: dict, tmp_path: Path
) -> None:
    path = _save(model_r18, cfg_r18, tmp_path / "ckpt.pt")
    rebuilt, meta, stored = model_from_checkpoint(path)
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model_r18.eval()(images))
    assert meta["class_names"][6] == "traffic light" and len(meta["palette"]) == 19
    assert stored["backbone"]["name"] == "resnet18"
    # Fine-tuning start: model.weights=PATH loads the same weights through the factory.
    finetune = build_model(config("resnet18", "semantic_fpn", f"model.weights={path}"))
    assert torch.equal(
        finetune.decode_head.classifier.weight, model_r18.decode_head.classifier.weight
    )


def test_class_count_mismatch_lists_keys(
    model_r18: EncoderDecoder, cfg_r18: dict, tmp_path: Path
) -> None:
    path = _save(model_r18, cfg_r18, tmp_path / "ckpt19.pt")
    seven = config("resnet18", "semantic_fpn", "model.num_classes=7", f"model.weights={path}")
    with pytest.raises(CheckpointError, match=r"19 classes, the model 7.*classifier\.weight") as e:
        build_model(seven)
    assert "classifier.bias" in str(e.value) and str(path) in str(e.value)
    # Architecture mismatch: missing and unexpected keys are listed.
    other = build_model(config("resnet18", "semantic_fpn", "model.num_classes=7"))
    state = dict(model_r18.state_dict())
    state["extra.weight"] = state.pop("decode_head.classifier.weight")
    with pytest.raises(
        CheckpointError, match=r"missing keys \(1\): decode_head\.classifier\.weight"
    ) as e:
        load_model_weights(other, state, source="x.pt")
    assert "unexpected keys (1): extra.weight" in str(e.value)


def test_wrapper_prefixes_are_stripped_in_either_nesting():
    from semseg.models.build import strip_wrapper_prefixes

    one = torch.ones(1)
    for prefix in ("module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod.", ""):
        assert strip_wrapper_prefixes({f"{prefix}head.w": one, f"{prefix}b": one}) == {
            "head.w": one,
            "b": one,
        }
