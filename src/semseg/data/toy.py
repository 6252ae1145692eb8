"""Synthetic street-scene datasets written exactly in a real layout (for the quickstart and tests).

One scene renderer (`toy_scene`), one writer per layout: BDD100K (JPEG images, PNG masks, colour
maps, Scalabel RLE JSON), Cityscapes (PNG images, raw `labelIds` including the ids that map to 255:
ego vehicle, rectification border, out of roi and other untrained classes) and the plain
image/mask folders of `dataset=folder`, plus BDD100K's drivable area (the same streets with lanes,
labelled direct / alternative / background). Output is a pure function of the arguments (same
bytes on every run). Class names and palette are passed in; they default to the 19 Cityscapes train
classes that BDD100K uses too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from semseg.data.bdd100k import IMAGE_DIR, MASK_DIR, RLE_FILE, encode_scalabel_frame
from semseg.data.cityscapes import (
    CITYSCAPES_LABELS,
    ID_TO_TRAIN_ID,
    IMAGE_SUFFIX,
    TRAIN_CLASS_NAMES,
    TRAIN_PALETTE,
)
from semseg.data.toy_scene import (
    IGNORE,
    VOID_CLUTTER,
    VOID_EGO,
    render_drivable_scene,
    render_scene_regions,
)
from semseg.files import reporting_write_errors

SPLITS = ("train", "val", "test")  # test is written without labels
# BDD100K's drivable-area classes (ids DIRECT, ALTERNATIVE, BACKGROUND of toy_scene) and palette.
DRIVABLE_CLASSES = ("direct", "alternative", "background")
DRIVABLE_PALETTE = ((219, 94, 86), (86, 211, 219), (0, 0, 0))


def default_classes() -> tuple[list[str], list[list[int]]]:
    """The 19 Cityscapes / BDD100K train classes' names and palette."""
    return list(TRAIN_CLASS_NAMES), [list(c) for c in TRAIN_PALETTE]


def _imwrite(path: Path, rgb_or_mask: np.ndarray, *params: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rgb_or_mask if rgb_or_mask.ndim == 2 else cv2.cvtColor(rgb_or_mask, cv2.COLOR_RGB2BGR)
    # Encoded here and written by Python: cv2.imwrite reports a full disk only as False.
    ok, encoded = cv2.imencode(path.suffix, data, list(params))
    if not ok:
        raise ValueError(f"cannot encode {path.name} as {path.suffix}")
    path.write_bytes(encoded.tobytes())


class ToyLayout(ABC):
    """Writes rendered samples into one folder layout; subclasses know the layout."""

    def __init__(
        self, root: Path, class_names: Sequence[str], palette: Sequence[Sequence[int]], seed: int
    ):
        self.root, self.class_names, self.seed = root, list(class_names), seed
        self.palette = [list(c) for c in palette]
        self.colours = np.zeros((256, 3), np.uint8)  # colour maps: palette colours, ignore black
        self.colours[: len(palette)] = np.array(palette, np.uint8)

    def render(
        self, key: Sequence[int], height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(RGB image, label map, void map) of the sample whose random draws `key` seeds."""
        rng = np.random.default_rng(list(key))
        return render_scene_regions(rng, height, width, self.class_names, self.palette)

    @abstractmethod
    def write(self, split: str, i: int, image: np.ndarray, label: np.ndarray, void: np.ndarray):
        """Store sample `i` of `split`: RGB image, train-id label map, void region map."""

    def finish(self) -> None:  # noqa: B027 - an optional hook, not a missing implementation
        """Write what covers a whole split (nothing by default)."""


class BDD100KToyLayout(ToyLayout):
    """JPEG images, PNG masks, colour maps (next to the masks) and the Scalabel RLE JSON of each
    labelled split, in the task's folders (the sem_seg task's by default)."""

    def __init__(
        self,
        *args: Any,
        image_dir: str = IMAGE_DIR,
        mask_dir: str = MASK_DIR,
        rle_file: str = RLE_FILE,
    ):
        super().__init__(*args)
        self.image_dir, self.mask_dir, self.rle_file = image_dir, mask_dir, rle_file
        self.colormap_dir = str(Path(mask_dir).parent / "colormaps")
        self.rle_class_names = self.class_names  # the classes that get an RLE label
        self.frames: dict[str, list[dict]] = {"train": [], "val": []}
        (self.root / image_dir).mkdir(parents=True, exist_ok=True)

    def write(self, split: str, i: int, image: np.ndarray, label: np.ndarray, void: np.ndarray):
        name = f"toy{SPLITS.index(split)}{i:04d}-{self.seed:04d}"
        image_path = self.root / self.image_dir / split / f"{name}.jpg"
        _imwrite(image_path, image, cv2.IMWRITE_JPEG_QUALITY, 92)
        if split in self.frames:
            _imwrite(self.root / self.mask_dir / split / f"{name}.png", label)
            _imwrite(self.root / self.colormap_dir / split / f"{name}.png", self.colours[label])
            frame = encode_scalabel_frame(f"{name}.jpg", label, self.rle_class_names)
            self.frames[split].append(frame)

    def finish(self) -> None:
        for split, frames in self.frames.items():
            if frames:
                rle_file = self.root / self.rle_file.format(split=split)
                rle_file.parent.mkdir(parents=True, exist_ok=True)
                rle_file.write_text(json.dumps({"frames": frames}))


class DrivableToyLayout(BDD100KToyLayout):
    """BDD100K's drivable-area layout: the street scenes with lanes, labelled with the dataset's
    three classes (direct, alternative, background); the streets use the 19 street classes. As in
    the toolkit's drivable RLE files, background (the last class) gets no RLE label."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rle_class_names = self.class_names[:-1]

    def render(
        self, key: Sequence[int], height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        street_names, street_palette = default_classes()
        image, drivable = render_drivable_scene(
            np.random.default_rng(list(key)),  # the street: the same draws as the sem_seg set
            np.random.default_rng([*key, 1]),  # the lanes: a generator of their own
            height,
            width,
            street_names,
            street_palette,
        )
        return image, drivable, np.zeros_like(drivable)


class CityscapesToyLayout(ToyLayout):
    """Two "cities" per split, PNG images, raw `*_gtFine_labelIds.png` and `*_gtFine_color.png`."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        (self.root / "gtFine").mkdir(parents=True, exist_ok=True)

    def write(self, split: str, i: int, image: np.ndarray, label: np.ndarray, void: np.ndarray):
        city = ("toycity", "toytown")[i % 2]
        name = f"{city}_{self.seed:06d}_{i:06d}"
        ids = cityscapes_label_ids(label, void, self.class_names, i)
        image = image.copy()
        image[ids == _REGION_IDS["rectification border"]] = 0  # the border is black, as in the data
        _imwrite(self.root / "leftImg8bit" / split / city / f"{name}{IMAGE_SUFFIX}", image)
        if split != "test":
            gt = self.root / "gtFine" / split / city
            _imwrite(gt / f"{name}_gtFine_labelIds.png", ids)
            _imwrite(gt / f"{name}_gtFine_color.png", self.colours[cv2.LUT(ids, ID_TO_TRAIN_ID)])


class FolderToyLayout(ToyLayout):
    """`images/<split>/*.jpg` and `masks/<split>/*.png` (train ids), the layout of dataset=folder."""

    def write(self, split: str, i: int, image: np.ndarray, label: np.ndarray, void: np.ndarray):
        name = f"scene_{self.seed:04d}_{i:04d}"
        _imwrite(self.root / "images" / split / f"{name}.jpg", image, cv2.IMWRITE_JPEG_QUALITY, 92)
        if split != "test":
            _imwrite(self.root / "masks" / split / f"{name}.png", label)


# Raw ids the Cityscapes toy gives its unlabelled blobs, in turn: every untrained id except the
# three region ids that are drawn on purpose (ego vehicle, rectification border, out of roi).
_REGION_IDS = {lb.name: lb.id for lb in CITYSCAPES_LABELS}
_DRAWN = ("ego vehicle", "rectification border", "out of roi")
_UNTRAINED_IDS = [
    lb.id for lb in CITYSCAPES_LABELS if lb.train_id == IGNORE and lb.name not in _DRAWN
]


def cityscapes_label_ids(
    label: np.ndarray, void: np.ndarray, class_names: Sequence[str], index: int
) -> np.ndarray:
    """Raw Cityscapes labelIds of a rendered scene: classes by name through the official table,
    the ego hood as "ego vehicle", clutter blobs as untrained ids (in turn, by `index`), a frame
    as "rectification border" and the two bottom corners as "out of roi"."""
    unknown = [n for n in class_names if n not in _REGION_IDS]
    if unknown:
        raise ValueError(f"classes {unknown} are not in the Cityscapes label table")
    lut = np.full(256, _REGION_IDS["unlabeled"], np.uint8)
    lut[: len(class_names)] = [_REGION_IDS[n] for n in class_names]
    ids = lut[label]
    ids[void == VOID_EGO] = _REGION_IDS["ego vehicle"]
    for k in range(len(_UNTRAINED_IDS)):
        ids[void == VOID_CLUTTER + k] = _UNTRAINED_IDS[(index + k) % len(_UNTRAINED_IDS)]
    h, w = ids.shape
    corner = np.array([[0, h - h // 5], [w // 8, h - 1], [0, h - 1]], np.int32)
    mirrored = np.stack([w - 1 - corner[:, 0], corner[:, 1]], 1).astype(np.int32)
    cv2.fillPoly(ids, [corner, mirrored], int(_REGION_IDS["out of roi"]))
    border = max(1, w // 128)
    frame = np.ones_like(ids, bool)
    frame[border:-border, border:-border] = False
    ids[frame] = _REGION_IDS["rectification border"]
    return ids


def make_toy_dataset(
    root: str | Path,
    layout: Callable[..., ToyLayout],
    num_train: int = 96,
    num_val: int = 24,
    num_test: int = 8,
    height: int = 128,
    width: int = 256,
    seed: int = 0,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Write the toy dataset under `root` in `layout` (a ToyLayout class, or a callable taking
    its arguments); returns `root`. Class names and palette default to the 19 Cityscapes /
    BDD100K train classes."""
    default_names, default_palette = default_classes()
    class_names, palette = class_names or default_names, palette or default_palette
    root = Path(root)
    writer = layout(root, class_names, palette, seed)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    bar = tqdm(total=sum(counts.values()), desc=f"toy dataset -> {root}", disable=not progress)
    for split_id, split in enumerate(SPLITS):
        for i in range(counts[split]):
            writer.write(split, i, *writer.render([seed, split_id, i], height, width))
            bar.update(1)
    bar.close()
    writer.finish()
    return root


def make_toy_bdd100k(root: str | Path, *args: Any, **kwargs: Any) -> Path:
    """The toy dataset in the BDD100K layout (arguments after `layout` of make_toy_dataset)."""
    return make_toy_dataset(root, BDD100KToyLayout, *args, **kwargs)


def make_toy_bdd100k_drivable(
    root: str | Path,
    *args: Any,
    image_dir: str = "images/100k",
    mask_dir: str = "labels/drivable/masks",
    rle_file: str = "labels/drivable/rles/drivable_{split}.json",
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> Path:
    """The toy drivable-area dataset in the BDD100K layout, in the given folders (conf/dataset/
    toy_bdd100k_drivable.yaml passes its layout's); class names and palette default to
    BDD100K's drivable ones."""
    layout = functools.partial(
        DrivableToyLayout, image_dir=image_dir, mask_dir=mask_dir, rle_file=rle_file
    )
    return make_toy_dataset(
        root,
        layout,
        *args,
        class_names=class_names or DRIVABLE_CLASSES,
        palette=palette or DRIVABLE_PALETTE,
        **kwargs,
    )


def make_toy_cityscapes(root: str | Path, *args: Any, **kwargs: Any) -> Path:
    """The toy dataset in the Cityscapes layout (arguments after `layout` of make_toy_dataset)."""
    return make_toy_dataset(root, CityscapesToyLayout, *args, **kwargs)


def make_toy_folder(root: str | Path, *args: Any, **kwargs: Any) -> Path:
    """The toy dataset in the image/mask folder layout (arguments after `layout` of make_toy_dataset)."""
    return make_toy_dataset(root, FolderToyLayout, *args, **kwargs)


def _has_files(root: Path) -> bool:
    return root.is_dir() and any(root.iterdir())


def ensure_toy_dataset(dataset_cfg: Mapping[str, Any]) -> Path:
    """Generate the toy data at `dataset_cfg.root` when it is missing (or empty) and `generate`
    is set. `generate._target_` names the layout's generator (default: make_toy_bdd100k); the
    dataset's class names and palette are passed to it.

    Safe to call from every rank (and node) at once: each caller writes into its own temporary
    sibling and renames it into place; the first rename wins, the others drop their copy, and no
    reader ever sees half a dataset (an interrupted run leaves none either).
    """
    root = Path(dataset_cfg["root"])
    gen = dataset_cfg.get("generate")
    if gen is None or _has_files(root):
        return root
    # A progress bar for a person at a terminal only: not in logs, and not before the one line of
    # an error that follows on stderr.
    defaults = {"_target_": f"{__name__}.make_toy_bdd100k", "progress": sys.stderr.isatty()}
    if isinstance(gen, DictConfig):  # interpolations (e.g. of the layout's folders) resolved here
        gen = OmegaConf.to_container(gen, resolve=True)
    gen = OmegaConf.merge(defaults, gen)
    names, palette = dataset_cfg.get("class_names"), dataset_cfg.get("palette")
    tmp = root.with_name(f"{root.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with reporting_write_errors(tmp, "toy dataset", "free space there or set dataset.root"):
            instantiate(
                gen,
                root=tmp,
                class_names=list(names) if names is not None else None,
                palette=[list(c) for c in palette] if palette is not None else None,
            )
            _move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there: another caller's copy won
    return root


def _move_into_place(tmp: Path, root: Path) -> None:
    """Rename the finished `tmp` to `root` (an empty `root` folder is replaced)."""
    with contextlib.suppress(OSError):  # absent, or not empty (another caller's copy)
        root.rmdir()
    try:
        tmp.rename(root)
    except OSError:
        if _has_files(root):  # another caller finished first: keep its copy
            return
        # An empty folder that cannot be replaced (a mount point): fill it instead.
        shutil.copytree(tmp, root, dirs_exist_ok=True)
