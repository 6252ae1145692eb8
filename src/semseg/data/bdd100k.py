"""BDD100K 10K semantic segmentation, read from the official folder layout.

    <root>/images/10k/<split>/<name>.jpg
    <root>/labels/sem_seg/masks/<split>/<name>.png       (uint8 class ids, 255 = ignore)
    <root>/labels/sem_seg/rles/sem_seg_<split>.json       (Scalabel frames, COCO RLE per class)

Pairing happens at construction (a directory listing); every file is checked when it is loaded,
so a bad file stops training with one message naming it instead of being silently "fixed".
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from semseg.data.transforms import mask_histogram
from semseg.errors import UserError

IMAGE_DIR = "images/10k"
MASK_DIR = "labels/sem_seg/masks"
RLE_FILE = "labels/sem_seg/rles/sem_seg_{split}.json"
ROOT_HINT = (
    "set dataset.root=/path/to/bdd100k (the folder holding images/10k and labels/sem_seg), "
    "or try experiment=quickstart for generated data"
)

_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND\xaeB`\x82"


class DatasetError(UserError):
    """Bad or missing dataset input; the message names the file or folder and the fix."""


def split_dirs(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, mask folder) of a split in the BDD100K layout."""
    root = Path(root)
    return root / IMAGE_DIR / split, root / MASK_DIR / split


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
            f"{path} is empty or truncated: re-extract it from the BDD100K archive or remove it"
        )
    img = cv2.imdecode(data, flags)
    if img is None:
        raise DatasetError(
            f"{path} is not a readable image: re-extract it from the BDD100K archive or remove it"
        )
    return img


@functools.lru_cache(maxsize=8)
def _invalid_value_lut(num_classes: int, ignore_index: int) -> np.ndarray:
    """1 for mask values that are neither a class id nor the ignore index (built once, not per load)."""
    lut = np.ones(256, dtype=np.uint8)
    lut[:num_classes] = lut[ignore_index] = 0
    lut.flags.writeable = False
    return lut


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
            "(labels/sem_seg/masks, not the RGB colormaps)"
        )
    if mask.dtype != np.uint8:
        raise DatasetError(f"{path} is {mask.dtype}; masks must be 8-bit class ids")
    if image_shape is not None and mask.shape != tuple(image_shape):
        raise DatasetError(
            f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image_shape[1]}x{image_shape[0]} (WxH): the mask does not belong to this image"
        )
    invalid = _invalid_value_lut(num_classes, ignore_index)
    if cv2.countNonZero(cv2.LUT(mask, invalid)):  # ~5x faster than a histogram on every load
        counts = mask_histogram(mask) * invalid
        bad = np.flatnonzero(counts)[:10].tolist()
        raise DatasetError(
            f"{path} has values {bad} outside 0..{num_classes - 1} and {ignore_index} (ignore): "
            "convert it to train ids or fix dataset.num_classes"
        )


def decode_scalabel_rle(
    frame: dict[str, Any], class_ids: dict[str, int], ignore_index: int, source: str
) -> np.ndarray:
    """Label map of one Scalabel frame: each label's COCO RLE painted with its class id.

    Pixels no label covers stay `ignore_index`, as in the bdd100k toolkit's RLE -> mask.
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


class BDD100KDataset(Dataset):
    """Images + label maps of one split; items are `{"image", "mask"?, "name"}` (uint8 tensors).

    `dataset[i]` loads item i; `dataset[(i, seed)]` seeds the transform with `seed` first, so the
    augmentation is reproducible (the train loader's sampler yields such pairs).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        labels: str = "masks",
        strict: bool = True,
        num_classes: int = 19,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ):
        self.root, self.split = Path(root), split
        self.transform = transform
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.labels = labels
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist: {ROOT_HINT}")
        image_dir, mask_dir = split_dirs(self.root, split)
        if not image_dir.is_dir():
            raise DatasetError(f"split folder {image_dir} does not exist: {ROOT_HINT}")
        images = {p.stem: p for p in sorted(image_dir.glob("*.jpg"))}
        if not images:
            raise DatasetError(f"no .jpg images in {image_dir}: {ROOT_HINT}")

        self.frames: dict[str, dict[str, Any]] = {}
        masks: dict[str, Any] | None
        if labels == "masks":
            masks = (
                {p.stem: p for p in sorted(mask_dir.glob("*.png"))} if mask_dir.is_dir() else None
            )
            label_source = str(mask_dir)
        elif labels == "rles":
            masks = self._load_rles(class_names)
            label_source = str(self.rle_file)
        else:
            raise DatasetError(f"dataset.labels={labels!r}: use 'masks' or 'rles'")

        self.names = self._pair(images, masks, strict, image_dir, label_source)
        self.image_paths = [images[n] for n in self.names]
        self.mask_paths = [masks[n] for n in self.names] if masks is not None else None

    @property
    def rle_file(self) -> Path:
        return self.root / RLE_FILE.format(split=self.split)

    @property
    def has_labels(self) -> bool:
        """Whether items carry a "mask" (False for the unlabelled test split)."""
        return self.mask_paths is not None

    def _load_rles(self, class_names: Sequence[str] | None) -> dict[str, Any] | None:
        if not self.rle_file.is_file():
            if self.split == "test":
                return None
            raise DatasetError(
                f"RLE label file {self.rle_file} does not exist: unpack the BDD100K sem_seg RLE "
                "labels there, or set dataset.labels=masks"
            )
        if class_names is None:
            raise DatasetError("dataset.labels=rles needs dataset.class_names to map categories")
        self.class_ids = {name: i for i, name in enumerate(class_names)}
        try:
            frames = json.loads(self.rle_file.read_text())["frames"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"{self.rle_file} is not a Scalabel JSON with a 'frames' list: {exc}"
            ) from exc
        self.frames = {Path(f["name"]).stem: f for f in frames}
        return self.frames

    def _pair(
        self,
        images: dict[str, Path],
        masks: dict[str, Any] | None,
        strict: bool,
        image_dir: Path,
        label_source: str,
    ) -> list[str]:
        if masks is None:
            return list(images)
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask or no_image:
            problem = (
                f"{len(no_mask)} images in {image_dir} have no label in {label_source} "
                f"(e.g. {no_mask[:3]}), {len(no_image)} labels have no image (e.g. {no_image[:3]})"
            )
            if strict:
                raise DatasetError(
                    f"{problem}: restore the missing files, or set dataset.strict=false to skip them"
                )
            warnings.warn(f"skipping unpaired files: {problem}", stacklevel=3)
        return [n for n in images if n in masks]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked RGB image (HxWx3) and label map (HxW, or None) of item `index`, untransformed."""
        path = self.image_paths[index]
        image = read_image_file(path, cv2.IMREAD_COLOR)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if self.mask_paths is None:
            return image, None
        if self.labels == "rles":
            source = f"{self.rle_file} (frame {self.names[index]})"
            mask = decode_scalabel_rle(
                self.frames[self.names[index]], self.class_ids, self.ignore_index, source
            )
        else:
            source = self.mask_paths[index]
            mask = read_image_file(source, cv2.IMREAD_UNCHANGED)
        check_mask(mask, source, self.num_classes, self.ignore_index, image.shape[:2])
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            data = {"image": image} if mask is None else {"image": image, "mask": mask}
            out = self.transform(**data)
            image, mask = out["image"], out.get("mask")
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "name": self.names[index],
        }
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask))
        return item


def build_dataset(dataset_cfg: DictConfig, split: str, train: bool) -> BDD100KDataset:
    """Dataset of `split` with the train recipe (train=True) or the eval pipeline from config."""
    from semseg.data.transforms import build_eval_transform, build_train_transform, pad_fill

    if train:
        tp = dataset_cfg.train_pipeline
        transform = build_train_transform(
            scale=list(tp.scale),
            ratio_range=list(tp.ratio_range),
            crop_size=list(tp.crop_size),
            cat_max_ratio=tp.cat_max_ratio,
            flip_prob=tp.flip_prob,
            photometric=tp.photometric,
            pad_fill_image=pad_fill(dataset_cfg.mean),
            ignore_index=dataset_cfg.ignore_index,
        )
    else:
        scale = dataset_cfg.get("test_pipeline", {}).get("scale")
        transform = build_eval_transform(list(scale) if scale is not None else None)
    class_names = dataset_cfg.get("class_names")
    dataset = BDD100KDataset(
        root=dataset_cfg.root,
        split=split,
        transform=transform,
        labels=dataset_cfg.get("labels", "masks"),
        strict=dataset_cfg.get("strict", True),
        num_classes=dataset_cfg.num_classes,
        ignore_index=dataset_cfg.ignore_index,
        class_names=list(class_names) if class_names is not None else None,
    )
    if train and not dataset.has_labels:
        _, mask_dir = split_dirs(dataset_cfg.root, split)
        raise DatasetError(
            f"training split {split!r} has no labels ({mask_dir} is missing): unpack the "
            "BDD100K sem_seg masks there"
        )
    return dataset
