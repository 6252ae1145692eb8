"""ONNX export of a checkpoint: onnxruntime matches PyTorch at two input sizes (dynamic axes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import tiny_checkpoint

from semseg.models import model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]


def export_main(*argv: str) -> int:
    """``scripts/export_onnx.py``'s main, run in this process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(
        "export_onnx", REPO / "scripts" / "export_onnx.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


@pytest.mark.slow
def test_onnx_matches_pytorch_with_dynamic_size(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    onnx_path = tmp_path / "tiny.onnx"
    assert export_main(str(ckpt), str(onnx_path), "--height", "32", "--width", "64") == 0
    model, _, _ = model_from_checkpoint(ckpt)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32, 64), (2, 3, 64, 96)]:  # a second size and batch: axes are dynamic
        image = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 255
        with torch.no_grad():
            expected = model(image).numpy()
        (got,) = session.run(["logits"], {"image": image.numpy()})
        assert got.shape == (shape[0], 19, *shape[2:])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_export_of_missing_checkpoint_names_the_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(SystemExit) as exit_info:
        export_main(str(missing), str(tmp_path / "x.onnx"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found") and str(missing) in err
