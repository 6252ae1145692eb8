"""Dataset checker: reads every file of each split and reports what would break training.

Run it as `python scripts/check_dataset.py <root> [--dataset NAME] [--splits ...]`. Any dataset
layout works (the layout class of the dataset config lists the pairs); a split is usable only when
its images are present and readable, every labelled image is paired and every label map has valid
values and the image's size.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semseg.data.base import DatasetError, LabelValueError, SegmentationDataset, invalid_values
from semseg.data.bdd100k import BDD100KDataset
from semseg.data.build import check_dataset_config, instantiate_layout
from semseg.data.transforms import mask_histogram
from semseg.distributed import barrier
from semseg.files import WriteError, write_json

log = logging.getLogger(__name__)

UNLABELLED_SPLITS = ("test",)


@dataclass
class SplitReport:
    """What the checker found in one split."""

    split: str
    images: int = 0
    masks: int = 0
    labelled: bool = True
    missing: str | None = None  # a required folder that does not exist (or why none was found)
    images_without_mask: list[str] = field(default_factory=list)
    masks_without_image: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    bad_values: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))

    @property
    def usable(self) -> bool:
        return not (
            self.missing
            or self.images == 0
            or self.images_without_mask
            or self.masks_without_image
            or self.unreadable
            or self.bad_values
            or self.size_mismatch
        )


def _check_item(dataset: SegmentationDataset, index: int) -> tuple[str, str | None, Any]:
    """(problem kind, message, label histogram) of one item; kind "" when fine."""
    try:
        image = dataset.read_image(index)
    except DatasetError as exc:
        return "unreadable", str(exc), None
    if not dataset.has_labels:
        return "", None, None
    try:
        mask, source = dataset.read_label(index)
    except LabelValueError as exc:
        return "bad_values", str(exc), None
    except DatasetError as exc:
        return "unreadable", str(exc), None
    if mask.ndim != 2 or mask.dtype != np.uint8:
        return "bad_values", f"{source}: not a single-channel 8-bit mask", None
    hist = mask_histogram(mask)
    if mask.shape != image.shape[:2]:
        return (
            "size_mismatch",
            f"{source}: mask {mask.shape[1]}x{mask.shape[0]} vs image "
            f"{image.shape[1]}x{image.shape[0]}",
            hist,
        )
    bad = invalid_values(mask, dataset.num_classes, dataset.ignore_index)
    if bad:
        message = (
            f"{source}: values {bad} outside 0..{dataset.num_classes - 1}, {dataset.ignore_index}"
        )
        return "bad_values", message, hist
    return "", None, hist


def check_split(
    root: str | Path,
    split: str,
    num_classes: int = 19,
    ignore_index: int = 255,
    workers: int = 4,
    layout: Callable[..., SegmentationDataset] = BDD100KDataset,
) -> SplitReport:
    """Read every image and label of `split` under `root` (in `layout`, a dataset class or any
    callable taking its arguments) and collect the problems."""
    report = SplitReport(split, labelled=split not in UNLABELLED_SPLITS)
    try:
        with warnings.catch_warnings():  # unpaired files are reported below, not warned about
            warnings.simplefilter("ignore")
            dataset = layout(
                root=root,
                split=split,
                strict=False,
                num_classes=num_classes,
                ignore_index=ignore_index,
            )
    except DatasetError as exc:
        report.missing = str(exc)
        return report
    report.images, report.masks = dataset.images_found, dataset.labels_found
    if report.labelled and not dataset.has_labels:
        report.missing = dataset.label_source
    report.images_without_mask = dataset.images_without_label
    report.masks_without_image = dataset.labels_without_image
    with ThreadPoolExecutor(max(workers, 1)) as pool:  # cv2 decodes release the GIL
        for kind, message, hist in pool.map(lambda i: _check_item(dataset, i), range(len(dataset))):
            if hist is not None:
                report.class_pixels += hist
            if kind:
                getattr(report, kind).append(message)
    return report


def format_report(
    report: SplitReport, class_names: Sequence[str] | None = None, ignore_index: int = 255
) -> str:
    """Human-readable report of one split."""
    status = "OK" if report.usable else "NOT USABLE"
    lines = [f"[{report.split}] {status}: {report.images} images, {report.masks} masks"]
    if report.missing:
        lines.append(f"  missing: {report.missing}")
    for title, items in (
        ("images without mask", report.images_without_mask),
        ("masks without image", report.masks_without_image),
        ("unreadable files", report.unreadable),
        ("masks with values outside the classes", report.bad_values),
        ("image/mask size mismatches", report.size_mismatch),
    ):
        if items:
            lines.append(f"  {title}: {len(items)}")
            lines += [f"    {item}" for item in items[:10]]
            if len(items) > 10:
                lines.append(f"    ... and {len(items) - 10} more")
    total = report.class_pixels.sum()
    if total:
        lines.append("  class pixel frequencies:")
        for cid in np.flatnonzero(report.class_pixels):
            name = class_names[cid] if class_names and cid < len(class_names) else str(cid)
            name = "ignore" if cid == ignore_index else name
            lines.append(f"    {cid:>3} {name:<15} {100 * report.class_pixels[cid] / total:6.2f}%")
    return "\n".join(lines)


def check_dataset(
    dataset_cfg: Mapping[str, Any],
    splits: Sequence[str],
    workers: int = 4,
    out: Callable[[str], Any] = print,
) -> bool:
    """Check `splits` of the dataset a dataset config describes, print a report for each through
    `out`; True when every split is usable."""
    check_dataset_config(dataset_cfg)
    num_classes, ignore_index = int(dataset_cfg["num_classes"]), int(dataset_cfg["ignore_index"])
    names = list(dataset_cfg["class_names"])

    def layout(**kwargs: Any) -> SegmentationDataset:
        return instantiate_layout(dataset_cfg, **kwargs)

    usable = True
    for split in splits:
        report = check_split(dataset_cfg["root"], split, num_classes, ignore_index, workers, layout)
        out(format_report(report, names, ignore_index))
        usable &= report.usable
    out("dataset usable" if usable else "dataset NOT usable: fix the problems listed above")
    return usable


# --------------------------------------------------------------------------------------------
# Class statistics of a training split (ENet class weights, loss.class_weight=auto)


def class_pixel_counts(
    dataset: SegmentationDataset, cache_dirs: Sequence[str | os.PathLike], is_main: bool = True
) -> np.ndarray:
    """Pixels of each class in the labels of ``dataset`` (the training split).

    The same histogram as ``scripts/check_dataset.py`` prints, over the untransformed label maps.
    The main process counts (reading every label once) and caches the result as
    ``class_pixels_<split>.json`` in the first writable folder of ``cache_dirs``; the cache is reused
    while the split has the same number of labelled images. Every rank gets the counts.
    """
    split, num_classes = str(dataset.split), int(dataset.num_classes)
    name = f"class_pixels_{split}.json"
    key = {
        "split": split,
        "num_classes": num_classes,
        "ignore_index": int(dataset.ignore_index),
        "images": len(dataset),
    }

    def cached() -> np.ndarray | None:
        for folder in cache_dirs:
            try:
                saved = json.loads((Path(folder) / name).read_text())
            except (OSError, ValueError):
                continue
            if {k: saved.get(k) for k in key} == key:
                return np.asarray(saved["class_pixels"], dtype=np.int64)
        return None

    counts = cached() if is_main else None
    if is_main and counts is None:
        if not dataset.has_labels:
            raise DatasetError(
                f"loss.class_weight=auto counts class pixels in the labels of the {split} split, "
                "which has none: give loss.class_weight=[...] instead"
            )
        log.info(
            "counting class pixels in %d labels of %s (once; cached as %s)",
            len(dataset),
            split,
            name,
        )
        with ThreadPoolExecutor(4) as pool:  # cv2 decodes release the GIL
            hists = pool.map(
                lambda i: mask_histogram(dataset.read_label(i)[0]), range(len(dataset))
            )
            counts = np.sum(list(hists), axis=0)[:num_classes]
        _write_cache({**key, "class_pixels": counts.tolist()}, cache_dirs, name)
    barrier()  # the other ranks read what the main process cached
    if counts is None:
        counts = cached()
        if counts is None:
            raise DatasetError(f"cannot read the class pixel counts {name} the main process wrote")
    return counts


def _write_cache(
    content: dict[str, Any], cache_dirs: Sequence[str | os.PathLike], name: str
) -> None:
    """Into the first folder that takes it: a read-only dataset root falls back to the run folder."""
    for folder in cache_dirs:
        try:
            write_json(Path(folder) / name, content, what="class pixel counts", indent=None)
            return
        except WriteError:
            continue
    log.warning("could not cache %s in any of %s", name, [str(d) for d in cache_dirs])
