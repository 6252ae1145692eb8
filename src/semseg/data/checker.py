"""Dataset checker: reads every file of each split and reports what would break training.

    python scripts/check_dataset.py <root> [--splits train val test] [--num-classes 19]
    python -m semseg.data.checker <root> ...

Exit code 0 only when every checked split is usable (images present, all files readable, every
labelled image paired, mask values and sizes valid).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from semseg.data.bdd100k import DatasetError, read_image_file, split_dirs
from semseg.data.transforms import mask_histogram

UNLABELLED_SPLITS = ("test",)


@dataclass
class SplitReport:
    """What the checker found in one split."""

    split: str
    images: int = 0
    masks: int = 0
    labelled: bool = True
    missing: str | None = None  # a required folder that does not exist
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


def _check_pair(
    image_path: Path, mask_path: Path | None, num_classes: int, ignore_index: int
) -> tuple[str, str | None, np.ndarray | None]:
    """(problem kind, message, mask histogram) of one image / mask pair; kind "" when fine."""
    try:
        image = read_image_file(image_path)
    except DatasetError as exc:
        return "unreadable", str(exc), None
    if mask_path is None:
        return "", None, None
    try:
        mask = read_image_file(mask_path, cv2.IMREAD_UNCHANGED)
    except DatasetError as exc:
        return "unreadable", str(exc), None
    if mask.ndim != 2 or mask.dtype != np.uint8:
        return "bad_values", f"{mask_path}: not a single-channel 8-bit mask", None
    hist = mask_histogram(mask)
    if mask.shape != image.shape[:2]:
        return (
            "size_mismatch",
            f"{mask_path}: mask {mask.shape[1]}x{mask.shape[0]} vs image "
            f"{image.shape[1]}x{image.shape[0]}",
            hist,
        )
    bad = np.flatnonzero(hist[num_classes:])  # values >= num_classes other than ignore
    bad = [int(v) + num_classes for v in bad if int(v) + num_classes != ignore_index]
    if bad:
        return (
            "bad_values",
            f"{mask_path}: values {bad[:10]} outside 0..{num_classes - 1}, {ignore_index}",
            hist,
        )
    return "", None, hist


def check_split(
    root: str | Path,
    split: str,
    num_classes: int = 19,
    ignore_index: int = 255,
    workers: int = 4,
) -> SplitReport:
    """Read every image and mask of `split` under `root` and collect the problems."""
    report = SplitReport(split, labelled=split not in UNLABELLED_SPLITS)
    image_dir, mask_dir = split_dirs(root, split)
    if not image_dir.is_dir():
        report.missing = str(image_dir)
        return report
    images = {p.stem: p for p in sorted(image_dir.glob("*.jpg"))}
    masks = {p.stem: p for p in sorted(mask_dir.glob("*.png"))} if mask_dir.is_dir() else {}
    report.images, report.masks = len(images), len(masks)
    if report.labelled and not mask_dir.is_dir():
        report.missing = str(mask_dir)
    if mask_dir.is_dir():
        report.images_without_mask = [str(images[n]) for n in sorted(set(images) - set(masks))]
        report.masks_without_image = [str(masks[n]) for n in sorted(set(masks) - set(images))]
    pairs = [(images[n], masks.get(n)) for n in images]
    with ThreadPoolExecutor(max(workers, 1)) as pool:  # cv2 decodes release the GIL
        results = pool.map(lambda p: _check_pair(*p, num_classes, ignore_index), pairs)
        for kind, message, hist in results:
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
        lines.append(f"  missing folder: {report.missing}")
    if report.images == 0 and not report.missing:
        lines.append("  no .jpg images")
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


def _class_names(num_classes: int) -> list[str] | None:
    try:
        from semseg.data.toy import default_classes

        names, _ = default_classes()
    except (OSError, ValueError):
        return None
    return names if len(names) == num_classes else None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: check the splits of a dataset root; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Check a BDD100K-layout semantic segmentation dataset."
    )
    parser.add_argument("root", type=Path, help="folder holding images/10k and labels/sem_seg")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--ignore-index", type=int, default=255)
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"dataset root {args.root} does not exist", file=sys.stderr)
        return 2
    names = _class_names(args.num_classes)
    usable = True
    for split in args.splits:
        report = check_split(args.root, split, args.num_classes, args.ignore_index, args.workers)
        print(format_report(report, names, args.ignore_index))
        usable &= report.usable
    print("dataset usable" if usable else "dataset NOT usable: fix the problems listed above")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
