"""Cityscapes fine annotations, read from the official folder layout.

    <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png        (raw label ids 0..33)
    <root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png   (optional: train ids, 255 = ignore)

Raw ids are mapped to the 19 train ids with the official label table below; every id that is not
trained (unlabeled, ego vehicle, rectification border, out of roi, parking, caravan, ...) becomes
255, so those regions are never learned and never scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from semseg.data.base import DatasetError, LabelValueError, SegmentationDataset, files_by_name

IGNORE = 255


class CityscapesLabel(NamedTuple):
    name: str
    id: int  # value in *_gtFine_labelIds.png (-1: never written to label images)
    train_id: int  # 0..18, 255 = not trained (ignored)
    color: tuple[int, int, int]  # RGB


# The official table, from cityscapesScripts (cityscapesscripts/helpers/labels.py,
# https://github.com/mcordts/cityscapesScripts), columns name, id, trainId, color.
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(
    CityscapesLabel(*row)
    for row in (
        ("unlabeled", 0, 255, (0, 0, 0)),
        ("ego vehicle", 1, 255, (0, 0, 0)),
        ("rectification border", 2, 255, (0, 0, 0)),
        ("out of roi", 3, 255, (0, 0, 0)),
        ("static", 4, 255, (0, 0, 0)),
        ("dynamic", 5, 255, (111, 74, 0)),
        ("ground", 6, 255, (81, 0, 81)),
        ("road", 7, 0, (128, 64, 128)),
        ("sidewalk", 8, 1, (244, 35, 232)),
        ("parking", 9, 255, (250, 170, 160)),
        ("rail track", 10, 255, (230, 150, 140)),
        ("building", 11, 2, (70, 70, 70)),
        ("wall", 12, 3, (102, 102, 156)),
        ("fence", 13, 4, (190, 153, 153)),
        ("guard rail", 14, 255, (180, 165, 180)),
        ("bridge", 15, 255, (150, 100, 100)),
        ("tunnel", 16, 255, (150, 120, 90)),
        ("pole", 17, 5, (153, 153, 153)),
        ("polegroup", 18, 255, (153, 153, 153)),
        ("traffic light", 19, 6, (250, 170, 30)),
        ("traffic sign", 20, 7, (220, 220, 0)),
        ("vegetation", 21, 8, (107, 142, 35)),
        ("terrain", 22, 9, (152, 251, 152)),
        ("sky", 23, 10, (70, 130, 180)),
        ("person", 24, 11, (220, 20, 60)),
        ("rider", 25, 12, (255, 0, 0)),
        ("car", 26, 13, (0, 0, 142)),
        ("truck", 27, 14, (0, 0, 70)),
        ("bus", 28, 15, (0, 60, 100)),
        ("caravan", 29, 255, (0, 0, 90)),
        ("trailer", 30, 255, (0, 0, 110)),
        ("train", 31, 16, (0, 80, 100)),
        ("motorcycle", 32, 17, (0, 0, 230)),
        ("bicycle", 33, 18, (119, 11, 32)),
        ("license plate", -1, -1, (0, 0, 142)),
    )
)

# The 19 trained classes in train-id order; BDD100K uses exactly these names and colours.
TRAIN_LABELS = sorted(
    (lb for lb in CITYSCAPES_LABELS if 0 <= lb.train_id < IGNORE), key=lambda lb: lb.train_id
)
TRAIN_CLASS_NAMES: tuple[str, ...] = tuple(lb.name for lb in TRAIN_LABELS)
TRAIN_PALETTE: tuple[tuple[int, int, int], ...] = tuple(lb.color for lb in TRAIN_LABELS)


def _id_tables() -> tuple[np.ndarray, np.ndarray]:
    """(raw id -> train id lookup table, raw id is in the table) over 0..255."""
    to_train = np.full(256, IGNORE, np.uint8)
    known = np.zeros(256, np.uint8)
    for label in CITYSCAPES_LABELS:
        if label.id >= 0:
            to_train[label.id] = label.train_id if label.train_id >= 0 else IGNORE
            known[label.id] = 1
    to_train.flags.writeable = known.flags.writeable = False
    return to_train, known


ID_TO_TRAIN_ID, KNOWN_ID = _id_tables()
# For writing raw-id files: the raw id of each train id (the first label with it, as the official
# trainId2label does for the trained classes).
TRAIN_ID_TO_ID = np.array([lb.id for lb in TRAIN_LABELS], np.uint8)

LABEL_SUFFIXES = {"labelIds": "_gtFine_labelIds.png", "labelTrainIds": "_gtFine_labelTrainIds.png"}
IMAGE_SUFFIX = "_leftImg8bit.png"
LAYOUT = (
    "<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
    "<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png"
)


def label_ids_to_train_ids(label_ids: np.ndarray, source: str | Path) -> np.ndarray:
    """Map a raw labelIds map to train ids; DatasetError naming `source` for ids not in the table."""
    if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
        raise LabelValueError(f"{source} is not a single-channel 8-bit labelIds image")
    unknown = cv2.LUT(label_ids, KNOWN_ID) == 0
    if unknown.any():
        bad = np.unique(label_ids[unknown])[:10].tolist()
        raise LabelValueError(
            f"{source} has label ids {bad} that are not in the Cityscapes label table (0..33): "
            "it is not a *_gtFine_labelIds.png file; re-extract gtFine or set "
            "dataset.labels=labelTrainIds for train-id files"
        )
    return cv2.LUT(label_ids, ID_TO_TRAIN_ID)


class CityscapesDataset(SegmentationDataset):
    """Cityscapes' layout. `labels`: "auto" (labelTrainIds where the split has them, else
    labelIds), "labelIds" (mapped with the official table) or "labelTrainIds"."""

    root_hint = f"set dataset.root to the Cityscapes folder holding {LAYOUT}"

    def __init__(self, root: str | Path, *args: Any, labels: str = "auto", **kwargs: Any):
        """`SegmentationDataset`'s arguments plus the label files to read."""
        if labels not in ("auto", *LABEL_SUFFIXES):
            raise DatasetError(
                f"dataset.labels={labels!r}: use auto, labelIds or labelTrainIds for Cityscapes"
            )
        self.label_format = labels
        root = Path(root)
        for sub in ("leftImg8bit", "gtFine"):
            if root.is_dir() and not (root / sub).is_dir():
                raise DatasetError(
                    f"Cityscapes root {root} has no {sub}/ folder: expected {LAYOUT} "
                    "(unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip there)"
                )
        super().__init__(root, *args, **kwargs)

    def _list_images(self) -> tuple[dict[str, Path], str]:
        image_dir = self.root / "leftImg8bit" / self.split
        if not image_dir.is_dir():
            raise DatasetError(f"split folder {image_dir} does not exist: {self.root_hint}")
        return files_by_name(
            image_dir, (IMAGE_SUFFIX,), recursive=True
        ), f"{image_dir} (*{IMAGE_SUFFIX})"

    def _list_labels(self) -> tuple[dict[str, Any] | None, str]:
        label_dir = self.root / "gtFine" / self.split
        if not label_dir.is_dir():
            return None, str(label_dir)
        if self.label_format == "auto":
            has_train_ids = next(label_dir.rglob(f"*{LABEL_SUFFIXES['labelTrainIds']}"), None)
            self.label_format = "labelTrainIds" if has_train_ids else "labelIds"
        suffix = LABEL_SUFFIXES[self.label_format]
        return files_by_name(label_dir, (suffix,), recursive=True), f"{label_dir} (*{suffix})"

    def read_label(self, index: int) -> tuple[np.ndarray, str]:
        mask, source = super().read_label(index)
        if self.label_format == "labelIds":
            mask = label_ids_to_train_ids(mask, source)
        return mask, source
