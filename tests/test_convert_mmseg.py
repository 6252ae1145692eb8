"""mmseg checkpoints convert into this project's format: Semantic FPN (ResNetV1c-50) built by hand,
and every architecture of the zoo from mmseg's own key layouts (ResNetV1c; UPerNet on mmcls 0.x /
mmpretrain 1.x ConvNeXt-T/S/B)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import load_script, mmseg_fpn_r50_v1c

from semseg.checkpoints.file import load_checkpoint
from semseg.cli import compose_groups
from semseg.data import dataset_meta
from semseg.errors import CheckpointError
from semseg.models import (
    build_model,
    convert_mmseg_state_dict,
    mmseg_to_checkpoint,
    model_from_checkpoint,
)
from semseg.models.mmseg_conversion import MMSEG_CONFIG_GROUPS, recognise_mmseg

REPO = Path(__file__).resolve().parents[1]
# What mmseg's BDD100K files name in their meta (the converter checks them against --dataset).
BDD100K_CLASSES = compose_groups({"dataset": "bdd100k"})["dataset"]["class_names"]


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
    ("neck.lateral_convs.2.conv.bias", "neck.lateral_convs.2.0", "bias"),
    ("neck.fpn_convs.3.conv.weight", "neck.fpn_convs.3.0", "weight"),
    ("decode_head.scale_heads.0.0.conv.weight", "decode_head.scale_heads.0.0.0", "weight"),
    ("decode_head.scale_heads.3.4.bn.weight", "decode_head.scale_heads.3.4.1", "weight"),
    ("decode_head.scale_heads.2.2.conv.weight", "decode_head.scale_heads.2.2.0", "weight"),
    ("decode_head.conv_seg.weight", "decode_head.classifier", "weight"),
    ("decode_head.conv_seg.bias", "decode_head.classifier", "bias"),
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


@pytest.mark.slow
def test_script_end_to_end(mmseg_sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "convert_mmseg_checkpoint", REPO / "scripts" / "convert_mmseg_checkpoint.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    src, out = tmp_path / "fpn_r50.pth", tmp_path / "converted.pt"
    torch.save({"meta": {"CLASSES": BDD100K_CLASSES}, "state_dict": mmseg_sd}, src)
    assert script.main([str(src), str(out), "--num-classes", "19"]) == 0
    state = load_checkpoint(out)
    assert (
        state["meta"]["class_names"][0] == "road" and state["config"]["model"]["num_classes"] == 19
    )
    # (the script built the model and loaded these weights strictly before writing them)
    assert torch.equal(
        state["model"]["decode_head.classifier.bias"], mmseg_sd["decode_head.conv_seg.bias"]
    )
    with pytest.raises(SystemExit):  # error: input checkpoint not found
        script.main([str(tmp_path / "missing.pth"), str(out)])


# --------------------------------------------------------------------------------------------
# Every architecture of the zoo's mmseg files: recognised from the keys, or refused in one line.
# The layouts are mmseg's own (the key/shape lists scripts/mmseg_reference.py recorded from
# mmseg 1.2.2's models); the exactness of the converted models is tests/test_mmseg_exactness.py.

MMSEG_CASES = json.loads((REPO / "tests/fixtures/mmseg/cases.json").read_text())["cases"]


def layout(case: str) -> dict[str, torch.Tensor]:
    """mmseg's state dict of ``case``: its keys with tensors of their shapes on the meta device
    (recognition reads keys, and shapes where sizes share their keys: ConvNeXt-S and -B)."""
    return {
        key: torch.empty(shape, device="meta") for key, shape in MMSEG_CASES[case]["shapes"].items()
    }


@pytest.mark.parametrize("case", list(MMSEG_CASES))
def test_architecture_recognised_from_keys(case: str) -> None:
    arch = recognise_mmseg(layout(case))
    assert arch.config_groups == MMSEG_CASES[case]["groups"]
    assert arch.has_aux == any(k.startswith("auxiliary_head.") for k in MMSEG_CASES[case]["shapes"])
    assert arch.has_aux == (
        not case.startswith(("semantic_fpn", "fcn_hr")) and case not in ("pointrend", "dpt")
    )
    renamed = convert_mmseg_state_dict({"state_dict": layout(case)})
    assert len(renamed) == len(MMSEG_CASES[case]["shapes"])  # every key has a rule


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MMSEG_CASES))
def test_converted_layout_is_the_model_of_its_config(case: str) -> None:
    """Every tensor of mmseg's model lands on a tensor of this project's model of the same shape,
    and every tensor of that model is filled (ConvNeXt-S/B and ResNet-101 included)."""
    arch = recognise_mmseg(layout(case))
    config = compose_groups(
        {**arch.config_groups, "dataset": "bdd100k"},
        [*arch.overrides, "backbone.pretrained=false"],
    )
    with torch.device("meta"):
        own = build_model(config).state_dict()
    renamed = convert_mmseg_state_dict(layout(case))
    assert set(renamed) == set(own)
    assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in own.items()}


def test_group_norm_semantic_fpn_is_recognised(mmseg_sd: dict[str, torch.Tensor]) -> None:
    gn = {k.replace(".bn.", ".gn."): v for k, v in mmseg_sd.items()}
    gn = {k: v for k, v in gn.items() if not k.endswith(("running_mean", "running_var", "tracked"))}
    assert recognise_mmseg(gn).config_groups == {
        "model": "semantic_fpn_gn",
        "backbone": "resnet50c",
    }


def _renamed(sd: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in sd.items()}


def _isanet() -> dict[str, torch.Tensor]:
    """mmseg's ISANet (``isanet_r50-d8``: ISAHead, interlaced sparse self-attention), which this
    project does not have: the FCN file's decode head swapped for ISAHead's layers."""
    isa = [
        f"decode_head.{name}.{part}.weight"
        for name in ("in_conv", "out_conv")
        for part in ("conv", "bn")
    ]
    isa += [
        f"decode_head.{relation}.{project}.0.conv.weight"
        for relation in ("global_relation", "local_relation")
        for project in ("key_project", "query_project", "value_project", "output_project")
    ]
    fcn_head = ("decode_head.convs.", "decode_head.conv_cat.")
    fcn = {k: v for k, v in layout("fcn").items() if not k.startswith(fcn_head)}
    return fcn | {key: torch.empty(0) for key in isa}


REFUSED = {
    # ISANet: a decode head this project does not have
    "isanet": (
        _isanet,
        r"decode_head submodules: conv_seg, global_relation, in_conv, local_relation, out_conv",
    ),
    # A cascade of decode heads without PointRend's point head
    "cascade_without_point_head": (
        lambda: _renamed(layout("semantic_fpn"), "decode_head.", "decode_head.0."),
        r"decode_head submodules: 0",
    ),
    # deformable convolutions in the backbone (the zoo's "+ DCN" rows)
    "dcn": (
        lambda: layout("pspnet") | {"backbone.layer2.0.conv2.conv_offset.weight": torch.empty(0)},
        r"PSPHead on ResNetV1c.*keys without a mapping \(1\): backbone\.layer2\.0\.conv2\.conv_offset",
    ),
    # ResNetV1d: average-pool downsampling (downsample.1 is the conv, .2 the norm)
    "resnet_v1d": (
        lambda: layout("upernet") | {"backbone.layer1.0.downsample.2.weight": torch.empty(0)},
        r"keys without a mapping \(1\): backbone\.layer1\.0\.downsample\.2\.weight",
    ),
    # a transformer backbone
    "swin": (
        lambda: {k: v for k, v in layout("upernet").items() if not k.startswith("backbone.")}
        | {"backbone.patch_embed.projection.weight": torch.empty(0)},
        r"not a supported mmseg backbone \(backbone keys: backbone\.patch_embed",
    ),
    # ResNetV1c-152 has no backbone config here
    "resnet152": (
        lambda: layout("fcn") | {f"backbone.layer3.{i}.conv1.weight": torch.empty(0)
                                 for i in range(6, 36)},
        r"ResNetV1c with \[3, 4, 36, 3\] blocks per stage",
    ),
    # ConvNeXt-L (stem width 192) has no backbone config here
    "convnext_large": (
        lambda: layout("upernet_convnext_base")
        | {"backbone.downsample_layers.0.0.weight": torch.empty(192, 3, 4, 4, device="meta")},
        r"ConvNeXt with \[3, 3, 27, 3\] blocks per stage and stem width 192: only convnext_tiny",
    ),
    # ConvNeXt V2 (global response norm in each block)
    "convnext_v2": (
        lambda: layout("upernet_convnext") | {"backbone.stages.0.0.grn.gamma": torch.empty(0)},
        r"UPerHead on mmcls/mmpretrain ConvNeXt.*keys without a mapping \(1\): backbone\.stages\.0\.0\.grn\.gamma",
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unsupported_architectures_are_refused_in_one_line(kind: str) -> None:
    make, pattern = REFUSED[kind]
    with pytest.raises(CheckpointError, match=pattern) as info:
        convert_mmseg_state_dict(make())
    message = str(info.value)
    assert "\n" not in message
    if kind not in ("resnet152", "convnext_large"):  # those name the sizes that have configs
        assert "supported: " in message and "PSPHead (model=pspnet)" in message


def test_refused_file_writes_nothing(tmp_path: Path, capsys) -> None:
    script = load_script("convert_mmseg_checkpoint")
    src, out = tmp_path / "isanet.pth", tmp_path / "isanet.pt"
    torch.save({"state_dict": REFUSED["isanet"][0]()}, src)
    with pytest.raises(SystemExit) as info:
        script.main([str(src), str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not a supported mmseg decode head") and "\n" not in err
    assert list(tmp_path.iterdir()) == [src]


@pytest.fixture(scope="module")
def deeplabv3plus_file(module_tmp: Path) -> Path:
    """An mmseg 1.x checkpoint of DeepLabV3+ R-50-D8 (seeded weights in mmseg's layout): meta,
    state_dict, message hub, optimizer and schedulers, all plain data."""
    weights = load_script("mmseg_reference").seeded_weights(MMSEG_CASES["deeplabv3plus"]["shapes"])
    path = module_tmp / "deeplabv3plus_r50-d8.pth"
    torch.save(
        {
            "meta": {"mmengine_version": "0.10.7", "epoch": 0, "iter": 80000,
                     "dataset_meta": {"classes": BDD100K_CLASSES}},
            "state_dict": weights,
            "message_hub": {"log_scalars": {}, "runtime_info": {"iter": 80000}},
            "optimizer": {"state": {}, "param_groups": []},
            "param_schedulers": [{"eta_min": 1e-4, "power": 0.9}],
        },
        path,
    )  # fmt: skip
    return path


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["model.aux_head=null"]])
def test_script_converts_a_decoder(
    deeplabv3plus_file: Path, tmp_path: Path, capsys, overrides: list[str]
) -> None:
    script = load_script("convert_mmseg_checkpoint")
    out = tmp_path / "deeplabv3plus.pt"
    assert script.main([str(deeplabv3plus_file), str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "recognised mmseg DepthwiseSeparableASPPHead on ResNetV1c" in printed
    assert "built model=deeplabv3plus backbone=resnet50c_d8" in printed
    kept = not overrides
    assert f"auxiliary head {'kept' if kept else 'left out'}" in printed
    state = load_checkpoint(out)
    assert any(k.startswith("aux_head.") for k in state["model"]) == kept
    assert state["config"]["backbone"]["output_stride"] == 8
    model, meta, _ = model_from_checkpoint(out)  # strict; without the auxiliary head
    assert model.aux_head is None and meta["class_names"][0] == "road"
    source = torch.load(deeplabv3plus_file, weights_only=True)["state_dict"]
    assert torch.equal(
        model.decode_head.c1_bottleneck[1].running_var,
        source["decode_head.c1_bottleneck.bn.running_var"],
    )
    if kept:  # the auxiliary head's weights, for fine-tuning
        assert torch.equal(
            state["model"]["aux_head.classifier.weight"], source["auxiliary_head.conv_seg.weight"]
        )


@pytest.mark.slow
def test_script_without_aux_weights_configures_no_aux_head(tmp_path: Path, capsys) -> None:
    weights = load_script("mmseg_reference").seeded_weights(MMSEG_CASES["upernet"]["shapes"])
    weights = {k: v for k, v in weights.items() if not k.startswith("auxiliary_head.")}
    src, out = tmp_path / "upernet.pth", tmp_path / "upernet.pt"
    torch.save({"state_dict": weights}, src)
    script = load_script("convert_mmseg_checkpoint")
    assert script.main([str(src), str(out), "model.align_corners=true"]) == 0
    assert "built model=upernet backbone=resnet50c;" in capsys.readouterr().out
    config = load_checkpoint(out)["config"]
    assert config["model"]["aux_head"] is None and config["model"]["align_corners"] is True


# --------------------------------------------------------------------------------------------
# ConvNeXt: mmcls 0.x (the zoo's) and mmpretrain 1.x files share their keys; mmcls 0.x built the
# LayerNorm before each downsampling conv with eps 1e-5 (mmpretrain and timm: 1e-6).

MMENGINE_META = {"mmengine_version": "0.10.7", "dataset_meta": {"classes": BDD100K_CLASSES}}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("meta", "eps"),
    [(None, 1e-5), ({"mmcv_version": "1.7.0", "mmseg_version": "0.30.0"}, 1e-5),
     (MMENGINE_META, 1e-6)],
    ids=["zoo-file-without-meta", "mmcls-0.x", "mmpretrain-1.x"],
)  # fmt: skip
def test_convnext_file_version_sets_the_downsampling_norm_eps(
    meta: dict | None, eps: float, tmp_path: Path, capsys
) -> None:
    weights = load_script("mmseg_reference").seeded_weights(
        MMSEG_CASES["upernet_convnext"]["shapes"]
    )
    src, out = tmp_path / "upernet_convnext-t.pth", tmp_path / "upernet_convnext-t.pt"
    torch.save(weights if meta is None else {"meta": meta, "state_dict": weights}, src)
    assert load_script("convert_mmseg_checkpoint").main([str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "recognised mmseg UPerHead on mmcls/mmpretrain ConvNeXt (convnext_tiny, output " in printed
    )
    assert "built model=upernet backbone=convnext_tiny, auxiliary head kept" in printed
    assert ("+backbone.downsample_norm_eps=1e-5" in printed) == (eps == 1e-5)
    state = load_checkpoint(out)
    assert state["config"]["backbone"].get("downsample_norm_eps", 1e-6) == eps
    model, _, _ = model_from_checkpoint(out)
    stages = [model.backbone.model.get_submodule(f"stages_{i}") for i in range(4)]
    assert [s.downsample[0].eps for s in stages[1:]] == [eps] * 3
    assert model.backbone.model.stem_1.eps == 1e-6  # the stem's norm: norm_cfg's in both
    assert torch.equal(
        model.backbone.model.stages_2.blocks[8].mlp.fc2.weight,
        weights["backbone.stages.2.8.pointwise_conv2.weight"],
    )
    assert torch.equal(model.backbone.norm3.bias, weights["backbone.norm3.bias"])
