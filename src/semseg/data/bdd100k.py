"""BDD100K's pixel tasks, read from the official folder layout. Semantic segmentation (the 10K
images) by default:

    <root>/images/10k/<split>/<name>.jpg
    <root>/labels/sem_seg/masks/<split>/<name>.png       (uint8 class ids, 255 = ignore)
    <root>/labels/sem_seg/rles/sem_seg_<split>.json       (Scalabel frames, COCO RLE per class)

Drivable area (the 100K images) is the same layout with other folders, given as configuration
(`image_dir`, `mask_dir`, `rle_file`; conf/dataset/bdd100k_drivable.yaml):

    <root>/images/100k/<split>/<name>.jpg
    <root>/labels/drivable/masks/<split>/<name>.png       (0 direct, 1 alternative, 2 background)
    <root>/labels/drivable/rles/drivable_<split>.json       (direct / alternative labels only)

The drivable RLE frames label direct and alternative only: the pixels no label covers are
background (`rle_uncovered: 2`, as the toolkit's to_mask fills them), not ignored.

Pairing happens at construction (a directory listing); every file is checked when it is loaded,
so a bad file stops training with one message naming it instead of being silently "fixed".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semseg.data.base import DatasetError, SegmentationDataset, files_by_name

IMAGE_DIR = "images/10k"
MASK_DIR = "labels/sem_seg/masks"
RLE_FILE = "labels/sem_seg/rles/sem_seg_{split}.json"
LABEL_FORMATS = ("masks", "rles")


def decode_scalabel_rle(
    frame: dict[str, Any], class_ids: dict[str, int], ignore_index: int, source: str
) -> np.ndarray:
    """Label map of one Scalabel frame: each label's COCO RLE painted with its class id.

    Pixels no label covers stay `ignore_index` (sem_seg, as in the bdd100k toolkit's RLE -> mask;
    drivable area passes its background id here).
    """
    from pycocotools import mask as mask_utils

    mask: np.ndarray | None = None
    for label in frame.get("labels") or []:
        rle, category = label.get("rle"), label.get("category")
        if rle is None:
            continue
        if category not in class_ids:
            raise DatasetError(
                f"{source}: frame {frame.get('name')} has category {category!r}, not in "
                "dataset.class_names"
            )
        binary = mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"]})
        if mask is None:
            mask = np.full(binary.shape, ignore_index, dtype=np.uint8)
        mask[binary > 0] = class_ids[category]
    if mask is None:
        raise DatasetError(f"{source}: frame {frame.get('name')} has no RLE labels")
    return mask


def encode_scalabel_frame(
    image_name: str, mask: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """The Scalabel frame of one HxW label map: a label per class present, its pixels as COCO RLE.

    Values outside ``0..len(class_names)-1`` (255 = ignore) get no label, so they decode back to
    the ignore index, as the toolkit does.
    """
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask of {image_name} must be HxW, got shape {mask.shape}")
    labels = []
    for class_id in np.unique(mask).tolist():
        if class_id >= len(class_names):
            continue
        rle = mask_utils.encode(np.asfortranarray(mask == class_id, dtype=np.uint8))
        labels.append(
            {
                "id": str(len(labels)),
                "category": class_names[class_id],
                "rle": {
                    "counts": rle["counts"].decode("ascii"),
                    "size": list(map(int, rle["size"])),
                },
            }
        )
    return {"name": image_name, "labels": labels}


class BDD100KDataset(SegmentationDataset):
    """BDD100K's layout; labels from the PNG masks (`labels="masks"`) or the RLE JSON ("rles").

    `image_dir`, `mask_dir` (folders holding one folder per split) and `rle_file` (with a
    `{split}` field) are relative to the root: the sem_seg task's by default."""

    def __init__(
        self,
        *args: Any,
        labels: str = "masks",
        class_names: Sequence[str] | None = None,
        image_dir: str = IMAGE_DIR,
        mask_dir: str = MASK_DIR,
        rle_file: str = RLE_FILE,
        rle_uncovered: int | None = None,
        **kwargs: Any,
    ):
        """`SegmentationDataset`'s arguments plus the label format, (for RLE categories) the class
        names, the task's folders and the id of the pixels no RLE label covers (None: ignore)."""
        if labels not in LABEL_FORMATS:
            raise DatasetError(f"dataset.labels={labels!r}: use one of {list(LABEL_FORMATS)}")
        if "{split}" not in rle_file:
            raise DatasetError(
                f"dataset.layout.rle_file={rle_file!r} has no {{split}} field: name the file of "
                "each split, e.g. labels/sem_seg/rles/sem_seg_{split}.json"
            )
        self.label_format = labels
        self.rle_uncovered = rle_uncovered
        self.image_dir, self.mask_dir, self.rle_template = image_dir, mask_dir, rle_file
        self.root_hint = (
            f"set dataset.root=/path/to/bdd100k (the folder holding {image_dir} and "
            f"{Path(mask_dir).parent}), or try experiment=quickstart for generated data"
        )
        self.class_ids = {name: i for i, name in enumerate(class_names or [])}
        self.frames: dict[str, dict[str, Any]] = {}
        super().__init__(*args, **kwargs)

    @property
    def rle_file(self) -> Path:
        return self.root / self.rle_template.format(split=self.split)

    def _list_images(self) -> tuple[dict[str, Path], str]:
        image_dir = self.root / self.image_dir / self.split
        if not image_dir.is_dir():
            raise DatasetError(f"split folder {image_dir} does not exist: {self.root_hint}")
        return files_by_name(image_dir, (".jpg",)), f"{image_dir} (.jpg)"

    def _list_labels(self) -> tuple[dict[str, Any] | None, str]:
        if self.label_format == "rles":
            return self._load_rles(), str(self.rle_file)
        mask_dir = self.root / self.mask_dir / self.split
        return (files_by_name(mask_dir, (".png",)) if mask_dir.is_dir() else None), str(mask_dir)

    def _load_rles(self) -> dict[str, Any] | None:
        if not self.rle_file.is_file():
            if self.split == "test":
                return None
            raise DatasetError(
                f"RLE label file {self.rle_file} does not exist: unpack the BDD100K RLE labels "
                "there, or set dataset.labels=masks"
            )
        if not self.class_ids:
            raise DatasetError("dataset.labels=rles needs dataset.class_names to map categories")
        try:
            frames = json.loads(self.rle_file.read_text())["frames"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"{self.rle_file} is not a Scalabel JSON with a 'frames' list: {exc}"
            ) from exc
        self.frames = {Path(f["name"]).stem: f for f in frames}
        return self.frames

    def read_label(self, index: int) -> tuple[np.ndarray, str]:
        if self.label_format == "masks":
            return super().read_label(index)
        name = self.names[index]
        source = f"{self.rle_file} (frame {name})"
        fill = self.ignore_index if self.rle_uncovered is None else self.rle_uncovered
        return decode_scalabel_rle(self.frames[name], self.class_ids, fill, source), source
