"""FCN, PSPNet, DeepLabV3, DeepLabV3+ and UPerNet: mmseg's sizes, the forward contract, the
auxiliary head (training only), and everything around a model: training, exact resume with EMA,
DDP, inference modes, ONNX export, the model-zoo writer, the benchmark, fine-tuning weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    assert_model_zoo_row,
    assert_onnx_export_matches,
    assert_resume_is_exact,
    benchmark_train_step,
    train_in_process,
    train_on_two_ranks,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from semseg.checkpoints.file import load_checkpoint, make_checkpoint, save_checkpoint
from semseg.cli import compose, compose_groups
from semseg.data import dataset_meta
from semseg.engine.trainer import sync_batchnorm
from semseg.errors import CheckpointError, ConfigError
from semseg.evaluation.inference import predict_logits
from semseg.losses import OhemCrossEntropy, SegCrossEntropy
from semseg.models import EncoderDecoder, build_model, count_parameters, model_from_checkpoint
from semseg.models.backbone import BackboneStrideError, TimmBackbone
from semseg.models.decoders import adaptive_avg_pool

DECODERS = ["fcn", "pspnet", "deeplabv3", "deeplabv3plus", "upernet"]
DILATED = {"fcn", "pspnet", "deeplabv3", "deeplabv3plus"}  # the zoo's "-D8" rows
MMSEG = json.loads((REPO / "tests/fixtures/mmseg/cases.json").read_text())["cases"]


def small(name: str) -> list[str]:
    """Overrides for a small model ``name`` (ResNet-18, narrow heads), dilated where the zoo is."""
    return [
        f"model={name}",
        f"backbone={'resnet18_d8' if name in DILATED else 'resnet18'}",
        "backbone.pretrained=false",
        "model.decode_head.channels=32",
        "model.aux_head.channels=16",
    ]


def small_config(name: str, *overrides: str) -> dict:
    groups = dict(o.split("=", 1) for o in small(name)[:2])
    return compose_groups({**groups, "dataset": "bdd100k"}, [*small(name)[2:], *overrides])


def small_model(name: str, *overrides: str) -> EncoderDecoder:
    torch.manual_seed(0)
    return build_model(small_config(name, *overrides))


def zoo_model(name: str) -> EncoderDecoder:
    """The zoo's model (R-50-D8 / R-50) on the meta device: shapes only."""
    backbone = "resnet50c_d8" if name in DILATED else "resnet50c"
    cfg = compose_groups(
        {"model": name, "backbone": backbone, "dataset": "bdd100k"}, ["backbone.pretrained=false"]
    )
    with torch.device("meta"):
        return build_model(cfg)


# --------------------------------------------------------------------------------------------
# The models


@pytest.mark.parametrize("name", DECODERS)
def test_zoo_models_have_mmseg_sizes(name: str) -> None:
    """Tensor for tensor the size of mmseg's model (its state dict, from the fixtures); the
    parameter count for inference leaves the auxiliary head (1024 -> 256, 2.36M) out."""
    model = zoo_model(name)
    shapes = MMSEG[name]["shapes"]
    params = {k: s for k, s in shapes.items() if k.rsplit(".", 1)[-1] in ("weight", "bias")}
    total = sum(int(np.prod(s)) for s in params.values())
    aux = sum(int(np.prod(s)) for k, s in params.items() if k.startswith("auxiliary_head."))
    assert len(model.state_dict()) == len(shapes)
    assert sum(p.numel() for p in model.parameters()) == total
    assert count_parameters(model) == total - aux
    assert aux == 1024 * 256 * 9 + 2 * 256 + 256 * 19 + 19
    head = model.aux_head
    assert (head.in_index, len(head.convs), head.conv_cat) == (2, 1, None)
    for h in (model.decode_head, head):
        assert isinstance(h.dropout, torch.nn.Dropout2d) and h.dropout.p == 0.1
    assert model.decode_head.classifier.in_channels == 512 and not model.align_corners


@pytest.mark.parametrize("name", DECODERS)
def test_forward_contract(name: str) -> None:
    """Eval: logits at the input size (any size, uint8 or float); training: {"out", "aux"} at the
    input size; without the auxiliary head a tensor in training too."""
    model = small_model(name)
    images = torch.randint(0, 256, (2, 3, 75, 110), dtype=torch.uint8)
    with torch.no_grad():
        logits = model.eval()(images)
        assert logits.shape == (2, 19, 75, 110) and torch.isfinite(logits).all()
        assert torch.allclose(model(images.float()), logits)
        out = model.train()(images)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 19, 75, 110)
    plain = small_model(name, "model.aux_head=null").train()
    assert plain.aux_head is None and plain(images).shape == (2, 19, 75, 110)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "backbone"),
    [("upernet", "convnext_tiny"), ("deeplabv3plus", "efficientnet_b3"), ("pspnet", "resnet101")],
)
def test_decoders_take_other_backbones(name: str, backbone: str) -> None:
    """The heads read the backbone's channels: any backbone config fits (shapes only)."""
    cfg = compose_groups(
        {"model": name, "backbone": backbone, "dataset": "bdd100k"}, ["backbone.pretrained=false"]
    )
    with torch.device("meta"):
        model = build_model(cfg).train()
        out = model(torch.zeros(2, 3, 96, 160))
    assert out["out"].shape == out["aux"].shape == (2, 19, 96, 160)
    channels = model.backbone.out_channels
    assert model.aux_head.convs[0][0].in_channels == channels[2]


@pytest.mark.parametrize("loss", ["ce", "ohem"])
def test_aux_loss_is_weighted_by_the_aux_heads_loss_weight(loss: str) -> None:
    extra = ["loss.min_kept=10", "loss.thresh=0.01"] if loss == "ohem" else []
    narrow = ["backbone=resnet18", "backbone.pretrained=false", "model.decode_head.channels=8"]
    cfg = compose("train", [f"loss={loss}", *extra, "model=fcn", *narrow,
                            "model.aux_head.channels=8", "model.aux_head.loss_weight=0.25"])  # fmt: skip
    assert cfg.model.aux_head.sample_pixels is False
    loss_fn = instantiate(cfg.loss)
    assert isinstance(loss_fn, SegCrossEntropy)
    assert isinstance(loss_fn, OhemCrossEntropy) == (loss == "ohem")
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    out, aux = torch.randn(2, 19, 8, 8, generator=gen), torch.randn(2, 19, 8, 8, generator=gen)
    target = torch.randint(0, 19, (2, 8, 8), generator=gen)
    target[0, 0] = 255
    # The decode head with the group's sampler (OHEM), the auxiliary head without.
    expected = loss_fn(out, target) + 0.25 * loss_fn.cross_entropy(aux, target)
    assert torch.equal(model.loss({"out": out, "aux": aux}, target, loss_fn), expected)
    if loss == "ohem":  # OHEM dropped pixels of the decode head's
        assert loss_fn(out, target) < loss_fn.cross_entropy(out, target)
    if loss == "ce":  # mmseg's normalisation: summed over valid pixels, divided by all
        plain = F.cross_entropy(out, target, ignore_index=255, reduction="sum") / target.numel()
        assert loss_fn(out, target) == pytest.approx(plain.item(), rel=1e-6)


def test_sync_bn_conversion_reaches_every_head() -> None:
    model = sync_batchnorm(small_model("deeplabv3plus"))  # what DDP on CUDA runs
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds


def test_adaptive_avg_pool_for_export_equals_torch() -> None:
    x = torch.randn(2, 3, 10, 13)
    for size in (1, 2, 3, 6):
        torch.testing.assert_close(adaptive_avg_pool(x, size), F.adaptive_avg_pool2d(x, size))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.aux_head.in_index=7", r"model\.aux_head reads a feature map .* returns 4 "),
        ("model.decode_head.num_convs=0", r"model\.decode_head: .*num_convs=0 needs channels=512"),
    ],
)
def test_bad_head_settings_are_one_clear_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        small_model("fcn", override)
    assert "\n" not in str(info.value)


def test_out_indices_are_checked() -> None:
    backbone = TimmBackbone("resnet18", output_stride=8, out_indices=[1, 2, 3, 4], out_strides=None)
    assert backbone.out_strides == [4, 8, 8, 8] and backbone.out_channels == [64, 128, 256, 512]
    with pytest.raises(BackboneStrideError, match=r"out_indices=\[1, 5\].*0\.\.4"):
        TimmBackbone("resnet18", out_indices=[1, 5])
    with pytest.raises(BackboneStrideError, match=r"strides \[4, 8, 16, 32\].*\[4, 8, 8, 8\]"):
        TimmBackbone("resnet18", out_indices=[1, 2, 3, 4], out_strides=[4, 8, 8, 8])


# --------------------------------------------------------------------------------------------
# Training and what uses its checkpoints


@pytest.fixture(scope="module")
def trained(toy_root: Path, module_tmp: Path) -> dict[str, Path]:
    """One short run per decoder (2 iterations, evaluated at the end); their run folders."""
    runs = {}
    for name in DECODERS:
        run_dir = module_tmp / name
        train_in_process(toy_root, run_dir, *small(name), "schedule.max_iters=2")
        runs[name] = run_dir
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODERS)
def test_each_decoder_trains_on_toy_data(name: str, trained: dict[str, Path]) -> None:
    run_dir = trained[name]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["loss"])
    assert 0 <= summary["val/mIoU"] <= 1
    checkpoint = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert any(k.startswith("aux_head.") for k in checkpoint["model"])  # trained, kept
    model, _, _ = model_from_checkpoint(checkpoint)  # for inference: without it
    assert model.aux_head is None and not any(k.startswith("aux_head.") for k in model.state_dict())
    assert summary["params"] == count_parameters(model) == count_parameters(small_model(name))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 40, 56)).shape == (1, 19, 40, 56)


@pytest.mark.slow
def test_exact_resume_with_aux_head_and_ema(toy_root: Path, tmp_path: Path) -> None:
    """4 iterations straight == 2, stop, resume to 4: weights (auxiliary head included),
    momenta and EMA."""
    a, b = assert_resume_is_exact(toy_root, tmp_path, *small("deeplabv3plus"))
    assert any(k.startswith("aux_head.") for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.slow
def test_ddp_two_processes_train_a_decoder_with_aux_head(toy_root: Path, tmp_path: Path) -> None:
    """Two gloo processes (plain BatchNorm: SyncBN needs CUDA), every parameter used in each
    step (the auxiliary head's too), one run folder."""
    train_on_two_ranks(toy_root, tmp_path / "ddp", *small("pspnet"))


def test_inference_modes(trained: dict[str, Path]) -> None:
    model, _, _ = model_from_checkpoint(trained["upernet"] / "checkpoints/last.pt")
    images = torch.randint(0, 256, (1, 3, 48, 64), dtype=torch.uint8)
    with torch.no_grad():
        whole = predict_logits(model, images)
        torch.testing.assert_close(whole, model(images))
        window = {"mode": "slide", "crop_size": (48, 64), "stride": (24, 32)}
        torch.testing.assert_close(predict_logits(model, images, **window), whole)  # one window
        slide = predict_logits(model, images, mode="slide", crop_size=(32, 48), stride=(16, 16))
        tta = predict_logits(model, images, flip=True, scales=(0.75, 1.0))
    assert slide.shape == tta.shape == (1, 19, 48, 64)
    torch.testing.assert_close(tta.exp().sum(1), torch.ones(1, 48, 64))  # averaged probabilities


@pytest.mark.slow
def test_onnx_export_is_right_at_every_size(trained: dict[str, Path], tmp_path: Path) -> None:
    """Pyramid pooling (PSPNet, UPerNet) exports with bins that follow the input size
    (adaptive_avg_pool), not the example's."""
    assert_onnx_export_matches(trained["pspnet"] / "checkpoints/last.pt", tmp_path / "pspnet.onnx")


@pytest.mark.slow
def test_model_zoo_row_of_a_decoder(trained: dict[str, Path], toy_root: Path, tmp_path) -> None:
    out = assert_model_zoo_row(trained["deeplabv3plus"], toy_root, tmp_path / "zoo")
    weights = load_checkpoint(out / "weights.pt")
    assert not any(k.startswith("aux_head.") for k in weights["model"])  # inference only


@pytest.mark.slow
def test_benchmark_counts_and_times_a_decoder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The benchmark's model costs (inference parameters and FLOPs without the auxiliary head;
    training FLOPs with it, depthwise convolutions' backward counted by their groups) and its
    training step on {"out", "aux"} outputs."""
    result = benchmark_train_step(monkeypatch, tmp_path / "bench.json", *small("deeplabv3plus"))
    costs = result["model"]
    assert costs["params"] == count_parameters(small_model("deeplabv3plus"))
    assert 2 < costs["train_gflops_per_image"] / costs["forward_gflops_per_image"] < 4


# --------------------------------------------------------------------------------------------
# Starting from weights (model.weights=PATH)


def _saved(model: EncoderDecoder, config: dict, path: Path) -> Path:
    state = make_checkpoint(model.state_dict(), config, dataset_meta(config["dataset"]))
    return save_checkpoint(state, path)


@pytest.mark.slow
def test_start_weights_follow_the_aux_head_config(tmp_path: Path) -> None:
    """With an auxiliary head in the file and none configured, its weights are dropped; with
    none in the file and one configured, it keeps its initialisation; the rest loads strictly."""
    config = small_config("pspnet")
    with_aux = _saved(small_model("pspnet"), config, tmp_path / "aux.pt")
    source = load_checkpoint(with_aux)["model"]
    plain = small_model("pspnet", "model.aux_head=null", f"model.weights={with_aux}")
    assert all(torch.equal(v, source[k]) for k, v in plain.state_dict().items())

    no_aux_file = _saved(plain, small_config("pspnet", "model.aux_head=null"), tmp_path / "p.pt")
    fresh = small_model("pspnet")  # the same seed: what the auxiliary head starts from
    model = small_model("pspnet", f"model.weights={no_aux_file}")
    for key, value in model.state_dict().items():
        expected = fresh.state_dict()[key] if key.startswith("aux_head.") else source[key]
        assert torch.equal(value, expected), key

    other = OmegaConf.create(small_config("fcn"))
    other.model.weights = str(with_aux)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        build_model(other)
