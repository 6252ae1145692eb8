"""Inference modes (whole image, sliding window, flip / multi-scale TTA), the one prediction loop
and the evaluation built on it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semseg.errors import ConfigError
from semseg.evaluation.metrics import SegmentationMetric, summarize
from semseg.runtime import autocast, resolve_device

# What a checkpoint that records no inference gets: conf/inference/whole.yaml's values.
INFERENCE_DEFAULTS: dict[str, Any] = {
    "mode": "whole", "crop_size": [512, 1024], "stride": [341, 682], "flip": False, "scales": [1.0],
}  # fmt: skip
_INFERENCE_KEYS = tuple(INFERENCE_DEFAULTS)


def _whole(model: nn.Module, images: torch.Tensor, **_: Any) -> torch.Tensor:
    return model(images)


def _slide(
    model: nn.Module, images: torch.Tensor, crop_size: Sequence[int], stride: Sequence[int]
) -> torch.Tensor:
    """mmseg's slide_inference: overlapping windows, clamped at the borders, averaged by count."""
    h_crop, w_crop = crop_size
    h_stride, w_stride = stride
    if min(h_crop, w_crop, h_stride, w_stride) <= 0:
        raise ConfigError(
            f"inference.crop_size {list(crop_size)} and inference.stride {list(stride)} must be > 0"
        )
    n, _, h_img, w_img = images.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    logits = None
    count = images.new_zeros((1, 1, h_img, w_img), dtype=torch.float32)
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * h_stride + h_crop, h_img)
            x2 = min(wi * w_stride + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            out = model(images[:, :, y1:y2, x1:x2]).float()
            if logits is None:  # the class count is known once the model has answered
                logits = images.new_zeros((n, out.shape[1], h_img, w_img), dtype=torch.float32)
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


_MODES: dict[str, Callable[..., torch.Tensor]] = {"whole": _whole, "slide": _slide}


def resize_bilinear(
    x: torch.Tensor, size: Sequence[int], align_corners: bool = False
) -> torch.Tensor:
    """NxCxHxW float tensor resized to `size` (h, w) (returned as is when it already has it)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    size = tuple(int(v) for v in size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def resize_logits(model: nn.Module, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``logits`` of ``model`` resized to ``size`` (h, w) as the model resizes its own: with its
    ``align_corners`` (mmseg's final resize to the image follows the decode head's; the zoo's
    769x769 rows set it)."""
    return resize_bilinear(logits, size, bool(getattr(model, "align_corners", False)))


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] = (512, 1024),
    stride: Sequence[int] = (341, 682),
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    num_classes: int | None = None,
) -> torch.Tensor:
    """Float logits NxCxHxW at the input size for RGB images (NxCxHxW, 0..255, any dtype).

    ``mode`` picks whole-image or sliding-window (``crop_size``/``stride`` as (h, w)) inference.
    With test-time augmentation (several ``scales`` and/or ``flip``) each view is resized back to
    the input size (:func:`resize_logits`) and the *softmax probabilities* are averaged, as mmseg
    does; the result is returned as their log (valid logits: softmax of it gives the averaged
    probabilities back).
    A single view returns the model's logits unchanged.
    """
    if mode not in _MODES:
        raise ConfigError(f"inference.mode={mode!r} is not one of {sorted(_MODES)}")
    if not scales:
        raise ConfigError("inference.scales is empty: use [1.0] for single-scale inference")
    infer = _MODES[mode]
    size = images.shape[-2:]
    images = images.float()
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    probs = None
    for scale, flipped in views:
        x = resize_bilinear(images, [round(d * scale) for d in size]) if scale != 1 else images
        x = x.flip(-1) if flipped else x
        out = infer(model, x, crop_size=crop_size, stride=stride).float()
        out = resize_logits(model, out.flip(-1) if flipped else out, size)
        if num_classes is not None and out.shape[1] != num_classes:
            raise ValueError(f"the model predicts {out.shape[1]} classes, expected {num_classes}")
        if len(views) == 1:
            return out
        p = out.softmax(1)
        probs = p if probs is None else probs.add_(p)
    return (probs / len(views)).log()


def inference_kwargs(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :func:`predict_logits` keyword arguments of an ``inference`` config (other keys dropped)."""
    if cfg is None:
        return {}
    out = {k: cfg[k] for k in _INFERENCE_KEYS if k in cfg and cfg[k] is not None}
    for key in ("crop_size", "stride", "scales"):
        if key in out:
            out[key] = tuple(out[key])
    return out


def inference_recipe(
    given: Mapping[str, Any] | None, recorded: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """(inference settings, where each came from): key by key, the ``given`` one (the command
    line's; null: not given), else the ``recorded`` one (the checkpoint's ``config.inference``:
    what its run validated with, or the zoo row's test recipe), else :data:`INFERENCE_DEFAULTS`.
    So ``inference.stride=...`` alone keeps a recorded slide mode and its windows."""
    given, recorded = given or {}, recorded or {}
    settings, sources = {}, {}
    for key, default in INFERENCE_DEFAULTS.items():
        for source, config in (("command line", given), ("checkpoint", recorded)):
            if config.get(key) is not None:
                settings[key], sources[key] = config[key], source
                break
        else:
            settings[key], sources[key] = default, "default"
    settings["crop_size"], settings["stride"] = (
        [int(v) for v in settings[k]] for k in ("crop_size", "stride")
    )
    settings["scales"] = [float(v) for v in settings["scales"]]
    settings["flip"] = bool(settings["flip"])
    return settings, sources


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last if the model's conv weights are stored that way (inputs should match)."""
    for p in model.parameters():
        if p.dim() == 4:
            if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
                return torch.channels_last
            break
    return torch.contiguous_format


@dataclass
class EvalResult:
    """Metrics (unprefixed keys as :func:`summarize`), the confusion matrix, example predictions."""

    metrics: dict[str, float]
    confmat: np.ndarray
    examples: list[dict[str, Any]] = field(default_factory=list)


def evaluate_model(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    num_classes: int,
    ignore_index: int,
    class_names: Sequence[str],
    device: str | torch.device,
    inference_cfg: Mapping[str, Any] | None = None,
    precision: str = "fp32",
    num_examples: int = 0,
    ignored_class: str | None = None,
) -> EvalResult:
    """Run inference over ``loader`` and compute the official metric, reduced across DDP ranks
    (``ignored_class``: the toolkit's "ignored" class of the dataset, see :func:`summarize`).

    Every rank gets the full result (each must call this). ``examples`` holds up to
    ``num_examples`` of this rank's predictions as numpy arrays: {name, image HxWx3, pred HxW, gt HxW}.
    """
    device = resolve_device(device)
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    metric = SegmentationMetric(num_classes, ignore_index).to(device)
    examples: list[dict[str, Any]] = []
    predictions = predict_batches(
        net, _labelled(loader), device, inference_cfg, precision, num_classes
    )
    try:
        with torch.inference_mode():
            for batch, pred in predictions:
                target = batch["mask"].to(device, non_blocking=True)
                metric.update(pred, target)
                for i in range(min(num_examples - len(examples), len(pred))):
                    image = resize_bilinear(batch["image"][i : i + 1].float(), target.shape[-2:])
                    examples.append(
                        {
                            "name": batch["name"][i],
                            "image": image[0].round().byte().permute(1, 2, 0).cpu().numpy(),
                            "pred": pred[i].to(torch.uint8).cpu().numpy(),
                            "gt": batch["mask"][i].cpu().numpy(),
                        }
                    )
            confmat = metric.compute().cpu().numpy()
    finally:
        predictions.close()
        net.train(was_training)
    return EvalResult(summarize(confmat, class_names, ignored_class), confmat, examples)


def _labelled(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in loader:
        if "mask" not in batch:
            raise ConfigError(
                "the evaluation split has no labels (no 'mask' in the batch): evaluate a "
                "labelled split (dataset.split=val) or use predict.py for the test split"
            )
        yield batch


def predict_batches(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: str | torch.device,
    inference_cfg: Mapping[str, Any] | None = None,
    precision: str = "fp32",
    num_classes: int | None = None,
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """The one prediction loop, behind evaluation, training's validation, prediction files and
    the model-zoo folder, so that all of them give the same class ids for the same image.

    Yields ``(batch, class ids NxHxW)`` (on ``device``) for the batches of ``loader``, at each
    item's output size: its label's size, else the size it was read at (``batch["size"]``). A
    batch of unlabelled images read at different sizes comes back one item at a time. Inputs
    follow the model's memory format; ``precision`` is the autocast precision.
    """
    device = resolve_device(device)
    # DDP: run the wrapped module itself; DDP's forward may broadcast buffers, a collective that
    # hangs when ranks hold different numbers of eval batches.
    net = getattr(model, "module", model)
    kwargs = inference_kwargs(inference_cfg)
    memory_format = model_memory_format(net)
    with autotune_while_sizes_repeat(device) as see_size:
        for batch in loader:
            see_size(batch["image"].shape[-2:])
            # Entered and left per batch: the caller's code between batches runs without them.
            with torch.inference_mode(), autocast(device, precision):
                images = batch["image"].to(device, non_blocking=True)
                images = images.contiguous(memory_format=memory_format)
                logits = predict_logits(net, images, num_classes=num_classes, **kwargs)
                # The image may have been resized to the evaluation scale: the class ids are
                # computed at the label's (or the original image's) own size.
                outputs = [
                    (part, resize_logits(net, logits[rows], size).argmax(1))
                    for part, rows, size in _output_sizes(batch)
                ]
            yield from outputs


def _output_sizes(batch: dict[str, Any]) -> list[tuple[dict[str, Any], slice, list[int]]]:
    """(items, their rows of the batch, their output size (h, w)) of a batch."""
    if "mask" in batch:  # collated: every label of the batch has the same size
        return [(batch, slice(None), list(batch["mask"].shape[-2:]))]
    sizes = batch["size"].tolist()
    if all(size == sizes[0] for size in sizes):
        return [(batch, slice(None), sizes[0])]
    return [
        ({key: value[i : i + 1] for key, value in batch.items()}, slice(i, i + 1), size)
        for i, size in enumerate(sizes)
    ]


@contextlib.contextmanager
def autotune_while_sizes_repeat(
    device: torch.device,
) -> Iterator[Callable[[Sequence[int]], None]]:
    """Yields ``see(size)``, to be called with each input's (h, w). On CUDA, cuDNN autotuning
    (switched on by ``configure_backends``) is switched off once a second size shows up: it tunes
    every new shape again, which costs more than it saves on images of mixed sizes. The setting
    is put back at the end."""
    previous = torch.backends.cudnn.benchmark
    sizes: set[tuple[int, ...]] = set()

    def see(size: Sequence[int]) -> None:
        sizes.add(tuple(int(v) for v in size))
        if device.type == "cuda" and len(sizes) > 1:
            torch.backends.cudnn.benchmark = False

    try:
        yield see
    finally:
        torch.backends.cudnn.benchmark = previous
