"""PointRend (mmseg's CascadeEncoderDecoder: FPN neck, FPNHead, PointHead): point sampling as
mmcv's, training-time point selection and loss, inference-time subdivision, the checkpoint's
recognition, and training, exact resume, DDP, ONNX export, the model-zoo row, the benchmark.
Its logits against mmseg's own model: tests/test_mmseg_exactness.py (case ``pointrend``)."""

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

from semseg.cli import compose_groups
from semseg.losses import SegCrossEntropy
from semseg.models import build_model, count_parameters, model_from_checkpoint
from semseg.models.mmseg_conversion import recognise_mmseg
from semseg.models.pointrend import CascadeDecodeHead, PointHead, point_sample, uncertainty

MMSEG = json.loads((REPO / "tests/fixtures/mmseg/cases.json").read_text())["cases"]
SMALL = [
    "model=pointrend", "backbone=resnet18", "backbone.pretrained=false",
    "model.neck.out_channels=32", "model.decode_head.coarse_head.channels=16",
    "model.decode_head.point_head.channels=16", "model.decode_head.point_head.num_points=96",
    "model.decode_head.point_head.subdivision_num_points=512",
]  # fmt: skip


def small_model(*overrides: str) -> torch.nn.Module:
    groups = dict(o.split("=", 1) for o in SMALL[:2])
    torch.manual_seed(0)
    return build_model(compose_groups({**groups, "dataset": "bdd100k"}, [*SMALL[2:], *overrides]))


def test_zoo_model_has_mmseg_layout() -> None:
    """The zoo's PointRend R-50 has mmseg's tensors (names mapped, shapes equal)."""
    from semseg.models.mmseg_conversion import convert_mmseg_state_dict

    shapes = MMSEG["pointrend"]["shapes"]
    assert recognise_mmseg({k: torch.empty(s) for k, s in shapes.items()}).head.model == "pointrend"
    converted = convert_mmseg_state_dict({k: torch.empty(s) for k, s in shapes.items()})
    cfg = compose_groups(
        {"model": "pointrend", "backbone": "resnet50c", "dataset": "bdd100k"},
        ["backbone.pretrained=false"],
    )
    with torch.device("meta"):
        model = build_model(cfg)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {
        k: list(v.shape) for k, v in converted.items()
    }
    assert isinstance(model.decode_head, CascadeDecodeHead) and model.aux_head is None


def test_point_sample_is_grid_sample_on_unit_coordinates() -> None:
    """Pixel centres ((i + 0.5) / size) give the pixels themselves, bilinear and nearest."""
    x = torch.randn(2, 3, 5, 7)
    ys, xs = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    points = torch.stack([(xs + 0.5) / 7, (ys + 0.5) / 5], -1).view(1, -1, 2).expand(2, -1, -1)
    torch.testing.assert_close(point_sample(x, points), x.flatten(2))
    torch.testing.assert_close(point_sample(x, points, mode="nearest"), x.flatten(2))
    # Half-way between two columns: their mean; outside the map: zero padding halves it.
    mid = point_sample(x, torch.tensor([[[1.0 / 7, 0.5 / 5]]]).expand(2, -1, -1))[..., 0]
    torch.testing.assert_close(mid, (x[:, :, 0, 0] + x[:, :, 0, 1]) / 2)
    edge = point_sample(x, torch.tensor([[[0.0, 0.5 / 5]]]).expand(2, -1, -1))[..., 0]
    torch.testing.assert_close(edge, x[:, :, 0, 0] / 2)


def test_training_points_prefer_uncertain_ones() -> None:
    """Of 3 x num_points random candidates the 75% most uncertain, then random ones."""
    head = PointHead([8], num_classes=4, channels=8, num_points=40)
    coarse = torch.randn(2, 4, 6, 9)
    torch.manual_seed(3)
    points = head.training_points(coarse)
    torch.manual_seed(3)
    candidates = torch.rand(2, 120, 2)
    scores = uncertainty(point_sample(coarse, candidates))[:, 0]
    assert points.shape == (2, 40, 2)
    for i in range(2):
        chosen = points[i, :30]
        expected = candidates[i][scores[i].topk(30).indices]
        torch.testing.assert_close(chosen, expected)
        assert ((points[i, 30:] >= 0) & (points[i, 30:] <= 1)).all()


def test_loss_adds_the_point_loss_on_labels_sampled_there() -> None:
    model = small_model().train()
    images = torch.rand(2, 3, 64, 96) * 255
    target = torch.randint(0, 19, (2, 64, 96))
    target[:, :8] = 255
    out = model(images)
    assert out["out"].shape == (2, 19, 64, 96) and out["points"].shape == (2, 19, 96)
    loss_fn = SegCrossEntropy()
    coords = out["point_coords"]
    col = (coords[..., 0] * 96).long().clamp(max=95)  # nearest pixel: floor(x * W)
    row = (coords[..., 1] * 64).long().clamp(max=63)
    labels = torch.stack([target[i, row[i], col[i]] for i in range(2)])
    point = (
        F.cross_entropy(out["points"], labels, ignore_index=255, reduction="sum") / labels.numel()
    )
    expected = loss_fn(out["out"], target) + point
    torch.testing.assert_close(model.loss(out, target, loss_fn), expected)
    model.loss(out, target, loss_fn).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_subdivision_replaces_the_most_uncertain_pixels() -> None:
    """One step: the coarse logits upsampled 2x, their N most uncertain pixels re-predicted by
    the point head at the pixel centres; the others untouched."""
    model = small_model(
        "model.decode_head.point_head.subdivision_steps=1",
        "model.decode_head.point_head.subdivision_num_points=20",
    ).eval()
    images = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        features = model.neck(model.backbone(model.normalize(images)))
        coarse = model.decode_head[0](features)
        refined = model.decode_head(features)
        up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        idx = uncertainty(up).flatten(1).topk(20).indices[0]
        changed = (refined != up).any(1).flatten()
        assert set(changed.nonzero()[:, 0].tolist()) <= set(idx.tolist())
        h, w = up.shape[-2:]
        centres = torch.stack([(idx % w + 0.5) / w, (idx // w + 0.5) / h], -1)[None]
        torch.testing.assert_close(
            refined.flatten(2)[0][:, idx],
            model.decode_head[1].point_logits(features, coarse, centres)[0],
        )
        assert model(images).shape == (1, 19, 64, 96)


# --------------------------------------------------------------------------------------------
# Training and what uses its checkpoints


@pytest.fixture(scope="module")
def trained(toy_root: Path, module_tmp: Path) -> Path:
    """A short run (2 iterations, evaluated at the end); its run folder."""
    train_in_process(toy_root, module_tmp / "pointrend", *SMALL, "schedule.max_iters=2")
    return module_tmp / "pointrend"


@pytest.mark.slow
def test_trains_on_toy_data(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["loss"])
    assert 0 <= summary["val/mIoU"] <= 1
    model, _, _ = model_from_checkpoint(trained / "checkpoints/last.pt")
    assert any(k.startswith("decode_head.1.fcs.") for k in model.state_dict())
    assert summary["params"] == count_parameters(model) == count_parameters(small_model())


@pytest.mark.slow
def test_exact_resume(toy_root: Path, tmp_path: Path) -> None:
    """The random training points come from the restored RNG: resumed == straight."""
    assert_resume_is_exact(toy_root, tmp_path, *SMALL)


@pytest.mark.slow
def test_ddp_two_processes(toy_root: Path, tmp_path: Path) -> None:
    """Two gloo processes: every parameter (the point head's too) gets a gradient each step."""
    train_on_two_ranks(toy_root, tmp_path / "ddp", *SMALL)


@pytest.mark.slow
def test_onnx_export_is_right_at_every_size(trained: Path, tmp_path: Path) -> None:
    """The subdivision (top-k of the uncertainty, scatter) exports with sizes that follow the
    input."""
    assert_onnx_export_matches(trained / "checkpoints/last.pt", tmp_path / "pointrend.onnx")


@pytest.mark.slow
def test_model_zoo_row(trained: Path, toy_root: Path, tmp_path: Path) -> None:
    assert_model_zoo_row(trained, toy_root, tmp_path / "zoo")


@pytest.mark.slow
def test_benchmark_counts_and_times(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Parameters and FLOPs counted, a training step on the point outputs."""
    result = benchmark_train_step(monkeypatch, tmp_path / "bench.json", *SMALL)
    assert result["model"]["params"] == count_parameters(small_model())
