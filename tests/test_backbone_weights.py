"""The one loader of backbone weights (semseg.models.backbone_weights): every backbone family
(ResNet through TimmBackbone, ConvNeXt, Swin, ViT, HRNet) takes its ImageNet weights from the Hub
cache and from files in each of its layouts (timm's, mmseg's, mmcls's) through the same
``load_pretrained`` and the same mismatch report, giving identical tensors; on the Hub path the
backbone is built once (no classifier, no meta copy) and no timm model is loaded pretrained.

The per-family checks of the loaded values against timm's or mmseg's own outputs are in
test_model.py, test_convnext.py, test_upernet_swin.py, test_upernet_vit.py and
test_context_heads.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from helpers import hub_cache_repo
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from semseg.models import backbone_weights
from semseg.models.backbone import TimmBackbone
from semseg.models.backbone_weights import WeightsError
from semseg.models.convnext import ConvNeXtBackbone
from semseg.models.hrnet import HRNet
from semseg.models.swin import SwinBackbone, _timm_to_mmseg
from semseg.models.vit import VisionTransformerBackbone

State = dict[str, Tensor]


def _renamed(state: State, subs: tuple[tuple[str, str], ...], prefix: str = "") -> State:
    """``state`` with every substitution applied to each key, under ``prefix``."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in subs:
            key = re.sub(pattern, replacement, key)
        out[prefix + key] = value
    return out


def _mmcls_convnext(state: State) -> State:
    """timm's ConvNeXt -> an mmcls/mmpretrain classification checkpoint (backbone.*, head.*)."""
    backbone = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    subs = ((r"^stem\.", "downsample_layers.0."), (r"^head\.norm\.", "norm3."),
            (r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1."),
            (r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.depthwise_conv."),
            (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc([12])\.", r"stages.\1.\2.pointwise_conv\3."),
            (r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2."))  # fmt: skip
    head = {k: v for k, v in state.items() if k.startswith("head.fc.")}
    return _renamed(backbone, subs, "backbone.") | head


def _mmseg_vit(state: State) -> State:
    """timm's ViT -> mmseg's layout (vit2mmseg), without the classifier."""
    subs = ((r"^blocks\.", "layers."), (r"\.norm([12])\.", r".ln\1."), (r"^norm\.", "ln1."),
            (r"\.attn\.qkv\.(weight|bias)", r".attn.attn.in_proj_\1"),
            (r"\.attn\.proj\.", ".attn.attn.out_proj."), (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
            (r"\.mlp\.fc2\.", ".ffn.layers.1."), (r"^patch_embed\.proj\.", "patch_embed.projection."))  # fmt: skip
    return _renamed({k: v for k, v in state.items() if not k.startswith("head.")}, subs)


def _mmseg_segmentor(state: State) -> State:
    """A whole mmseg model around the backbone ``state``: its other parts are left out."""
    return {f"backbone.{k}": v for k, v in state.items()} | {
        "decode_head.conv_seg.weight": torch.zeros(19, 8, 1, 1)
    }


def _narrow_hrnet(**kwargs) -> HRNet:
    return HRNet(8, modules_per_stage=(1, 1, 1), blocks_per_branch=1, **kwargs)


def _hrnet_source() -> State:
    return _narrow_hrnet().state_dict() | {"classifier.weight": torch.randn(10, 8)}


def _convnext_source() -> State:
    state = timm.create_model("convnext_atto").state_dict()
    return state | {"head.norm.weight": torch.rand_like(state["head.norm.weight"])}


@dataclass(frozen=True)
class Family:
    build: Callable[..., nn.Module]  # (pretrained=, weights=) -> the backbone
    hub: str  # the timm model whose Hub weights it takes
    source: Callable[[], State]  # weights in timm's layout
    pair: tuple[str, str]  # a backbone key and the timm key it comes from
    layouts: dict[str, Callable[[State], State]] = field(default_factory=dict)
    timm_builds: int = 0  # timm models built with real tensors (the backbone itself)


SWIN = "swin_tiny_patch4_window7_224.ms_in1k"
VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
FAMILIES = {
    "resnet": Family(
        lambda **kw: TimmBackbone("resnet18", **kw), "resnet18",
        lambda: timm.create_model("resnet18").state_dict(),
        ("model.layer2.1.conv2.weight", "layer2.1.conv2.weight"),
        {"checkpoint": lambda s: {"model": s}}, timm_builds=1,
    ),
    "convnext": Family(
        lambda **kw: ConvNeXtBackbone("convnext_atto", **kw), "convnext_atto", _convnext_source,
        ("norm3.weight", "head.norm.weight"), {"mmcls": _mmcls_convnext}, timm_builds=1,
    ),
    "swin": Family(
        lambda **kw: SwinBackbone(SWIN, 16, [2, 2, 2, 2], [1, 2, 2, 4], **kw), SWIN,
        lambda: timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16,
                                  depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)).state_dict(),
        ("stages.0.blocks.1.attn.qkv.weight", "layers.0.blocks.1.attn.qkv.weight"),
        {"mmseg": lambda s: _mmseg_segmentor(_timm_to_mmseg(s))},
    ),
    "vit": Family(
        lambda **kw: VisionTransformerBackbone(VIT, img_size=(64, 64), embed_dims=32,
                                               num_layers=2, num_heads=2, out_indices=(0, 1), **kw),
        VIT,
        lambda: VisionTransformer(img_size=64, embed_dim=32, depth=2, num_heads=2).state_dict(),
        ("layers.1.ffn.fc2.weight", "blocks.1.mlp.fc2.weight"), {"mmseg": _mmseg_vit},
    ),
    "hrnet": Family(
        lambda **kw: _narrow_hrnet(name="hrnet_w18", **kw), "hrnet_w18", _hrnet_source,
        ("transition2.2.0.0.weight", "transition2.2.0.0.weight"), {"mmseg": _mmseg_segmentor},
    ),
}  # fmt: skip


def _offline_hub(cache: Path, name: str, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    """``state`` as the cached Hub weights of timm model ``name``, the hub offline."""
    folder = cache.parent / "upload"
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, folder / "model.safetensors")
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    hub_cache_repo(cache, repo, folder, ["model.safetensors"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_every_layout_goes_through_the_one_loader_and_the_hub_builds_once(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    source = {k: v.contiguous().clone() for k, v in family.source().items()}
    _offline_hub(tmp_path / "hub", family.hub, source, monkeypatch)
    files = {"timm.safetensors": source}
    for name, layout in family.layouts.items():
        torch.save({"state_dict": layout(source)}, tmp_path / f"{name}.pth")
        files[f"{name}.pth"] = layout(source)
    safetensors.torch.save_file(source, tmp_path / "timm.safetensors")

    builds, loads = [], []
    create_model, load_weights = timm.create_model, backbone_weights.load_weights

    def counting_create_model(*args, **kwargs) -> nn.Module:
        model = create_model(*args, **kwargs)
        builds.append((next(model.parameters()).device.type, kwargs.get("pretrained")))
        return model

    def counting_load_weights(module: nn.Module, *args, **kwargs) -> None:
        loads.append(type(module))
        load_weights(module, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", counting_create_model)
    monkeypatch.setattr(backbone_weights, "load_weights", counting_load_weights)
    from_hub = family.build(pretrained=True).state_dict()
    # The backbone itself is the one real build (a timm backbone also reads its taps from a
    # meta-device model: shapes only); no classifier and no pretrained timm model.
    assert [b for b in builds if b[0] != "meta"] == [("cpu", False)] * family.timm_builds
    assert all(pretrained is False for _, pretrained in builds)
    own, timm_key = family.pair
    assert torch.equal(from_hub[own], source[timm_key])

    for name in files:
        loaded = family.build(pretrained=True, weights=tmp_path / name).state_dict()
        assert loaded.keys() == from_hub.keys(), name
        different = [k for k, v in loaded.items() if not torch.equal(v, from_hub[k])]
        assert not different, (name, different[:5])
    assert len(loads) == 1 + len(files) and len(set(loads)) == 1


@pytest.mark.parametrize("family", ["swin", "vit", "hrnet"])
def test_a_file_that_does_not_fit_is_one_report(family: str, tmp_path: Path) -> None:
    """Every family reports through the same line: the file, the backbone, every key."""
    torch.manual_seed(0)
    state = FAMILIES[family].source()
    state = {k: v for k, v in state.items() if not k.endswith("bias")}  # drop some tensors
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(WeightsError) as e:
        FAMILIES[family].build(pretrained=True, weights=path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"backbone.weights={path} does not fit")
    assert re.search(r"missing keys \(\d+\): \S+bias", message), message
