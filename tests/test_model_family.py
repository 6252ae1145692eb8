"""One model family: Semantic FPN is an encoder-decoder with a neck (mmseg's FPN) and FPNHead on
the shared DecodeHead base; checkpoints saved before that (old keys, old config) still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semseg.checkpoints.file import save_checkpoint
from semseg.cli import compose_groups
from semseg.data import dataset_meta
from semseg.models import EncoderDecoder, build_model, model_from_checkpoint
from semseg.models.build import load_start_weights, upgrade_legacy_keys
from semseg.models.necks import FPN

# Today's key prefixes -> the ones Semantic FPN checkpoints had before it was an encoder-decoder.
OLD_PREFIXES = {
    "neck.lateral_convs.": "fpn.inner_blocks.",
    "neck.fpn_convs.": "fpn.layer_blocks.",
    "decode_head.scale_heads.": "heads.",
    "decode_head.classifier.": "classifier.",
}


def small_config(model: str = "semantic_fpn", *overrides: str) -> dict:
    groups = {"model": model, "backbone": "resnet18", "dataset": "toy_bdd100k"}
    narrow = ["backbone.pretrained=false", "model.neck.out_channels=32"]
    return compose_groups(groups, [*narrow, "model.decode_head.channels=16", *overrides])


def old_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of today's Semantic FPN with the keys the old code wrote."""
    out = {}
    for key, value in state.items():
        new = next((p for p in OLD_PREFIXES if key.startswith(p)), None)
        out[OLD_PREFIXES[new] + key[len(new) :] if new else key] = value
    return out


def old_config(config: dict) -> dict:
    """``config`` with the model group the old conf/model/semantic_fpn.yaml composed."""
    model = config["model"]
    old = {
        "_target_": "semseg.models.semantic_fpn.semantic_fpn",
        "num_classes": model["num_classes"],
        "fpn_channels": model["neck"]["out_channels"],
        "head_channels": model["decode_head"]["channels"],
        "dropout": 0.1,
        "norm_layer": model["norm_layer"],
        "pixel_mean": model["pixel_mean"],
        "pixel_std": model["pixel_std"],
        "weights": None,
    }
    return {**config, "model": old}


@pytest.fixture(scope="module")
def model_and_config() -> tuple[EncoderDecoder, dict]:
    config = small_config()
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model, config


def test_semantic_fpn_is_an_encoder_decoder_with_the_fpn_neck(model_and_config) -> None:
    model, config = model_and_config
    assert config["model"]["_target_"] == "semseg.models.decoders.encoder_decoder"
    assert isinstance(model, EncoderDecoder) and isinstance(model.neck, FPN)
    assert model.neck.out_channels == [32] * 4 and model.aux_head is None
    assert model.decode_head.scale_heads[0][0][0].in_channels == 32
    # The neck's keys are mmseg's (``neck.``), the heads read its maps.
    assert "neck.lateral_convs.3.0.weight" in model.state_dict()
    assert model(torch.rand(1, 3, 64, 96) * 255).shape == (1, 19, 64, 96)


def test_semantic_fpn_gains_align_corners_and_the_aux_head() -> None:
    config = small_config(
        "semantic_fpn",
        "model.align_corners=true",
        "model/aux_head=fcn",
        "model.aux_head.channels=8",
    )
    model = build_model(config).train()
    assert model.decode_head.align_corners and model.align_corners
    assert model.decode_head.scale_heads[3][1].align_corners  # the 2x upsampling too
    assert model.aux_head.convs[0][0].in_channels == 32  # reads the neck's level 2
    out = model(torch.rand(2, 3, 64, 64) * 255)
    assert out["out"].shape == out["aux"].shape == (2, 19, 64, 64)


def test_the_neck_slot_takes_any_decoder() -> None:
    config = small_config("upernet", "model/neck=fpn", "model.aux_head.channels=8")
    model = build_model(config).eval()
    assert model.decode_head.lateral_convs[0][0].in_channels == 32
    assert model(torch.rand(1, 3, 64, 64) * 255).shape == (1, 19, 64, 64)


def test_checkpoint_of_the_old_semantic_fpn_loads(model_and_config, tmp_path: Path) -> None:
    """Old keys and old config (``_target_: ...semantic_fpn.semantic_fpn``): the same model,
    rebuilt for inference and as start weights of today's config."""
    model, config = model_and_config
    state = old_layout(model.state_dict())
    assert "fpn.inner_blocks.0.0.weight" in state and "heads.3.4.1.running_var" in state
    meta = dataset_meta(config["dataset"]) | {"num_classes": 19}
    old = old_config(config)
    path = save_checkpoint({"model": state, "config": old, "meta": meta}, tmp_path / "old.pt")
    images = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        expected = model(images)
        rebuilt, _, _ = model_from_checkpoint(path)
        assert torch.equal(rebuilt(images), expected)
        fresh = build_model(config).eval()
        load_start_weights(fresh, path)
        assert torch.equal(fresh(images), expected)


def test_legacy_key_upgrade_leaves_other_layouts_alone(model_and_config) -> None:
    model, _ = model_and_config
    state = model.state_dict()
    assert upgrade_legacy_keys(state).keys() == state.keys()
    assert upgrade_legacy_keys(old_layout(state)).keys() == state.keys()
