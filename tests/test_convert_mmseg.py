"""mmseg Semantic FPN (ResNetV1c-50) checkpoints convert into this project's format."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from semseg.cli import compose_groups
from semseg.data import dataset_meta
from semseg.errors import CheckpointError
from semseg.models import convert_mmseg_state_dict, mmseg_to_checkpoint, model_from_checkpoint
from semseg.models.checkpoint import load_checkpoint
from semseg.models.mmseg_conversion import MMSEG_CONFIG_GROUPS

REPO = Path(__file__).resolve().parents[1]


def _conv(out_ch: int, in_ch: int, k: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.randn(out_ch, in_ch, k, k)}


def _bn(ch: int) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.rand(ch) + 0.5,
        "bias": torch.randn(ch),
        "running_mean": torch.randn(ch),
        "running_var": torch.rand(ch) + 0.5,
        "num_batches_tracked": torch.tensor(40000),
    }


def _add(sd: dict, prefix: str, params: dict[str, torch.Tensor]) -> None:
    sd.update({f"{prefix}.{k}": v for k, v in params.items()})


def mmseg_fpn_r50_v1c(num_classes: int = 19) -> dict[str, torch.Tensor]:
    """A state dict laid out like mmseg's fpn_r50 (ResNetV1c backbone, FPN neck, FPNHead),
    written from mmseg's module structure, with random values."""
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    # Deep stem: conv(3->32, s2) bn relu conv(32->32) bn relu conv(32->64) bn relu.
    for idx, (out_ch, in_ch) in zip((0, 3, 6), ((32, 3), (32, 32), (64, 32))):
        _add(sd, f"backbone.stem.{idx}", _conv(out_ch, in_ch, 3))
        _add(sd, f"backbone.stem.{idx + 1}", _bn(out_ch))
    in_ch = 64
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 64 * 2 ** (stage - 1)
        for b in range(blocks):
            p = f"backbone.layer{stage}.{b}"
            _add(sd, f"{p}.conv1", _conv(planes, in_ch, 1))
            _add(sd, f"{p}.bn1", _bn(planes))
            _add(sd, f"{p}.conv2", _conv(planes, planes, 3))
            _add(sd, f"{p}.bn2", _bn(planes))
            _add(sd, f"{p}.conv3", _conv(planes * 4, planes, 1))
            _add(sd, f"{p}.bn3", _bn(planes * 4))
            if b == 0:
                _add(sd, f"{p}.downsample.0", _conv(planes * 4, in_ch, 1))
                _add(sd, f"{p}.downsample.1", _bn(planes * 4))
            in_ch = planes * 4
    for i, ch in enumerate((256, 512, 1024, 2048)):
        _add(sd, f"neck.lateral_convs.{i}.conv", _conv(256, ch, 1) | {"bias": torch.randn(256)})
        _add(sd, f"neck.fpn_convs.{i}.conv", _conv(256, 256, 3) | {"bias": torch.randn(256)})
    # FPNHead: scale_heads[i] = [ConvModule, Upsample] * n (no Upsample at level 0).
    for i, n in enumerate((1, 1, 2, 3)):
        for k in range(n):
            j = 2 * k if i > 0 else k
            _add(sd, f"decode_head.scale_heads.{i}.{j}.conv", _conv(128, 256 if k == 0 else 128, 3))
            _add(sd, f"decode_head.scale_heads.{i}.{j}.bn", _bn(128))
    _add(
        sd, "decode_head.conv_seg", _conv(num_classes, 128, 1) | {"bias": torch.randn(num_classes)}
    )
    return sd


@pytest.fixture(scope="module")
def mmseg_sd() -> dict[str, torch.Tensor]:
    return mmseg_fpn_r50_v1c()


@pytest.fixture(scope="module")
def bdd_config() -> dict:
    """What the converter script composes: Semantic FPN, resnet50c, the bdd100k dataset."""
    return compose_groups({**MMSEG_CONFIG_GROUPS, "dataset": "bdd100k"})


# (mmseg key, attribute path in this project's model, tensor name)
PLACES = [
    ("backbone.stem.0.weight", "backbone.model.conv1.0", "weight"),
    ("backbone.stem.4.running_mean", "backbone.model.conv1.4", "running_mean"),
    ("backbone.stem.6.weight", "backbone.model.conv1.6", "weight"),
    ("backbone.stem.7.running_var", "backbone.model.bn1", "running_var"),
    ("backbone.layer3.5.conv2.weight", "backbone.model.layer3.5.conv2", "weight"),
    ("backbone.layer4.0.downsample.1.bias", "backbone.model.layer4.0.downsample.1", "bias"),
    ("neck.lateral_convs.2.conv.bias", "fpn.inner_blocks.2.0", "bias"),
    ("neck.fpn_convs.3.conv.weight", "fpn.layer_blocks.3.0", "weight"),
    ("decode_head.scale_heads.0.0.conv.weight", "heads.0.0.0", "weight"),
    ("decode_head.scale_heads.3.4.bn.weight", "heads.3.4.1", "weight"),
    ("decode_head.scale_heads.2.2.conv.weight", "heads.2.2.0", "weight"),
    ("decode_head.conv_seg.weight", "classifier", "weight"),
    ("decode_head.conv_seg.bias", "classifier", "bias"),
]


def test_every_key_maps(mmseg_sd: dict[str, torch.Tensor]) -> None:
    converted = convert_mmseg_state_dict({"meta": {}, "state_dict": mmseg_sd})
    assert len(converted) == len(mmseg_sd)


def test_converted_checkpoint_loads_strictly_and_tensors_land(
    mmseg_sd: dict[str, torch.Tensor], bdd_config: dict
) -> None:
    checkpoint = mmseg_to_checkpoint(
        mmseg_sd, source="fpn_r50.pth", config=bdd_config, meta=dataset_meta(bdd_config["dataset"])
    )
    assert checkpoint["format_version"] == 1 and checkpoint["optimizer"] is None
    assert checkpoint["config"]["backbone"]["name"] == "resnet50c"
    assert checkpoint["meta"]["class_names"][18] == "bicycle"
    assert checkpoint["meta"]["palette"][0] == [128, 64, 128]
    model, meta, _ = model_from_checkpoint(checkpoint)  # strict load: no missing/unexpected
    for mm_key, module_path, tensor in PLACES:
        assert torch.equal(getattr(model.get_submodule(module_path), tensor), mmseg_sd[mm_key]), (
            mm_key
        )
    assert meta["num_classes"] == 19
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 64)).shape == (1, 19, 32, 64)


def test_unknown_keys_are_listed(mmseg_sd: dict[str, torch.Tensor]) -> None:
    extra = dict(mmseg_sd) | {"auxiliary_head.conv_seg.weight": torch.zeros(19, 256, 1, 1)}
    with pytest.raises(CheckpointError, match=r"auxiliary_head\.conv_seg\.weight"):
        convert_mmseg_state_dict(extra)


def test_class_count_mismatch(mmseg_sd: dict[str, torch.Tensor], bdd_config: dict) -> None:
    with pytest.raises(CheckpointError, match="19 classes, not --num-classes 7"):
        mmseg_to_checkpoint(mmseg_sd, source="x.pth", config=bdd_config, meta={}, num_classes=7)
    assert bdd_config["backbone"]["pretrained"] is True  # the caller's config is left as it was


def test_script_end_to_end(mmseg_sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "convert_mmseg_checkpoint", REPO / "scripts" / "convert_mmseg_checkpoint.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    src, out = tmp_path / "fpn_r50.pth", tmp_path / "converted.pt"
    torch.save({"meta": {"CLASSES": ["road"] * 19}, "state_dict": mmseg_sd}, src)
    assert script.main([str(src), str(out), "--num-classes", "19"]) == 0
    state = load_checkpoint(out)
    assert (
        state["meta"]["class_names"][0] == "road" and state["config"]["model"]["num_classes"] == 19
    )
    # (the script built the model and loaded these weights strictly before writing them)
    assert torch.equal(state["model"]["classifier.bias"], mmseg_sd["decode_head.conv_seg.bias"])
    with pytest.raises(SystemExit):  # argparse: "input checkpoint not found"
        script.main([str(tmp_path / "missing.pth"), str(out)])
