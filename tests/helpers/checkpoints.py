"""Checkpoints and what reads them: a tiny checkpoint, the ONNX export against PyTorch, the
model-zoo folder of a run."""

from __future__ import annotations

from pathlib import Path

from .processes import load_script


def tiny_checkpoint(path: Path, num_classes: int | None = None) -> Path:
    """A checkpoint of a small Semantic FPN (resnet18, no pretrained weights, narrow FPN/head)."""
    import torch

    from semseg.checkpoints.file import save_checkpoint
    from semseg.cli import compose_groups
    from semseg.data import dataset_meta
    from semseg.models import build_model

    groups = {"model": "semantic_fpn", "backbone": "resnet18", "dataset": "toy_bdd100k"}
    overrides = [
        "backbone.pretrained=false",
        "model.neck.out_channels=32",
        "model.decode_head.channels=16",
    ]
    if num_classes is not None:
        overrides.append(f"model.num_classes={num_classes}")
    config = compose_groups(groups, overrides)
    torch.manual_seed(0)
    model = build_model(config)
    meta = dataset_meta(config["dataset"]) | {"num_classes": config["model"]["num_classes"]}
    state = {"model": model.state_dict(), "iteration": 0, "metrics": {}}
    return save_checkpoint(state | {"config": config, "meta": meta}, path)


def assert_onnx_export_matches(checkpoint: Path, onnx_path: Path) -> None:
    """``scripts/export_onnx.py`` on ``checkpoint`` (traced at 64x96), then onnxruntime's logits
    against the model's at the traced size and at another batch and image size."""
    from semseg.models import model_from_checkpoint

    export = load_script("export_onnx").main
    assert export([str(checkpoint), str(onnx_path), "--height", "64", "--width", "96"]) == 0
    model, _, _ = model_from_checkpoint(checkpoint)
    assert_onnx_equals_model(onnx_path, model)


def assert_onnx_equals_model(onnx_path: Path, model) -> None:
    """onnxruntime's logits of ``onnx_path`` equal ``model``'s (eval mode) at two sizes and
    batch sizes (the exported model takes any)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 96), (2, 3, 75, 110)]:
        image = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 255
        with torch.no_grad():
            expected = model(image).numpy()
        (got,) = session.run(["logits"], {"image": image.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def assert_model_zoo_row(run_dir: Path, toy_root: Path, output_dir: Path) -> Path:
    """The model-zoo folder of ``run_dir``'s last.pt (evaluated on the toy data): its weights are
    the checkpoint's model, its scores hold the mIoU. Returns the folder."""
    import json

    import torch

    from semseg.apps.zoo import build_model_zoo_row
    from semseg.checkpoints.file import load_checkpoint
    from semseg.cli import compose
    from semseg.models import model_from_checkpoint

    overrides = [f"run_dir={run_dir}", f"dataset.root={toy_root}", "device=cpu", "progress=false",
                 "visuals.count=1", f"output_dir={output_dir}", "checkpoint=last.pt"]  # fmt: skip
    out = build_model_zoo_row(compose("model_zoo", overrides))
    model, _, _ = model_from_checkpoint(out / "weights.pt")
    last = load_checkpoint(run_dir / "checkpoints/last.pt")["model"]
    assert all(torch.equal(v, last[k]) for k, v in model.state_dict().items())
    assert "mIoU" in json.loads((out / "scores-val.json").read_text())["metrics"]
    return out
