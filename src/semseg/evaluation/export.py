"""Writing predictions (BDD100K-format masks, colour maps, overlays) and exporting to ONNX."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from semseg.errors import UserError
from semseg.files import write_atomically

DEFAULT_OPSET = 18


def _lut(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """256x3 colour lookup table: class c -> palette[c], everything else (255 ignore) -> black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[: len(colours)] = colours
    return lut


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 colour map in ``palette`` (ids without a colour are black)."""
    return _lut(palette)[np.asarray(mask, dtype=np.uint8)]


def overlay(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5
) -> np.ndarray:
    """Blend the colour map into an HxWx3 uint8 image; ignored pixels keep the image."""
    image = np.asarray(image, dtype=np.uint8)
    mask = np.asarray(mask, dtype=np.uint8)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image size {image.shape[:2]} != mask size {mask.shape}")
    blend = (1 - alpha) * image + alpha * colorize(mask, palette)
    labelled = (mask < len(palette))[..., None]
    return np.where(labelled, blend.round(), image).astype(np.uint8)


def save_image(path: str | os.PathLike, image: np.ndarray, what: str) -> Path:
    """Write an HxW (mode L) or HxWxC uint8 array as a PNG, or a JPEG (quality 90) for ``.jpg``:
    atomically, a refused write being one :class:`semseg.files.WriteError` line naming the folder.

    Not fsynced: thousands of them are written per split, the rename already keeps half files out
    of sight, and a power cut costs at most the last few, which the same command writes again."""
    path = Path(path)
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    options = {"format": "JPEG", "quality": 90} if jpeg else {"format": "PNG"}
    return write_atomically(path, lambda tmp: img.save(tmp, **options), what, fsync=False)


def save_prediction(
    out_dir: str | os.PathLike,
    name: str,
    pred: np.ndarray,
    palette: Sequence[Sequence[int]],
    image: np.ndarray | None = None,
    overlays: bool = False,
) -> dict[str, Path]:
    """Write ``masks/<name>.png`` (1-channel uint8 class ids, the BDD100K submission format),
    ``colormaps/<name>.png`` and, with ``overlays`` and an ``image``, ``overlays/<name>.jpg``."""
    out_dir = Path(out_dir)
    pred = np.asarray(pred)
    if pred.ndim != 2:
        raise ValueError(f"prediction for {name} must be HxW, got shape {pred.shape}")
    pred = pred.astype(np.uint8)
    images = {
        "mask": (out_dir / "masks" / f"{name}.png", pred, "prediction mask"),
        "colormap": (out_dir / "colormaps" / f"{name}.png", colorize(pred, palette), "colour map"),
    }
    if overlays:
        if image is None:
            raise ValueError(f"overlays=True needs the image of {name}")
        images["overlay"] = (
            out_dir / "overlays" / f"{name}.jpg",
            overlay(image, pred, palette),
            "overlay",
        )
    return {key: save_image(path, array, what) for key, (path, array, what) in images.items()}


def onnx_opset(model: nn.Module, opset: int | None = None) -> int:
    """The opset to export ``model`` with: ``opset``, or by default :data:`DEFAULT_OPSET` or the
    newer one an operator of the model needs (a module's ``ONNX_OPERATOR``: its ONNX operator and
    the opset that introduced it, e.g. DCNv2's DeformConv, opset 19). A UserError naming the
    operator when ``opset`` is older: the exporter would write a model onnxruntime refuses."""
    needs = [(m.ONNX_OPERATOR[1], m.ONNX_OPERATOR[0], type(m).__name__)
             for m in model.modules() if hasattr(m, "ONNX_OPERATOR")]  # fmt: skip
    least, operator, module = max(needs, default=(DEFAULT_OPSET, "", ""))
    if opset is None:
        return max(DEFAULT_OPSET, least)
    if opset < least:
        raise UserError(
            f"ONNX opset {opset} has no {operator}, which the model's {module} exports to; "
            f"export with opset {least} or newer (--opset {least})"
        )
    return opset


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    height: int = 720,
    width: int = 1280,
    opset: int | None = None,
) -> Path:
    """Export ``model`` (float RGB 0..255 Nx3xHxW -> logits NxCxHxW) to ONNX with dynamic batch,
    height and width; ``height``/``width`` only size the example input used for tracing, which is
    made on the model's device. ``opset``: see :func:`onnx_opset`.

    The example is a batch of 2: with a batch of 1, torch.export specialises size-1 dimensions
    inside views, and the ViT's token reshape came out with a constant batch of 1."""
    opset = onnx_opset(model, opset)
    model = model.eval()
    device = next(model.parameters()).device
    example = torch.rand(2, 3, height, width, device=device) * 255
    dynamic = torch.export.Dim.DYNAMIC  # a size the trace fixes errors, except a size-1 one

    def write(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )

    return write_atomically(path, write, "ONNX model")
