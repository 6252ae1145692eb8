"""Prediction files in the formats the BDD100K toolkit and evaluation server read.

- Scalabel RLE JSON (``{"frames": [...]}``, one label per predicted class with its pixels as a COCO
  RLE), what ``python -m bdd100k.eval.run -t sem_seg -g <gt> -r <json>`` reads. Writing is the
  inverse of :func:`semseg.data.bdd100k.decode_scalabel_rle` (the ``dataset.labels=rles`` reader)
  and matches the toolkit's ``bdd100k.label.to_rle -m sem_seg``. Frames are written one at a time,
  so a split of any size needs the memory of one mask.
- A zip of the PNG masks (1-channel uint8 train ids, ``<image name>.png``).
- The test-server file of ``src/predict.py``, ``<task>.json`` (``sem_seg.json``, ``drivable.json``):
  the same Scalabel RLE frames, from the masks it wrote (the toolkit's ``bdd100k.label.to_rle -m
  drivable`` gives drivable area the same frames: one label per predicted class, background
  (the toolkit's "ignored" class) left without one).
- Scoring an RLE file against ground-truth PNG masks with the official metric
  (``src/evaluate.py gt_dir=... pred_rle=...``).
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import numpy as np
import torch

from semseg.data.bdd100k import DatasetError, decode_scalabel_rle, encode_scalabel_frame
from semseg.evaluation.metrics import EvaluationError, SegmentationMetric, read_mask, summarize
from semseg.files import reporting_write_errors, write_atomically


class ScalabelWriter:
    """Writes ``{"frames": [...]}`` to ``path`` one frame at a time (memory stays flat).

    Use as a context manager; the file is complete (valid JSON) once the block exits normally. A
    refused write (full disk, file-size limit) is one :class:`semseg.files.WriteError` line; the
    half-written file is then removed.
    """

    def __init__(self, path: str | os.PathLike, class_names: Sequence[str]) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        self.count = 0
        self._file: TextIO | None = None

    def _write(self, text: str) -> None:
        with reporting_write_errors(self.path, "RLE predictions"):
            self._file.write(text)

    def __enter__(self) -> ScalabelWriter:
        with reporting_write_errors(self.path, "RLE predictions"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
        self._write('{"frames": [')
        return self

    def add(self, image_name: str, mask: np.ndarray) -> None:
        """Encode and append the prediction of the image file ``image_name`` (``<stem>.jpg``)."""
        if self._file is None:
            raise RuntimeError("ScalabelWriter.add outside its `with` block")
        frame = encode_scalabel_frame(image_name, mask, self.class_names)
        self._write(("\n" if self.count == 0 else ",\n") + json.dumps(frame))
        self.count += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        if exc_type is not None:  # an unfinished file is no file
            with contextlib.suppress(OSError):
                file.close()
            self.path.unlink(missing_ok=True)
            return
        with reporting_write_errors(self.path, "RLE predictions"):
            try:
                file.write("\n]}\n")
                file.close()  # flushes: a full disk shows here
            except BaseException:
                with contextlib.suppress(OSError):
                    file.close()
                self.path.unlink(missing_ok=True)
                raise


def write_rle_file(
    path: str | os.PathLike, masks: Iterable[tuple[str, Path]], class_names: Sequence[str]
) -> Path:
    """The Scalabel RLE JSON of written PNG masks, given as (image file name, mask path) pairs:
    what the BDD100K test server and ``bdd100k.eval.run -r`` read; ``class_names`` are the classes
    that get a label (drivable area: direct and alternative). Returns ``path``."""
    with ScalabelWriter(path, class_names) as writer:
        for image_name, mask_path in masks:
            writer.add(image_name, read_mask(Path(mask_path), "prediction mask"))
    return Path(path)


def read_scalabel_frames(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The frames of a Scalabel JSON (``{"frames": [...]}`` or a bare list) by image stem."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"RLE prediction file not found: {path} (set pred_rle=<file.json>)")
    try:
        data = json.loads(path.read_text())
        frames = data["frames"] if isinstance(data, dict) else data
        return {Path(frame["name"]).stem: frame for frame in frames}
    except (ValueError, KeyError, TypeError) as e:
        raise EvaluationError(
            f"{path} is not a Scalabel JSON with a 'frames' list of named frames: {e}"
        ) from e


def evaluate_rle_file(
    gt_dir: str | os.PathLike,
    pred_rle: str | os.PathLike,
    num_classes: int,
    class_names: Sequence[str],
    ignore_index: int,
    ignored_class: str | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Score a Scalabel RLE prediction file against a folder of ground-truth PNG masks.

    The same rules as :func:`semseg.evaluation.metrics.evaluate_mask_folders`: frames pair with
    masks by image stem, a mask without a frame counts as all misses, pixels no label covers are
    "ignored" (a miss). Returns (metrics, confusion matrix); ``ignored_class`` as in
    :func:`semseg.evaluation.metrics.summarize`.
    """
    gt_files = sorted(Path(gt_dir).glob("*.png"))
    if not gt_files:
        raise EvaluationError(f"no ground-truth .png masks in {gt_dir} (set gt_dir=<folder>)")
    frames = read_scalabel_frames(pred_rle)
    class_ids = {name: i for i, name in enumerate(class_names)}
    # Drivable area: pixels no label covers are the "ignored" background (the toolkit's files
    # label direct and alternative only).
    uncovered = ignore_index if ignored_class is None else class_ids[ignored_class]
    metric = SegmentationMetric(num_classes, ignore_index, sync_on_compute=False)
    for gt_path in gt_files:
        gt = read_mask(gt_path, "ground truth")  # read as evaluate_mask_folders reads it
        frame = frames.get(gt_path.stem)
        if frame is None:
            pred = np.full_like(gt, num_classes)  # "ignored" everywhere: every pixel a miss
        else:
            try:
                pred = decode_scalabel_rle(frame, class_ids, uncovered, str(pred_rle))
            except DatasetError as e:
                raise EvaluationError(str(e)) from e
            if pred.shape != gt.shape:
                raise EvaluationError(
                    f"{pred_rle}: frame {frame['name']} is {pred.shape[1]}x{pred.shape[0]} (WxH) "
                    f"but its ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}"
                )
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    confmat = metric.compute().numpy()
    return summarize(confmat, class_names, ignored_class), confmat


def zip_masks(mask_dir: str | os.PathLike, zip_path: str | os.PathLike) -> Path:
    """Zip the ``*.png`` masks of ``mask_dir`` flat (no folder inside the archive), file by file;
    written atomically (a refused write is one WriteError line, and no half archive is left)."""
    mask_dir = Path(mask_dir)

    def write(tmp: Path) -> None:
        # PNGs are already deflated: storing them keeps the archive as small and is much faster.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for png in sorted(mask_dir.glob("*.png")):
                archive.write(png, arcname=png.name)

    return write_atomically(zip_path, write, "submission archive")
