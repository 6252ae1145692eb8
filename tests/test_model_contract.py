"""The model contract: every ``conf/model`` option, and each backbone family (ResNet, ResNet-D8,
ConvNeXt, HRNet, Swin, ViT), as a narrow model (the table: tests/helpers/model_rows.py; a new
model is one line there) through the same properties:

- its backbone keeps the declared contract (:class:`semseg.models.backbone.Backbone`);
- it builds and forwards at an odd size (eval logits, the training outputs with and without the
  auxiliary head, channels_last, bf16 autocast);
- a few training iterations give a finite loss, a checkpoint that keeps the auxiliary head and a
  model for inference that leaves it out;
- resume is exact (weights, EMA, optimizer state per parameter group, schedule);
- it trains on two DDP ranks for two iterations (every parameter used in each step: DDP raises at
  the second one otherwise), with its auxiliary head and without; one run also with
  ``trainer.accumulate=2``;
- its ONNX export equals PyTorch at the traced size and at another batch and size (Swin's only
  with ``SEMSEG_HEAVY_TESTS=1``: 3-5 minutes on 2 CPU cores);
- its model-zoo folder holds the checkpoint's inference weights and the scores;
- the benchmark counts it and times its training step.

What is particular to a family stays in its own file: mmseg's sizes and exactness fixtures, the
zoo's rows, layouts and converters, parameter groups. docs/testing.md lists where each test that
the family files held before this module now lives.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    MODEL_ROWS,
    ROW_ITERS,
    assert_model_zoo_row,
    assert_onnx_export_matches,
    assert_resume_is_exact,
    benchmark_train_step,
    build_row,
    has_aux_head,
    row_overrides,
    train_rows_on_two_ranks,
)

from semseg.checkpoints.file import load_checkpoint
from semseg.models import count_parameters, model_from_checkpoint
from semseg.models.backbone import Backbone, LayerDecayBackbone

ROWS = list(MODEL_ROWS)
# Under pytest-xdist (--dist loadgroup) a row's tests share a worker, and with it the row's
# trained run; the 2-rank runs (one torchrun start for all rows) share another.
ROW_PARAMS = [pytest.param(name, marks=pytest.mark.xdist_group(f"row_{name}")) for name in ROWS]
ODD = (45, 67)  # no stride divides either side: padding and resizes at every level


@pytest.fixture(scope="module")
def row_model():
    """``row_model(name)``: row ``name``'s model, built once per module (tests change its mode
    and memory format, never its values)."""
    models: dict[str, torch.nn.Module] = {}

    def model(name: str) -> torch.nn.Module:
        if name not in models:
            models[name] = build_row(name)
        return models[name]

    return model


def _logits(out: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    return out["out"] if isinstance(out, dict) else out


# --------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("name", ROW_PARAMS)
def test_backbone_keeps_the_declared_contract(name: str, row_model) -> None:
    """One map per ``out_channels`` entry, highest resolution first, with those channels at
    ``side / stride`` (rounded up, or down after a patchifying stem: ConvNeXt's); layer ids (layer-wise lr decay) where the backbone numbers its
    layers (ConvNeXt)."""
    backbone = row_model(name).backbone.eval()
    assert isinstance(backbone, Backbone)
    channels, strides = backbone.out_channels, backbone.out_strides
    assert len(channels) == len(strides) > 0
    assert all(isinstance(c, int) for c in channels) and all(isinstance(s, int) for s in strides)
    assert strides == sorted(strides)
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, *ODD))
    assert len(features) == len(channels)
    for feature, c, s in zip(features, channels, strides):
        feature = feature[0] if isinstance(feature, tuple) else feature  # ViT's (map, class token)
        assert feature.shape[:2] == (1, c)
        for side, size in zip(ODD, feature.shape[2:]):
            assert size in (side // s, math.ceil(side / s)), (side, s, size)
    numbered = isinstance(backbone, LayerDecayBackbone)
    assert numbered == (MODEL_ROWS[name].family == "ConvNeXt")
    if numbered:
        ids = {backbone.layer_id(k, 6) for k, _ in backbone.named_parameters()}
        assert ids == {0, 1, 2, 3, 4, 7}  # stem/downsampling 0, stages 1-4, output norms 7


@pytest.mark.parametrize("name", ROW_PARAMS)
def test_builds_and_forwards_at_an_odd_size(name: str, row_model) -> None:
    """Eval: logits at the input size from uint8 or float images, the same in channels_last and
    close under bf16 autocast; training: the auxiliary head's logits too where the row has one,
    none with ``model.aux_head=null``."""
    model = row_model(name)
    images = torch.randint(0, 256, (1, 3, *ODD), dtype=torch.uint8)
    with torch.no_grad():
        logits = model.eval()(images)
        assert logits.shape == (1, 19, *ODD) and torch.isfinite(logits).all()
        torch.testing.assert_close(model(images.float()), logits)
        last = model.to(memory_format=torch.channels_last)(
            images.float().contiguous(memory_format=torch.channels_last)
        )
        torch.testing.assert_close(last, logits, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
        assert torch.isfinite(low).all() and (low.float() - logits).abs().max() < 0.5
        images = torch.randint(0, 256, (2, 3, *ODD), dtype=torch.uint8)  # BatchNorm: 2 images
        out = model.train()(images)
        assert _logits(out).shape == (2, 19, *ODD)
        assert (isinstance(out, dict) and "aux" in out) == has_aux_head(name)
        if has_aux_head(name):
            assert out["aux"].shape == (2, 19, *ODD)
            plain = build_row(name, "model.aux_head=null").train()
            assert plain.aux_head is None
            out = plain(images)
            assert not (isinstance(out, dict) and "aux" in out)
            assert _logits(out).shape == (2, 19, *ODD)


# --------------------------------------------------------------------------------------------
# Training, and what uses its checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("name", ROW_PARAMS)
def test_trains_with_a_finite_loss(name: str, trained_row, row_model) -> None:
    run_dir = trained_row(name)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == ROW_ITERS and np.isfinite(summary["loss"])
    assert 0 <= summary["val/mIoU"] <= 1
    checkpoint = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert any(k.startswith("aux_head.") for k in checkpoint["model"]) == has_aux_head(name)
    model, _, _ = model_from_checkpoint(checkpoint)  # for inference: without the auxiliary head
    assert model.aux_head is None and not any(k.startswith("aux_head.") for k in model.state_dict())
    assert summary["params"] == count_parameters(model) == count_parameters(row_model(name))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 40, 56)).shape == (1, 19, 40, 56)


@pytest.mark.slow
@pytest.mark.parametrize("name", ROW_PARAMS)
def test_resume_is_exact(name: str, toy_root: Path, tmp_path: Path) -> None:
    """4 iterations straight == 2, stop, resume to 4: weights (buffers that training moves, such
    as EMANet's bases, included), EMA, the optimizer's state and groups, the schedule."""
    row = MODEL_ROWS[name]
    a, b = assert_resume_is_exact(toy_root, tmp_path, *row.overrides, *row.resume)
    states = a["optimizer"]["state"]
    assert states.keys() == b["optimizer"]["state"].keys() and states
    for key, state in states.items():
        for entry, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(
                b["optimizer"]["state"][key][entry])), (key, entry)  # fmt: skip
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key in ("last_epoch", "base_lrs", "_last_lr"):  # not _step_count: calls since creation
        assert a["scheduler"][key] == b["scheduler"][key], key


@pytest.fixture(scope="module")
def ddp_runs(toy_root: Path, module_tmp: Path) -> dict[str, tuple[Path, str | None]]:
    """Every row on two gloo ranks for ROW_ITERS iterations, as configured and, where it has an
    auxiliary head, without it; Semantic FPN once more with ``trainer.accumulate=2``. One
    torchrun start for all of them; run id -> (run folder, error line or None)."""
    common = [f"schedule.max_iters={ROW_ITERS}", "trainer.eval_at_end=false"]
    runs = {name: row_overrides(name, *common) for name in ROWS}
    runs |= {f"{name}-no_aux": row_overrides(name, *common, "model.aux_head=null")
             for name in ROWS if has_aux_head(name)}  # fmt: skip
    runs["semantic_fpn-accumulate2"] = row_overrides(
        "semantic_fpn", *common, "trainer.accumulate=2"
    )
    folder = module_tmp / "ddp"
    errors = train_rows_on_two_ranks(toy_root, folder, runs)
    return {run_id: (folder / run_id, errors[run_id]) for run_id in runs}


def _assert_two_rank_run(run_dir: Path, error: str | None) -> None:
    assert error is None, error
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == ROW_ITERS
    assert len(load_checkpoint(run_dir / "checkpoints/last.pt")["rng_per_rank"]) == 2


@pytest.mark.slow
@pytest.mark.xdist_group("contract_ddp")
@pytest.mark.parametrize("name", ROWS)
def test_trains_on_two_ddp_ranks(name: str, ddp_runs) -> None:
    """Two iterations on two gloo ranks (plain BatchNorm: SyncBN needs CUDA), one run folder
    holding both ranks' RNG states; without the auxiliary head too. No model is built with
    ``find_unused_parameters``: every trainable parameter gets a gradient in every step (EMANet's
    frozen 1x1 conv does not train: DDP leaves parameters without ``requires_grad`` out)."""
    for run_id in (name, f"{name}-no_aux"):
        if run_id in ddp_runs:
            _assert_two_rank_run(*ddp_runs[run_id])


@pytest.mark.slow
@pytest.mark.xdist_group("contract_ddp")
def test_trains_on_two_ddp_ranks_with_accumulation(ddp_runs) -> None:
    """Two micro-batches per step, the first without DDP's gradient all-reduce (no_sync)."""
    _assert_two_rank_run(*ddp_runs["semantic_fpn-accumulate2"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ROW_PARAMS)
def test_onnx_export_equals_pytorch(name: str, trained_row, tmp_path: Path) -> None:
    """Dynamic batch and size: what follows the input's size (pyramid pooling bins, PSAMask's
    index, position embeddings, shifted windows, PointRend's subdivision, DMNet's per-image
    filters) is right at another size than the traced one."""
    reason = MODEL_ROWS[name].heavy_onnx
    if reason is not None and os.environ.get("SEMSEG_HEAVY_TESTS") != "1":
        pytest.skip(reason)
    assert_onnx_export_matches(trained_row(name) / "checkpoints/last.pt", tmp_path / "m.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", ROW_PARAMS)
def test_model_zoo_row(name: str, trained_row, row_model, toy_root: Path, tmp_path: Path) -> None:
    """The zoo folder's weights are the checkpoint's model for inference (no auxiliary head)."""
    out = assert_model_zoo_row(trained_row(name), toy_root, tmp_path / "zoo")
    weights = load_checkpoint(out / "weights.pt")["model"]
    assert not any(k.startswith("aux_head.") for k in weights)
    backbone = model_from_checkpoint(out / "weights.pt")[0].backbone
    assert type(backbone) is type(row_model(name).backbone)


@pytest.mark.slow
@pytest.mark.parametrize("name", ROW_PARAMS)
def test_benchmark_step(
    name: str, row_model, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The benchmark's costs (inference parameters without the auxiliary head; training FLOPs
    2-4x the forward's) and one training step with a finite loss."""
    result = benchmark_train_step(monkeypatch, tmp_path / "bench.json", *row_overrides(name))
    costs = result["model"]
    assert costs["params"] == count_parameters(row_model(name))
    assert 2 < costs["train_gflops_per_image"] / costs["forward_gflops_per_image"] < 4
