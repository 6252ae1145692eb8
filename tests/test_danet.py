"""DANet (mmseg's DAHead): mmseg's layout and sizes, its logits with both attention gammas at work,
its training outputs and mmseg's three decode losses (plus the auxiliary head's), and a few short
runs with the shared helpers: training, exact resume, two DDP ranks. The logits of every case
against mmseg: tests/test_mmseg_exactness.py (the ``danet`` fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, assert_resume_is_exact, load_script, torchrun, train_in_process

from semseg.checkpoints.file import load_checkpoint
from semseg.cli import compose_groups
from semseg.data import dataset_meta
from semseg.losses import OhemCrossEntropy, SegCrossEntropy
from semseg.models import (
    EncoderDecoder,
    build_model,
    count_parameters,
    mmseg_to_checkpoint,
    model_from_checkpoint,
)
from semseg.models.decoders import resize
from semseg.models.mmseg_conversion import recognise_mmseg

FIXTURES = REPO / "tests" / "fixtures" / "mmseg"
CASE = json.loads((FIXTURES / "cases.json").read_text())["cases"]["danet"]
# A small DANet: dilated ResNet-18, narrow heads.
SMALL = [
    "model=danet",
    "backbone=resnet18_d8",
    "backbone.pretrained=false",
    "model.decode_head.channels=16",
    "model.decode_head.pam_channels=4",
    "model.aux_head.channels=8",
]


def small_model() -> EncoderDecoder:
    torch.manual_seed(0)
    groups = {"model": "danet", "backbone": "resnet18_d8", "dataset": "bdd100k"}
    return build_model(compose_groups(groups, SMALL[2:]))


def test_danet_has_mmseg_layout_and_sizes() -> None:
    """R-50-D8 DANet tensor for tensor mmseg's (its state dict, from the fixtures), under mmseg's
    names once converted: the pam and cam classifiers stay in the model."""
    cfg = compose_groups(
        {"model": "danet", "backbone": "resnet50c_d8", "dataset": "bdd100k"},
        ["backbone.pretrained=false"],
    )
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = CASE["shapes"]
    ours = model.state_dict()
    assert sorted(tuple(t.shape) for t in ours.values()) == sorted(map(tuple, shapes.values()))
    for key in ("pam_conv_seg.weight", "cam_conv_seg.bias", "pam.gamma.scale", "cam.gamma.scale",
                "pam.query_project.weight"):  # fmt: skip
        assert tuple(ours[f"decode_head.{key}"].shape) == tuple(shapes[f"decode_head.{key}"])
    params = {
        k: s for k, s in shapes.items() if k.rsplit(".", 1)[-1] in ("weight", "bias", "scale")
    }
    aux = sum(int(np.prod(s)) for k, s in params.items() if k.startswith("auxiliary_head."))
    assert count_parameters(model) == sum(int(np.prod(s)) for s in params.values()) - aux


def test_gammas_start_at_zero() -> None:
    """mmcv's Scale(0): a new DANet's attention blocks are the identity."""
    head = small_model().decode_head
    assert head.pam.gamma.scale.item() == 0.0 and head.cam.gamma.scale.item() == 0.0
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(head.pam(x), x)
        torch.testing.assert_close(head.cam(x), x)


@pytest.mark.slow
def test_logits_equal_mmseg_with_both_gammas_at_work() -> None:
    """The converted mmseg DANet (seeded weights: both gammas drawn at random, non-zero) gives
    mmseg's logits at both fixture sizes; with either gamma set to 0 it would not, so the
    exactness covers both attention blocks."""
    reference = load_script("mmseg_reference")
    weights = reference.seeded_weights(CASE["shapes"])
    arch = recognise_mmseg(weights)
    config = compose_groups({**arch.config_groups, "dataset": "bdd100k"}, arch.overrides)
    state = mmseg_to_checkpoint(weights, "danet.pth", config, dataset_meta(config["dataset"]))
    model = model_from_checkpoint(state)[0]
    head = model.decode_head
    gammas = (head.pam.gamma.scale, head.cam.gamma.scale)
    assert all(g.item() > 0.1 for g in gammas)
    ref = np.load(FIXTURES / "danet.npz")
    with np.load(FIXTURES / "inputs.npz") as data:
        inputs = {size: torch.from_numpy(data[size]).permute(0, 3, 1, 2) for size in data.files}

    def worst() -> tuple[float, float]:
        """The largest logit difference on the grid and the lowest argmax agreement."""
        diffs, agreements = [], []
        with torch.no_grad():
            for size, images in inputs.items():
                ours = reference.summary(model(images)[0])
                diffs.append(np.abs(ours["grid"] - ref[f"{size}_grid"]).max())
                agreements.append((ours["argmax"] == ref[f"{size}_argmax"]).mean())
        return max(diffs), min(agreements)

    diff, agreement = worst()
    assert diff < 1e-3 and agreement >= 0.999
    for gamma in gammas:
        value = gamma.detach().clone()
        with torch.no_grad():
            gamma.zero_()
        assert worst()[0] > 0.1
        with torch.no_grad():
            gamma.copy_(value)


def test_training_outputs_and_mmseg_losses() -> None:
    """Training: the pam+cam, pam and cam logits and the auxiliary head's, all at the input size;
    the loss is mmseg's: the decode loss on each of the three (weight 1; OHEM too) plus 0.4 x the
    auxiliary cross-entropy; one backward reaches every parameter (DDP without
    find_unused_parameters). Eval: the pam+cam logits only, the branch classifiers unused."""
    model = small_model().train()
    images = torch.randint(0, 256, (2, 3, 48, 72)).float()
    target = torch.randint(0, 19, (2, 48, 72))
    target[:, :5] = 255
    torch.manual_seed(1)
    outputs = model(images)
    assert sorted(outputs) == ["aux", "cam", "out", "pam"]
    assert all(v.shape == (2, 19, 48, 72) for v in outputs.values())

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, ignore_index=255, reduction="sum") / target.numel()

    loss = model.loss(outputs, target, SegCrossEntropy())
    expected = (
        ce(outputs["out"]) + ce(outputs["pam"]) + ce(outputs["cam"]) + 0.4 * ce(outputs["aux"])
    )
    torch.testing.assert_close(loss, expected)
    ohem = OhemCrossEntropy(thresh=0.7, min_kept=100)
    torch.testing.assert_close(
        model.loss(outputs, target, ohem),
        sum(ohem(outputs[k], target) for k in ("out", "pam", "cam")) + 0.4 * ce(outputs["aux"]),
    )
    with torch.no_grad():  # the gammas at work, so that their gradients are not trivial
        model.decode_head.pam.gamma.scale.fill_(0.5)
        model.decode_head.cam.gamma.scale.fill_(0.5)
    model.loss(model(images), target, SegCrossEntropy()).backward()
    assert all(p.grad is not None for p in model.parameters())
    heads = [(n, p) for n, p in model.named_parameters() if n.startswith(("decode_head.", "aux_"))]
    assert not [n for n, p in heads if not p.grad.any()]  # every head tensor learns

    head = model.eval().decode_head
    with torch.no_grad():
        logits = model(images)
        features = model.backbone(model.normalize(images))
        pam, cam = head.branches(features)
        from_sum = head.classifier(pam + cam)
    assert logits.shape == (2, 19, 48, 72)
    torch.testing.assert_close(logits, resize(from_sum, (48, 72), align_corners=False))


# --------------------------------------------------------------------------------------------
# Short runs (the shared helpers)


@pytest.mark.slow
def test_danet_trains_and_keeps_its_branch_classifiers(toy_root: Path, tmp_path: Path) -> None:
    summary = train_in_process(toy_root, tmp_path / "run", *SMALL, "schedule.max_iters=2")
    assert summary["steps"] == 2 and np.isfinite(summary["loss"])
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    assert {"decode_head.pam_conv_seg.weight", "decode_head.cam_conv_seg.weight"} <= set(state)
    # trained: the gammas moved from 0
    assert state["decode_head.pam.gamma.scale"] != 0 and state["decode_head.cam.gamma.scale"] != 0


@pytest.mark.slow
def test_danet_resume_is_exact(toy_root: Path, tmp_path: Path) -> None:
    assert_resume_is_exact(toy_root, tmp_path, *SMALL)


@pytest.mark.slow
def test_danet_trains_on_two_ddp_ranks(toy_root: Path, tmp_path: Path) -> None:
    """Two gloo processes for 2 iterations: DDP (no find_unused_parameters) fails on a parameter
    without a gradient, so every DANet parameter is used in training."""
    run_dir = tmp_path / "ddp"
    torchrun("train.py", "experiment=smoke", f"dataset.root={toy_root}", *SMALL,
             "schedule.max_iters=2", "trainer.eval_at_end=false", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert len(load_checkpoint(run_dir / "checkpoints/last.pt")["rng_per_rank"]) == 2
