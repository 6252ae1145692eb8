"""The reference (mmseg) training recipe as an albumentations 2.x pipeline.

albumentations has no keep-ratio rescale to a base scale, no cat_max_ratio crop and no
mmseg-style photometric distortion, so those three are small transforms here. Every random draw
goes through the transform's own `py_random` / `random_generator`, which `Compose.set_random_seed`
re-seeds: the augmentation of a sample is then a pure function of the seed it is given.
No normalisation: the loader hands uint8 to the device and the model normalises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import (
    BaseTransformInitSchema,
    DualTransform,
    ImageOnlyTransform,
)


def mask_histogram(mask: np.ndarray) -> np.ndarray:
    """Pixel count of each value 0..255 of a uint8 mask.

    Label maps are long runs of one value, and a per-pixel histogram is slow on runs (each pixel
    increments the bin that the previous one has just written: OpenCV's takes ~4x longer on a
    512x1024 label window than on noise). So runs are counted instead (where they start, their
    lengths, one weighted bincount; the counts are integers below 2**53, exact in float64), and a
    mask with more than one run per 8 pixels goes through OpenCV's histogram (~4x np.bincount).
    """
    flat = mask.ravel()
    if flat.size == 0:
        return np.zeros(256, np.int64)
    change = np.empty(flat.size, bool)
    change[0] = True
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    if np.count_nonzero(change) * 8 > flat.size:
        return cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=flat.size)
    return np.bincount(flat[starts], weights=lengths, minlength=256).astype(np.int64)


def rescale_size(
    height: int, width: int, scale: Sequence[int], ratio: float = 1.0
) -> tuple[int, int]:
    """(h, w) that mmcv's `imrescale` gives: fit (h, w) into `scale`*ratio, keeping aspect.

    `scale` is (w, h) as in mmseg; the long image edge is fitted to the long scale edge and the
    short one to the short, whichever factor is smaller wins (mmcv `rescale_size`).
    """
    long_edge = max(scale) * ratio
    short_edge = min(scale) * ratio
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class RandomRescale(DualTransform):
    """mmseg `RandomResize(scale, ratio_range, keep_ratio=True)`: image linear, mask nearest."""

    class InitSchema(BaseTransformInitSchema):
        scale: tuple[int, int]
        ratio_range: tuple[float, float]

    def __init__(
        self,
        scale: tuple[int, int] = (1280, 720),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(*self.ratio_range)
        return {"size": rescale_size(height, width, self.scale, ratio)}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range")


class RandomCropCatMax(DualTransform):
    """mmseg `RandomCrop(crop_size, cat_max_ratio)`.

    A random window of `size` (h, w), clipped to the image when the image is smaller (no padding
    here: the pipeline pads afterwards). With cat_max_ratio < 1 the window is re-drawn up to 10
    times until the most frequent class covers less than cat_max_ratio of the non-ignored pixels
    (and at least two classes are present); after 10 failures the last draw is kept, as in mmseg.
    """

    class InitSchema(BaseTransformInitSchema):
        size: tuple[int, int]
        cat_max_ratio: float
        ignore_index: int
        max_tries: int

    def __init__(
        self,
        size: tuple[int, int] = (512, 1024),
        cat_max_ratio: float = 0.75,
        ignore_index: int = 255,
        max_tries: int = 10,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.size = tuple(size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        off_y = self.py_random.randint(0, max(height - self.size[0], 0))
        off_x = self.py_random.randint(0, max(width - self.size[1], 0))
        return off_x, off_y, min(off_x + self.size[1], width), min(off_y + self.size[0], height)

    def accepts(self, window: np.ndarray) -> bool:
        """Whether the mask ``window`` passes cat_max_ratio: two classes or more, none covering
        cat_max_ratio of the non-ignored pixels."""
        counts = mask_histogram(window)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def choose_box(
        self,
        height: int,
        width: int,
        window: Callable[[tuple[int, int, int, int]], np.ndarray] | None,
    ) -> tuple[int, int, int, int]:
        """The crop box (x1, y1, x2, y2) in an image of (height, width); ``window(box)`` reads the
        mask inside a box (None: no mask, no re-draws)."""
        box = self._draw(height, width)
        if self.cat_max_ratio < 1.0 and window is not None:
            for _ in range(self.max_tries):
                if self.accepts(window(box)):
                    break
                box = self._draw(height, width)
        return box

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        mask = data.get("mask")
        window = None if mask is None else (lambda box: mask[box[1] : box[3], box[0] : box[2]])
        return {"crop_coords": self.choose_box(*params["shape"][:2], window)}

    def apply(self, img: np.ndarray, crop_coords: tuple[int, ...], **params: Any) -> np.ndarray:
        x1, y1, x2, y2 = crop_coords
        return np.ascontiguousarray(img[y1:y2, x1:x2])

    def apply_to_mask(
        self, mask: np.ndarray, crop_coords: tuple[int, ...], **params: Any
    ) -> np.ndarray:
        return self.apply(mask, crop_coords)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "cat_max_ratio", "ignore_index", "max_tries")


def resize_window(
    img: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int], interpolation: int
) -> np.ndarray:
    """``cv2.resize(img, (w, h), interpolation=interpolation)[y1:y2, x1:x2]`` for ``size`` (h, w)
    and ``box`` (x1, y1, x2, y2), resizing only the input from its top-left corner to what the box
    reads.

    cv2 computes an output pixel from its own coordinates and the scale factors, and these stay
    those of the whole resize when they are passed as ``fx``/``fy`` (the same doubles that
    ``dsize`` gives): the output anchored at (0, 0) is then the same whatever lies beyond the
    box. The input keeps 3 pixels past the box's mapped corner (bilinear reads 2, +1 for
    rounding), so no border rule applies inside the box that the whole image would not apply.
    """
    (height, width), (x1, y1, x2, y2) = size, box
    in_h, in_w = img.shape[:2]
    fx, fy = width / in_w, height / in_h
    need_w, need_h = min(in_w, math.ceil(x2 / fx) + 3), min(in_h, math.ceil(y2 / fy) + 3)
    if (need_h, need_w) == (in_h, in_w):
        out = cv2.resize(img, (width, height), interpolation=interpolation)
    else:
        out = cv2.resize(img[:need_h, :need_w], None, fx=fx, fy=fy, interpolation=interpolation)
    return np.ascontiguousarray(out[y1:y2, x1:x2])


class RandomRescaleCrop(DualTransform):
    """:class:`RandomRescale` then :class:`RandomCropCatMax` (mmseg's RandomResize + RandomCrop),
    pixel for pixel, without resizing what the crop throws away.

    The crop window is drawn on the rescaled size first, each step drawing from its own seeded
    stream as the two separate transforms do; the cat_max_ratio re-draws read the rescaled mask
    through cv2's nearest-neighbour indices (:func:`nearest_indices`), the window they accept is
    the output mask, and only the image up to the window is resized (:func:`resize_window`).
    Up to ~2x less work per sample at ratio 2.
    """

    class InitSchema(RandomCropCatMax.InitSchema, RandomRescale.InitSchema):
        pass

    def __init__(
        self,
        scale: tuple[int, int] = (1280, 720),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        size: tuple[int, int] = (512, 1024),
        cat_max_ratio: float = 0.75,
        ignore_index: int = 255,
        max_tries: int = 10,
        p: float = 1.0,
    ):
        # The steps first: the base class seeds them (set_random_seed).
        self.rescale = RandomRescale(scale=scale, ratio_range=ratio_range)
        self.crop = RandomCropCatMax(size, cat_max_ratio, ignore_index, max_tries)
        super().__init__(p=p)
        self.scale, self.ratio_range = self.rescale.scale, self.rescale.ratio_range
        self.size, self.cat_max_ratio = self.crop.size, cat_max_ratio
        self.ignore_index, self.max_tries = ignore_index, max_tries

    def set_random_seed(self, seed: int | None) -> None:
        """Seed both steps as a Compose seeds each of its transforms."""
        super().set_random_seed(seed)
        self.rescale.set_random_seed(seed)
        self.crop.set_random_seed(seed)

    def set_random_state(self, random_generator: np.random.Generator, py_random: Any) -> None:
        """Share a Compose's generators with both steps, as it would with two transforms."""
        super().set_random_state(random_generator, py_random)
        self.rescale.set_random_state(random_generator, py_random)
        self.crop.set_random_state(random_generator, py_random)

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        size = self.rescale.get_params_dependent_on_data(params, data)["size"]
        mask, window, read = data.get("mask"), None, {}
        if mask is not None and self.crop.cat_max_ratio < 1.0:
            rows, cols = nearest_indices(mask.shape[:2], size)

            def window(box: tuple[int, int, int, int]) -> np.ndarray:
                x1, y1, x2, y2 = box
                read.clear()  # only the last window read: the accepted one, if any
                read[box] = mask.take(rows[y1:y2], axis=0).take(cols[x1:x2], axis=1)
                return read[box]

        box = self.crop.choose_box(*size, window)
        # The window the re-draws accepted is the rescaled mask's crop already (a fresh array).
        return {"size": size, "crop_coords": box, "mask_window": read.get(box)}

    def apply(
        self, img: np.ndarray, size: tuple[int, int], crop_coords: tuple[int, ...], **params: Any
    ) -> np.ndarray:
        return resize_window(img, size, crop_coords, cv2.INTER_LINEAR)

    def apply_to_mask(
        self,
        mask: np.ndarray,
        size: tuple[int, int],
        crop_coords: tuple[int, ...],
        mask_window: np.ndarray | None = None,
        **params: Any,
    ) -> np.ndarray:
        if mask_window is not None:
            return mask_window
        return resize_window(mask, size, crop_coords, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range", "size", "cat_max_ratio", "ignore_index", "max_tries")


def nearest_indices(shape: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Row and column indices that ``cv2.resize(..., INTER_NEAREST)`` reads to resize ``shape``
    (h, w) to ``size`` (h, w): ``floor(i * in / out)`` with cv2's doubles, clipped to the input."""
    return tuple(
        np.minimum(np.floor(np.arange(n_out) * (1.0 / (n_out / n_in))), n_in - 1).astype(np.intp)
        for n_in, n_out in zip(shape, size)
    )


class PhotoMetricDistortion(ImageOnlyTransform):
    """mmseg `PhotoMetricDistortion` on an RGB uint8 image.

    In order: brightness (+U(-delta, delta)), contrast (x U(lo, hi)) either here or last,
    saturation (S x U(lo, hi)), hue (H + randint(-hue_delta, hue_delta) mod 180, OpenCV units);
    each step with probability 0.5, each clipped and truncated to uint8 as mmseg does. The
    per-pixel affine steps run as 256-entry lookup tables (bit-identical on uint8, much faster;
    brightness and a first contrast fold into one table, skipped when neither applies), and
    saturation + hue share one HSV round trip where mmseg does two, as one table per HSV channel
    applied in place.
    """

    class InitSchema(BaseTransformInitSchema):
        brightness_delta: int
        contrast_range: tuple[float, float]
        saturation_range: tuple[float, float]
        hue_delta: int

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def get_params(self) -> dict[str, Any]:
        rnd = self.py_random

        def maybe(draw: Any) -> Any:
            # Draw the value only when the step applies, like mmseg's `if randint(2):` gates.
            return draw() if rnd.random() < 0.5 else None

        beta = maybe(lambda: rnd.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rnd.random() < 0.5
        alpha = maybe(lambda: rnd.uniform(*self.contrast_range))
        sat = maybe(lambda: rnd.uniform(*self.saturation_range))
        hue = maybe(lambda: rnd.randint(-self.hue_delta, self.hue_delta))
        return {
            "beta": beta,
            "alpha": alpha,
            "contrast_first": contrast_first,
            "sat": sat,
            "hue": hue,
        }

    @staticmethod
    def _affine_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        values = np.arange(256, dtype=np.float32) * alpha + beta
        return np.clip(values, 0, 255).astype(np.uint8)

    def apply(
        self,
        img: np.ndarray,
        beta: float | None = None,
        alpha: float | None = None,
        contrast_first: bool = True,
        sat: float | None = None,
        hue: int | None = None,
        **params: Any,
    ) -> np.ndarray:
        lut, owned = None, False  # owned: img is this call's own array (may change in place)
        if beta is not None:
            lut = self._affine_lut(beta=beta)
        if alpha is not None and contrast_first:
            contrast = self._affine_lut(alpha=alpha)
            lut = contrast if lut is None else contrast[lut]
        if lut is not None:
            img, owned = cv2.LUT(img, lut), True
        if sat is not None or hue is not None:
            identity = np.arange(256, dtype=np.uint8)
            hue_lut = identity if hue is None else ((np.arange(256) + hue) % 180).astype(np.uint8)
            sat_lut = identity if sat is None else self._affine_lut(alpha=sat)
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            cv2.LUT(hsv, np.dstack((hue_lut, sat_lut, identity)), dst=hsv)
            img, owned = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), True
        if alpha is not None and not contrast_first:
            contrast = self._affine_lut(alpha=alpha)
            img = cv2.LUT(img, contrast, dst=img) if owned else cv2.LUT(img, contrast)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


class PadIfNeededNoCopy(A.PadIfNeeded):
    """``A.PadIfNeeded`` (mmseg's `Pad(size=crop_size)` at ``position="top_left"``), except that a
    pair that needs no padding (every crop of an image at least the crop size) is handed on as it
    is instead of copied."""

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img if self._nothing_to_pad(params) else super().apply(img, **params)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return mask if self._nothing_to_pad(params) else super().apply_to_mask(mask, **params)

    @staticmethod
    def _nothing_to_pad(params: dict[str, Any]) -> bool:
        sides = ("pad_top", "pad_bottom", "pad_left", "pad_right")
        return not any(params[side] for side in sides)


def pad_fill(mean: Sequence[float]) -> tuple[int, ...]:
    """Image pad value: the dataset mean rounded, so padded pixels normalise to ~0 on the device."""
    return tuple(round(float(m)) for m in mean)


def build_train_transform(
    scale: Sequence[int],
    ratio_range: Sequence[float],
    crop_size: Sequence[int],
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    pad_fill_image: Sequence[float] | float = 0,
    ignore_index: int = 255,
) -> A.Compose:
    """Rescale x U(ratio_range) -> cat_max_ratio crop -> flip -> photometric -> pad (bottom/right).

    `scale` is (w, h), `crop_size` is (h, w), both as in the dataset config.
    """
    crop_h, crop_w = (int(v) for v in crop_size)
    fill = tuple(pad_fill_image) if isinstance(pad_fill_image, Sequence) else pad_fill_image
    steps: list[A.BasicTransform] = [
        RandomRescaleCrop(
            scale=tuple(scale),
            ratio_range=tuple(ratio_range),
            size=(crop_h, crop_w),
            cat_max_ratio=cat_max_ratio,
            ignore_index=ignore_index,
        ),
        A.HorizontalFlip(p=flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    # mmseg pads at the bottom/right (Pad(size=crop_size)): position top_left keeps the image there.
    steps.append(
        PadIfNeededNoCopy(
            min_height=crop_h,
            min_width=crop_w,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=fill,
            fill_mask=ignore_index,
        )
    )
    return A.Compose(steps, strict=True)


class KeepRatioResize(ImageOnlyTransform):
    """mmseg's test-time `Resize(scale, keep_ratio=True)` of the image alone (bilinear).

    The label keeps its size: evaluation resizes the logits back to it instead.
    """

    class InitSchema(BaseTransformInitSchema):
        scale: tuple[int, int]

    def __init__(self, scale: tuple[int, int] = (1280, 720), p: float = 1.0):
        super().__init__(p=p)
        self.scale = tuple(scale)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        height, width = rescale_size(*img.shape[:2], self.scale)
        if (height, width) == img.shape[:2]:
            return img
        return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale",)


def build_eval_transform(scale: Sequence[int] | None = None) -> A.Compose | None:
    """Eval/test pipeline: nothing, or a keep-ratio resize of the image to `scale` (w, h)."""
    if scale is None:
        return None
    return A.Compose([KeepRatioResize(scale=tuple(scale))], strict=True)
