"""CCNet, PSANet and FCN on HRNet: mmseg's sizes for every zoo row, PSANet's mask settings, the
converter's settings read from a file (PSANet's mask size, HRNet's width), timm's ImageNet weights
in the HRNet backbone and why it is not timm's. The narrow models through training, resume, DDP,
ONNX, the model-zoo row and the benchmark: tests/test_model_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import (
    REPO,
    build_row,
    compose_train,
)
from safetensors.torch import save_file

from semseg.errors import CheckpointError
from semseg.models import build_model, model_from_checkpoint
from semseg.models.hrnet import HRNet
from semseg.models.mmseg_conversion import recognise_mmseg

MMSEG = json.loads((REPO / "tests/fixtures/mmseg/cases.json").read_text())["cases"]
# Each zoo row (conf/experiment/) and the mmseg reference case of its model.
ROWS = {
    "ccnet_r50-d8_512x1024_40k_bdd100k": "ccnet",
    "ccnet_r50-d8_512x1024_80k_bdd100k": "ccnet",
    "ccnet_r101-d8_512x1024_80k_bdd100k": "ccnet_r101",
    "psanet_r50-d8_512x1024_40k_bdd100k": "psanet",
    "psanet_r50-d8_512x1024_80k_bdd100k": "psanet",
    "fcn_hr48_512x1024_40k_bdd100k": "fcn_hr48",
    "fcn_hr48_512x1024_80k_bdd100k": "fcn_hr48",
}


# --------------------------------------------------------------------------------------------
# The models


@pytest.mark.parametrize("row", list(ROWS))
def test_zoo_rows_build_mmseg_models(row: str) -> None:
    """Each zoo row's model is mmseg's, tensor for tensor (the state dict of mmseg's model in the
    fixtures), and its recipe is the zoo's: 512x1024 crops, iterations, whole-image test."""
    cfg = compose_train(f"experiment={row}", "backbone.pretrained=false")
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = MMSEG[ROWS[row]]["shapes"]
    params = {k: s for k, s in shapes.items() if k.rsplit(".", 1)[-1] not in
              ("running_mean", "running_var", "num_batches_tracked")}  # fmt: skip
    assert len(model.state_dict()) == len(shapes)
    assert sum(p.numel() for p in model.parameters()) == sum(
        int(np.prod(s)) for s in params.values()
    )
    assert list(cfg.dataset.train_pipeline.crop_size) == [512, 1024]
    assert cfg.schedule.max_iters == (40_000 if "_40k_" in row else 80_000)
    assert cfg.inference.mode == "whole" and not cfg.model.align_corners
    assert (cfg.model.aux_head is None) == row.startswith("fcn_hr")


@pytest.mark.slow
def test_ccnet_attention_trains(trained_row) -> None:
    """The criss-cross attention's gamma leaves zero in training (left zero, its convs would
    get no gradient)."""
    model, _, _ = model_from_checkpoint(trained_row("ccnet") / "checkpoints/last.pt")
    assert model.decode_head.cca.gamma.scale.item() != 0.0


def test_psanet_mask_size_and_normalisation_follow_the_config() -> None:
    head = build_row("psanet", "model.decode_head.normalization_factor=null").decode_head
    assert head.mask_size == (15, 15) and head.normalization_factor == 225.0
    assert head.attention[1].out_channels == head.attention_p[1].out_channels == 225
    assert head.proj[0].padding == (1, 1)  # mmseg's ConvModule(kernel_size=1, padding=1)


def test_hrnet_takes_timm_imagenet_weights(tmp_path: Path) -> None:
    """timm's hrnet_w18 classification weights (a file in its layout) fill every tensor of the
    backbone; its extra head (incre_modules, classifier, ...) is left out."""
    torch.manual_seed(0)
    state = timm.create_model("hrnet_w18").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "hrnet_w18.safetensors")
    backbone = HRNet(18, pretrained=True, weights=tmp_path / "hrnet_w18.safetensors")
    own = backbone.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in own.items())
    assert len(own) < len(state) and any(k.startswith("incre_modules.") for k in state)


def test_hrnet_outputs_differ_from_timm_fuse() -> None:
    """Why hrnet.py exists: timm's HRNet fuses with nearest upsampling, so the same weights give
    other branch outputs (and the stride-4 branch differs most: every other branch is fused in)."""
    torch.manual_seed(0)
    ours = HRNet(18).eval()
    theirs = timm.create_model("hrnet_w18", features_only=True, feature_location="").eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected  # the same network, the same names
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), theirs(x)[1:]
    assert [t.shape for t in a] == [t.shape for t in b]
    assert not torch.allclose(a[0], b[0], atol=1e-3)


# --------------------------------------------------------------------------------------------
# Conversion settings read from the file


def _layout(case: str, **replace: tuple[int, ...]) -> dict[str, torch.Tensor]:
    shapes = {**MMSEG[case]["shapes"], **replace}
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_psanet_mask_size_comes_from_the_file() -> None:
    assert recognise_mmseg(_layout("psanet")).overrides == []  # the zoo's 97 x 97
    key = "decode_head.attention.1.weight"
    arch = recognise_mmseg(_layout("psanet", **{key: (69 * 69, 512, 1, 1)}))
    assert arch.overrides == ["model.decode_head.mask_size=[69,69]"]
    with pytest.raises(CheckpointError, match=r"PSAHead with a 60-channel attention: not a square"):
        recognise_mmseg(_layout("psanet", **{key: (60, 512, 1, 1)}))


def test_hrnet_width_comes_from_the_file() -> None:
    arch = recognise_mmseg(_layout("fcn_hr48"))
    assert arch.config_groups == {"model": "fcn_hr", "backbone": "hrnet_w48"} and not arch.has_aux
    key = "backbone.transition1.0.0.weight"
    with pytest.raises(CheckpointError, match=r"HRNet of width 32: only widths 18 .* and 48"):
        recognise_mmseg(_layout("fcn_hr18", **{key: (32, 256, 3, 3)}))


# --------------------------------------------------------------------------------------------
# HRNet's resize


def test_hrnet_upsample_equals_mmseg_resize_to_int_size() -> None:
    """mmseg's Upsample resizes to int(side * factor); interpolating by the factor (what exports
    to ONNX at any size) gives the same values, odd sides included."""
    from semseg.models.hrnet import Upsample

    for factor in (2, 4, 8):
        x = torch.randn(2, 3, 5, 7)
        size = [int(5 * factor), int(7 * factor)]
        expected = torch.nn.functional.interpolate(x, size=size, mode="bilinear")
        assert torch.equal(Upsample(factor)(x), expected)
