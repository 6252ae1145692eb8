"""A user's own data: image and mask folders matched by file name, or one folder of images.

    <root>/<image_dir>/<split>/<name><image suffix>     (default images/<split>/*.jpg or *.png)
    <root>/<mask_dir>/<split>/<name><mask suffix>       (default masks/<split>/*.png: train ids, 255 = ignore)

Class names, palette and the number of classes come from the dataset config.
:class:`ImageFolder` is any folder of images, unlabelled (``src/predict.py input_dir=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semseg.data.base import DatasetError, SegmentationDataset, files_by_name


class FolderDataset(SegmentationDataset):
    """Images in `<root>/<image_dir>/<split>`, masks in `<root>/<mask_dir>/<split>`, paired by the
    file name without its suffix (`image_suffixes`, `mask_suffix`)."""

    def __init__(
        self,
        *args: Any,
        image_dir: str = "images",
        mask_dir: str = "masks",
        image_suffixes: Sequence[str] = (".jpg", ".png"),
        mask_suffix: str = ".png",
        **kwargs: Any,
    ):
        """`SegmentationDataset`'s arguments plus where the files are and how they end."""
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.image_suffixes, self.mask_suffix = tuple(image_suffixes), mask_suffix
        self.root_hint = (
            f"set dataset.root to the folder holding {image_dir}/<split>/*"
            f"{{{','.join(self.image_suffixes)}}} and {mask_dir}/<split>/*{mask_suffix}"
        )
        super().__init__(*args, **kwargs)

    def _list_images(self) -> tuple[dict[str, Path], str]:
        folder = self.root / self.image_dir / self.split
        if not folder.is_dir():
            raise DatasetError(f"split folder {folder} does not exist: {self.root_hint}")
        return files_by_name(
            folder, self.image_suffixes
        ), f"{folder} (*{'|*'.join(self.image_suffixes)})"

    def _list_labels(self) -> tuple[dict[str, Any] | None, str]:
        folder = self.root / self.mask_dir / self.split
        if not folder.is_dir():
            return None, str(folder)
        return files_by_name(folder, (self.mask_suffix,)), f"{folder} (*{self.mask_suffix})"


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolder(SegmentationDataset):
    """The images directly in `root` (any of :data:`IMAGE_SUFFIXES`, any case), unlabelled, read
    and resized exactly as a dataset split is; `what` names the folder in messages."""

    def __init__(self, root: str | Path, *args: Any, what: str = "image folder", **kwargs: Any):
        self.what = what
        self.root_hint = f"set {what}=<a folder of images>"
        super().__init__(root, "", *args, **kwargs)

    def _list_images(self) -> tuple[dict[str, Path], str]:
        images = {
            p.stem: p
            for p in sorted(self.root.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        }
        if not images:
            raise DatasetError(
                f"{self.what} {self.root} contains no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        return images, str(self.root)

    def _list_labels(self) -> tuple[dict[str, Any] | None, str]:
        return None, str(self.root)
