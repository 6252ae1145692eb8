"""ConvNeXt as the BDD100K zoo's UPerNet rows use it: mmpretrain's features from mmcls-layout
weights, the key rules, ImageNet weights in timm's or mmcls's layout, the zoo's drop-path and
layer-scale settings, activation checkpointing, and a few training iterations of each size.

The references come from scripts/mmpretrain_reference.py (mmpretrain 1.2.0), stored in
tests/fixtures/convnext/; the weights and images are recreated here with that script's helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from helpers import REPO, load_script, train_in_process
from hydra.utils import instantiate
from omegaconf import OmegaConf

from semseg.cli import CONF_DIR
from semseg.errors import ConfigError
from semseg.models import TimmBackbone, WeightsError, count_parameters, forward_gflops
from semseg.models.convnext import ConvNeXtBackbone, convert_mmcls_convnext
from semseg.models.mmseg_conversion import mmcls_convnext_rules, rename_keys
from semseg.models.semantic_fpn import semantic_fpn

FIXTURES = REPO / "tests" / "fixtures" / "convnext"
SIZES = {"tiny": (0.4, 18), "small": (0.3, 36), "base": (0.4, 36)}  # drop-path rate, blocks


@pytest.fixture(scope="module")
def reference():
    return load_script("mmpretrain_reference")


@pytest.fixture(scope="module")
def mm_shapes() -> dict[str, dict[str, list[int]]]:
    return json.loads((FIXTURES / "mmseg_param_groups.json").read_text())["shapes"]


@pytest.fixture(scope="module")
def mm_features() -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(FIXTURES / "features_tiny.safetensors")


@pytest.fixture(scope="module")
def mm_weights(reference, mm_shapes) -> dict[str, torch.Tensor]:
    """The seeded weights of the reference run, in mmcls/mmpretrain's layout."""
    return reference.seeded_weights(mm_shapes["tiny"])


def backbone_config(size: str, *overrides: str):
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"convnext_{size}.yaml")
    cfg.pretrained = False
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def max_diff_to_reference(backbone, reference, mm_features, stages=range(4)) -> dict:
    """Max |ours - mmpretrain's| per size and stage, for the stored images."""
    diffs = {}
    with torch.no_grad():
        for h, w in reference.SIZES:
            image = mm_features[f"image/{h}x{w}"]
            ours = backbone.eval()(reference.normalise(image))
            for i in stages:
                expected = mm_features[f"{h}x{w}/{i}"]
                assert ours[i].shape == expected.shape, (h, w, i)
                diffs[(h, w, i)] = (ours[i] - expected).abs().max().item()
    return diffs


def test_mmcls_weights_give_mmpretrain_features(reference, mm_weights, mm_features) -> None:
    backbone = ConvNeXtBackbone("convnext_tiny")
    backbone.load_state_dict(convert_mmcls_convnext(mm_weights, "test"), strict=True)
    diffs = max_diff_to_reference(backbone, reference, mm_features)
    # 32x64 is a multiple of 32, 36x44 is not (stride-32 map 1x1, stride-4 map 9x11).
    assert max(diffs.values()) < 1e-4, diffs
    assert mm_features["32x64/0"].std() > 0.5  # the maps carry signal, not near-zero noise
    # The helpers recreate exactly the images the reference saw.
    for h, w in reference.SIZES:
        assert torch.equal(reference.structured_image(h, w), mm_features[f"image/{h}x{w}"])


def test_mmcls_imagenet_file_loads_with_its_final_norm(
    reference, mm_weights, mm_features, tmp_path: Path
) -> None:
    # An mmcls classification checkpoint: meta + state_dict, backbone.* with norm3 only, head.fc.
    state = {
        f"backbone.{k}": v
        for k, v in mm_weights.items()
        if not k.startswith(("norm0", "norm1", "norm2"))
    }
    state |= {"head.fc.weight": torch.zeros(1000, 768), "head.fc.bias": torch.zeros(1000)}
    path = tmp_path / "convnext-tiny_in1k.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": state}, path)
    backbone = ConvNeXtBackbone("convnext_tiny", pretrained=True, weights=path)
    diffs = max_diff_to_reference(backbone, reference, mm_features, stages=[3])
    assert max(diffs.values()) < 1e-4, diffs
    for i in range(3):  # output norms the file lacks start at identity
        norm = getattr(backbone, f"norm{i}")
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()


def test_timm_file_fills_the_final_norm_from_the_classifier_norm(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = timm.create_model("convnext_atto").state_dict()
    source["head.norm.weight"] = torch.rand_like(source["head.norm.weight"])
    path = tmp_path / "convnext_atto.safetensors"
    safetensors.torch.save_file(source, path)
    backbone = ConvNeXtBackbone("convnext_atto", pretrained=True, weights=path)
    assert torch.equal(backbone.norm3.weight, source["head.norm.weight"])
    assert torch.equal(backbone.model.stages_2.blocks[1].mlp.fc1.weight,
                       source["stages.2.blocks.1.mlp.fc1.weight"])  # fmt: skip
    assert torch.equal(backbone.norm0.weight, torch.ones(40))


@pytest.mark.slow
def test_mmcls_file_of_another_size_is_a_clear_error(mm_weights, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in mm_weights.items()}}, path)
    with pytest.raises(
        WeightsError, match=r"does not fit backbone 'convnext_small'.*missing keys"
    ) as e:
        ConvNeXtBackbone("convnext_small", pretrained=True, weights=path)
    assert "model.stages_2.blocks.9.conv_dw.weight" in str(e.value) and str(path) in str(e.value)
    torch.save({"backbone.downsample_layers.0.0.weight": torch.zeros(1),
                "backbone.stages.0.0.grn.gamma": torch.zeros(1)}, path)  # fmt: skip
    with pytest.raises(
        WeightsError, match=r"not an mmcls/mmpretrain ConvNeXt.*stages\.0\.0\.grn\.gamma"
    ):
        ConvNeXtBackbone("convnext_tiny", pretrained=True, weights=path)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_rules_map_every_mmcls_key_onto_the_backbone(size: str, mm_shapes) -> None:
    # mmpretrain's names and shapes (ConvNeXt-S has ConvNeXt-B's names and ConvNeXt-T's widths).
    names = mm_shapes["base" if size == "small" else size]
    with torch.device("meta"):
        backbone = ConvNeXtBackbone(f"convnext_{size}")
    own = backbone.state_dict()
    renamed, unmatched = rename_keys({k: torch.empty(0) for k in names}, mmcls_convnext_rules())
    assert not unmatched and set(renamed) == set(own)
    if size != "small":
        to_ours = dict(zip(names, renamed))
        assert all(list(own[to_ours[k]].shape) == shape for k, shape in names.items())


def test_rules_with_prefixes_for_whole_segmentation_models(mm_shapes) -> None:
    rules = mmcls_convnext_rules("backbone.", "backbone.")
    state = {f"backbone.{k}": torch.empty(0) for k in mm_shapes["tiny"]}
    state["decode_head.conv_seg.weight"] = torch.empty(0)
    renamed, unmatched = rename_keys(state, rules)
    assert unmatched == ["decode_head.conv_seg.weight"]
    assert renamed.keys() >= {"backbone.model.stages_2.blocks.8.mlp.fc2.weight",
                              "backbone.model.stages_3.downsample.0.bias", "backbone.norm2.weight"}  # fmt: skip
    with torch.device("meta"):
        model = semantic_fpn(ConvNeXtBackbone("convnext_tiny"), num_classes=19)
    backbone_keys = {k for k in model.state_dict() if k.startswith("backbone.")}
    assert set(renamed) == backbone_keys


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_zoo_drop_path_layer_scale_and_output_norms(size: str) -> None:
    rate, blocks = SIZES[size]
    with torch.device("meta"):
        backbone = instantiate(backbone_config(size))
    drop = [getattr(b.drop_path, "drop_prob", 0.0) for s in backbone.model.values()
            if hasattr(s, "blocks") for b in s.blocks]  # fmt: skip
    assert drop == pytest.approx(torch.linspace(0, rate, blocks).tolist())  # mmcls's rule
    norms = [getattr(backbone, f"norm{i}") for i in range(4)]
    assert [n.normalized_shape[0] for n in norms] == backbone.out_channels
    assert all(n.eps == 1e-6 for n in norms)
    gamma = backbone.model.stages_0.blocks[0].gamma
    with torch.device("cpu"):
        small = ConvNeXtBackbone("convnext_atto", ls_init_value=1.0)
    assert gamma.shape == (backbone.out_channels[0],) and torch.equal(
        small.model.stages_0.blocks[0].gamma, torch.ones(40)
    )


def test_only_convnext_models() -> None:
    with pytest.raises(ConfigError, match=r"backbone\.name=resnet18 is not a timm ConvNeXt"):
        ConvNeXtBackbone("resnet18")


@pytest.mark.parametrize(
    ("backbone", "checkpointed"),
    [
        (lambda **kw: ConvNeXtBackbone("convnext_atto", **kw), "stages_1.blocks.0"),
        (lambda **kw: TimmBackbone("resnet18", **kw), "layer2"),
    ],
    ids=["convnext", "resnet"],
)
def test_grad_checkpointing_recomputes_and_keeps_gradients(backbone, checkpointed: str) -> None:
    torch.manual_seed(0)
    plain = backbone()
    torch.manual_seed(0)
    recompute = backbone(grad_checkpointing=True)
    x = torch.randn(2, 3, 64, 64)
    calls = []
    for model in (plain, recompute):
        module = model.model.get_submodule(checkpointed)
        module.register_forward_pre_hook(lambda *_: calls.append(1))
        model.train()
        sum(f.square().mean() for f in model(x)).backward()
        calls.append(0)
    # ConvNeXt: every block runs again in the backward pass; ResNet: each middle layer does.
    assert calls == [1, 0, 1, 1, 0]
    for (name, a), b in zip(plain.named_parameters(), recompute.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_each_size_trains_with_the_zoo_recipe(size: str, toy_root: Path, tmp_path: Path) -> None:
    # The zoo's optimizer (AdamW, stage-wise lr decay) and warm-up schedule on the toy data; ImageNet
    # weights cannot be fetched here, so the backbone starts from timm's init.
    summary = train_in_process(
        toy_root, tmp_path, f"backbone=convnext_{size}", "backbone.pretrained=false",
        "optimizer=adamw_convnext", "schedule=warmup_poly_40k", "schedule.max_iters=3",
        "schedule.warmup_iters=2", "trainer.eval_interval=1000", "trainer.log_interval=1",
        "trainer.eval_at_end=false", "trainer.keep_last=0",
    )  # fmt: skip
    assert summary["steps"] == 3
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3]
    assert all(0 < x["loss"] < 10 for x in train)
    # The logged lr is the head group's (scale 1) for the next iteration i: 1e-4 * (1 - i/3),
    # warmed up from 1e-6 over 2 iterations.
    expected = [1e-4 * (1 - i / 3) * (1e-6 + (1 - 1e-6) * min(i, 2) / 2) for i in (1, 2, 3)]
    assert [x["lr"] for x in train] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "backbone_gflops", "fpn_gflops"),
    [("tiny", 93.1, 178.7), ("small", 181.5, 267.1), ("base", 320.9, 407.5)],
)
def test_params_and_flops_at_512x1024(size: str, backbone_gflops: float, fpn_gflops: float) -> None:
    # The figures of docs/performance.md ("ConvNeXt"), on the meta device.
    with torch.device("meta"):
        backbone = instantiate(backbone_config(size))
        model = semantic_fpn(backbone, num_classes=19)
        classifier = timm.create_model(f"convnext_{size}")
    # timm's classification model less its fc, plus norm0-2 (norm3 is its head.norm).
    fc = classifier.head.fc.weight.numel() + classifier.head.fc.bias.numel()
    norms = sum(2 * c for c in backbone.out_channels[:3])
    assert count_parameters(backbone) == count_parameters(classifier) - fc + norms
    assert forward_gflops(backbone, 512, 1024) == pytest.approx(backbone_gflops, abs=0.05)
    assert forward_gflops(model, 512, 1024) == pytest.approx(fpn_gflops, abs=0.05)
