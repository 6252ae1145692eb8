"""Export a checkpoint of this project to ONNX (dynamic batch, height and width).

    python scripts/export_onnx.py outputs/.../checkpoints/best.pt model.onnx [--height 720 --width 1280]
    python scripts/export_onnx.py hf://<org>/<name> model.onnx

The ONNX model takes ``image``: float32 Nx3xHxW RGB in 0..255 (normalisation is inside) and
returns ``logits``: float32 NxCxHxW at the input size; argmax over C gives the class ids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from semseg.cli import report_user_errors
from semseg.evaluation.export import export_onnx
from semseg.models import model_from_checkpoint


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="checkpoint of this project: a .pt file, a model folder or hf://org/name"
    )
    parser.add_argument("output", type=Path, help="ONNX file to write")
    parser.add_argument("--height", type=int, default=720, help="height of the tracing input")
    parser.add_argument("--width", type=int, default=1280, help="width of the tracing input")
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset version (default: 18, or 19 for a model with deformable convolutions)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    model, _, _ = model_from_checkpoint(args.checkpoint)
    export_onnx(model, args.output, args.height, args.width, args.opset)
    print(f"wrote {args.output}")
    if not args.no_check:
        import onnxruntime as ort

        image = torch.rand(1, 3, args.height, args.width) * 255
        with torch.no_grad():
            expected = model(image).numpy()
        session = ort.InferenceSession(str(args.output), providers=["CPUExecutionProvider"])
        (got,) = session.run(["logits"], {"image": image.numpy()})
        print(
            f"onnxruntime vs PyTorch: max |logit difference| = {np.abs(got - expected).max():.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
