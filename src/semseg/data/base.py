"""The dataset interface: a split's (image, label) pairs plus the shared reading and checking.

A concrete dataset only knows its folder layout: it lists the images and labels of a split
(`_list_images`, `_list_labels`) and, where its label files are not plain train ids, how to read
one (`read_label`). Pairing by name, the per-file checks, the augmentation hook and the item format
are the same for every dataset, and so is everything built on them (loaders, exact resume,
evaluation, prediction, the checker).
"""

from __future__ import annotations

import functools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from semseg.data.transforms import mask_histogram
from semseg.errors import UserError

_JPEG_EOI = b"\xff\xd9"
_IMREAD_COLOR_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV 4.10+
_PNG_IEND = b"IEND\xaeB`\x82"


class DatasetError(UserError):
    """Bad or missing dataset input; the message names the file or folder and the fix."""


class LabelValueError(DatasetError):
    """A label file holds values that are not classes of the dataset (names the file)."""


def _truncated(data: np.ndarray) -> bool:
    """True when a JPEG/PNG byte stream lacks its end marker (cv2 would decode it half grey)."""
    head, tail = data[:8].tobytes(), data[-32:].tobytes().rstrip(b"\x00")
    if head.startswith(b"\xff\xd8"):
        return not tail.endswith(_JPEG_EOI)
    if head.startswith(b"\x89PNG"):
        return not tail.endswith(_PNG_IEND)
    return False


def read_image_file(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """Decode an image with cv2; raise DatasetError for unreadable or truncated files."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if data.size == 0 or _truncated(data):
        raise DatasetError(
            f"{path} is empty or truncated: re-extract it from the dataset archive or remove it"
        )
    img = cv2.imdecode(data, flags)
    if img is None:
        raise DatasetError(
            f"{path} is not a readable image: re-extract it from the dataset archive or remove it"
        )
    return img


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB (HxWx3 uint8), decoded as every dataset decodes it (one decoder for
    training, evaluation, prediction and visuals: the same file gives the same pixels everywhere).
    OpenCV 4.10+ decodes to RGB directly (the same pixels as BGR + a channel swap, one copy less)."""
    if _IMREAD_COLOR_RGB is not None:
        return read_image_file(path, _IMREAD_COLOR_RGB)
    return cv2.cvtColor(read_image_file(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def chw_tensor(image: np.ndarray) -> torch.Tensor:
    """An HxWxC image as a CxHxW tensor; cv2.split writes the planes ~5x faster than numpy
    copies a transposed view."""
    image = np.ascontiguousarray(image)
    out = np.empty((image.shape[2], *image.shape[:2]), image.dtype)
    planes = cv2.split(image, list(out))
    if planes[0].ctypes.data != out.ctypes.data:  # this cv2 allocated its own planes
        out = np.stack(planes)
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=8)
def _invalid_value_lut(num_classes: int, ignore_index: int) -> np.ndarray:
    """1 for mask values that are neither a class id nor the ignore index (built once, not per load)."""
    lut = np.ones(256, dtype=np.uint8)
    lut[:num_classes] = lut[ignore_index] = 0
    lut.flags.writeable = False
    return lut


@functools.lru_cache(maxsize=8)
def _invalid_ranges(num_classes: int, ignore_index: int) -> tuple[tuple[int, int], ...]:
    """The (low, high) ranges, both inclusive, of the uint8 values that are invalid labels."""
    invalid = np.flatnonzero(_invalid_value_lut(num_classes, ignore_index))
    runs = np.split(invalid, np.flatnonzero(np.diff(invalid) > 1) + 1) if invalid.size else []
    return tuple((int(run[0]), int(run[-1])) for run in runs)


def invalid_values(mask: np.ndarray, num_classes: int, ignore_index: int) -> list[int]:
    """Up to 10 values of a uint8 mask that are neither a class id nor the ignore index."""
    ranges = _invalid_ranges(num_classes, ignore_index)
    # One vectorised range test per run of invalid values (one run when the ignore index is 255):
    # ~3x faster than a lookup table on every load, and ~20x than a histogram.
    if not any(cv2.countNonZero(cv2.inRange(mask, low, high)) for low, high in ranges):
        return []
    return np.flatnonzero(mask_histogram(mask) * _invalid_value_lut(num_classes, ignore_index))[
        :10
    ].tolist()


def check_mask(
    mask: np.ndarray,
    path: str | Path,
    num_classes: int,
    ignore_index: int,
    image_shape: tuple[int, int] | None = None,
) -> None:
    """Raise DatasetError if a label map has the wrong shape, dtype, size or values."""
    if mask.ndim != 2:
        raise DatasetError(
            f"{path} has {mask.shape[2]} channels; masks must be single-channel class ids "
            "(not the RGB colormaps)"
        )
    if mask.dtype != np.uint8:
        raise DatasetError(f"{path} is {mask.dtype}; masks must be 8-bit class ids")
    if image_shape is not None and mask.shape != tuple(image_shape):
        raise DatasetError(
            f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image_shape[1]}x{image_shape[0]} (WxH): the mask does not belong to this image"
        )
    bad = invalid_values(mask, num_classes, ignore_index)
    if bad:
        raise LabelValueError(
            f"{path} has values {bad} outside 0..{num_classes - 1} and {ignore_index} (ignore): "
            "convert it to train ids or fix dataset.num_classes"
        )


def files_by_name(folder: Path, suffixes: tuple[str, ...], recursive: bool = False) -> dict:
    """{name: path} of the files in `folder` ending in one of `suffixes` (name = file name minus
    the suffix, so `aachen_000000_000019_leftImg8bit.png` with suffix `_leftImg8bit.png` is
    `aachen_000000_000019`)."""
    found = {}
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        suffix = next((s for s in suffixes if path.name.endswith(s)), None)
        if suffix is not None and path.is_file():
            found.setdefault(path.name[: -len(suffix)], path)
    return found


class SegmentationDataset(Dataset, ABC):
    """Images + label maps of one split; items are `{"image", "mask"?, "name", "size"}` (uint8
    image CxHxW and mask HxW tensors; "size" is the (h, w) the image was read at).

    `dataset[i]` loads item i; `dataset[(i, seed)]` seeds the transform with `seed` first, so the
    augmentation is reproducible (the train loader's sampler yields such pairs).

    Subclasses set `root_hint` (what to do when the layout is not found) and implement
    `_list_images` -> ({name: image path}, where) and `_list_labels` -> ({name: label}, where) or
    None for an unlabelled split. `labels_found` and `images_found` count what the listing saw.
    """

    root_hint = "set dataset.root to the dataset folder"

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        strict: bool = True,
        num_classes: int = 19,
        ignore_index: int = 255,
    ):
        self.root, self.split = Path(root), split
        self.transform = transform
        self.num_classes, self.ignore_index = num_classes, ignore_index
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist: {self.root_hint}")
        images, self.image_source = self._list_images()
        if not images:
            raise DatasetError(f"no images in {self.image_source}: {self.root_hint}")
        labels, self.label_source = self._list_labels()
        self.images_found, self.labels_found = len(images), len(labels or {})
        self.images_without_label: list[str] = []
        self.labels_without_image: list[str] = []
        self.names = self._pair(images, labels, strict)
        self.image_paths = [images[n] for n in self.names]
        # Label file per item (for BDD100K RLE labels: the frame).
        self.mask_paths = [labels[n] for n in self.names] if labels is not None else None

    # -- the layout (subclasses) ---------------------------------------------------------------
    @abstractmethod
    def _list_images(self) -> tuple[dict[str, Path], str]:
        """({name: image path}, where they were looked for); DatasetError if the split is absent."""

    @abstractmethod
    def _list_labels(self) -> tuple[dict[str, Any] | None, str]:
        """({name: label file}, where they were looked for); None for an unlabelled split."""

    def read_label(self, index: int) -> tuple[np.ndarray, str]:
        """The train-id label map of item `index` and where it came from (for messages)."""
        path = self.mask_paths[index]
        return read_image_file(path, cv2.IMREAD_UNCHANGED), str(path)

    # -- shared --------------------------------------------------------------------------------
    @property
    def has_labels(self) -> bool:
        """Whether items carry a "mask" (False for an unlabelled split such as test)."""
        return self.mask_paths is not None

    def _pair(self, images: dict[str, Path], labels: dict[str, Any] | None, strict: bool) -> list:
        if labels is None:
            return list(images)
        no_label = sorted(set(images) - set(labels))
        no_image = sorted(set(labels) - set(images))
        self.images_without_label = [str(images[n]) for n in no_label]
        # Label files by path; labels that are not files (RLE frames) by name.
        self.labels_without_image = [
            str(labels[n]) if isinstance(labels[n], Path) else n for n in no_image
        ]
        if no_label or no_image:
            problem = (
                f"{len(no_label)} images in {self.image_source} have no label in "
                f"{self.label_source} (e.g. {no_label[:3]}), {len(no_image)} labels have no "
                f"image (e.g. {no_image[:3]})"
            )
            if strict:
                raise DatasetError(
                    f"{problem}: restore the missing files, or set dataset.strict=false to skip them"
                )
            warnings.warn(f"skipping unpaired files: {problem}", stacklevel=4)
        return [n for n in images if n in labels]

    def __len__(self) -> int:
        return len(self.names)

    def read_image(self, index: int) -> np.ndarray:
        """RGB image (HxWx3 uint8) of item `index`, checked, untransformed."""
        return read_rgb(self.image_paths[index])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked RGB image (HxWx3) and label map (HxW, or None) of item `index`, untransformed."""
        image = self.read_image(index)
        if self.mask_paths is None:
            return image, None
        mask, source = self.read_label(index)
        check_mask(mask, source, self.num_classes, self.ignore_index, image.shape[:2])
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        size = image.shape[:2]
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            data = {"image": image} if mask is None else {"image": image, "mask": mask}
            out = self.transform(**data)
            image, mask = out["image"], out.get("mask")
        item: dict[str, Any] = {
            "image": chw_tensor(image),
            "name": self.names[index],
            "size": torch.tensor(size),  # (h, w) as read: predictions are written at this size
        }
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask))
        return item
