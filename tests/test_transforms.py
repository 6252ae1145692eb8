"""The training recipe: alignment, scale range, crop size, cat_max_ratio, flip, padding."""

import random

import albumentations as A
import cv2
import numpy as np
import pytest

from semseg.data.transforms import (
    PadIfNeededNoCopy,
    PhotoMetricDistortion,
    RandomCropCatMax,
    RandomRescale,
    RandomRescaleCrop,
    build_eval_transform,
    build_train_transform,
    mask_histogram,
    nearest_indices,
    pad_fill,
    rescale_size,
    resize_window,
)

MEAN = (123.675, 116.28, 103.53)
FILL = pad_fill(MEAN)
PALETTE = np.array(
    [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
     [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
     [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
     [0, 80, 100], [0, 0, 230], [119, 11, 32]], np.uint8)  # fmt: skip
LUT = np.zeros((256, 3), np.uint8)
LUT[:19] = PALETTE  # 255 (ignore) encodes as black


def encoded_pair(h=96, w=192, block=16, seed=0):
    """A block mask and an image whose colour IS the mask's class colour."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 20, (h // block, w // block)).astype(np.uint8)
    small[small == 19] = 255
    mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return LUT[mask], mask


def interior(mask, margin=2):
    """Pixels at least `margin` away from any label change (interpolation cannot touch them)."""
    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    # Image edges count as borders: a crop may have cut a label change just outside them.
    lo = cv2.erode(mask, k, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    hi = cv2.dilate(mask, k, borderType=cv2.BORDER_CONSTANT, borderValue=254)
    return lo == hi


def train_tf(**kw):
    args = dict(scale=(192, 96), ratio_range=(0.5, 2.0), crop_size=(80, 160), cat_max_ratio=0.75,
                flip_prob=0.5, photometric=False, pad_fill_image=FILL, ignore_index=255)  # fmt: skip
    args.update(kw)
    return build_train_transform(**args)


def check_aligned(image, mask, pad_region=None):
    inner = interior(mask) & (mask != 255)
    assert inner.sum() > 0
    assert np.abs(image[inner].astype(int) - LUT[mask[inner]].astype(int)).max() <= 2
    if pad_region is not None:
        assert (mask[pad_region] == 255).all()
        assert (image[pad_region] == FILL).all()


@pytest.mark.parametrize("ratio", [(0.5, 2.0), (0.4, 0.7)])
def test_every_step_keeps_image_and_mask_aligned(ratio):
    image, mask = encoded_pair()
    tf = train_tf(ratio_range=ratio)
    for seed in range(25):
        tf.set_random_seed(seed)
        data = {"image": image, "mask": mask}
        for step in tf.transforms:  # after every single step...
            data = step(**data)
            check_aligned(data["image"], data["mask"])
        tf.set_random_seed(seed)  # ...and the composed pipeline gives the same pair
        out = tf(image=image, mask=mask)
        assert (out["image"] == data["image"]).all() and (out["mask"] == data["mask"]).all()
        check_aligned(out["image"], out["mask"])


def test_photometric_changes_image_only_and_is_seeded():
    image, mask = encoded_pair()
    tf = train_tf(photometric=True)
    changed = 0
    for seed in range(10):
        tf.set_random_seed(seed)
        a = tf(image=image, mask=mask)
        tf.set_random_seed(seed)
        b = tf(image=image, mask=mask)
        assert (a["image"] == b["image"]).all() and (a["mask"] == b["mask"]).all()
        tf.set_random_seed(seed)
        geo = train_tf(photometric=False)
        geo.set_random_seed(seed)
        # PhotoMetricDistortion draws after the geometric steps: the mask is identical.
        g = geo(image=image, mask=mask)
        assert (g["mask"] == a["mask"]).all()
        changed += int(not np.array_equal(g["image"], a["image"]))
    assert changed >= 5


def test_photometric_matches_mmseg_formulas():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pmd = PhotoMetricDistortion()
    out = pmd.apply(img, beta=20.0, alpha=None)
    assert (out == np.clip(img.astype(np.float32) + 20.0, 0, 255).astype(np.uint8)).all()
    out = pmd.apply(img, alpha=1.3, contrast_first=False)
    assert (out == np.clip(img.astype(np.float32) * 1.3, 0, 255).astype(np.uint8)).all()
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 10) % 180
    assert (pmd.apply(img, hue=10) == cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)).all()
    assert pmd.brightness_delta == 32 and pmd.hue_delta == 18
    assert pmd.contrast_range == (0.5, 1.5) and pmd.saturation_range == (0.5, 1.5)


def test_rescale_range_keeps_aspect():
    image, mask = encoded_pair(96, 192)
    tf = A.Compose([RandomRescale(scale=(192, 96), ratio_range=(0.5, 2.0))], strict=True)
    heights = []
    for seed in range(60):
        tf.set_random_seed(seed)
        out = tf(image=image, mask=mask)
        h, w = out["mask"].shape
        assert out["image"].shape[:2] == (h, w)
        assert 48 <= h <= 192 and abs(w - 2 * h) <= 1
        heights.append(h)
    assert min(heights) < 60 and max(heights) > 170


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size(720, 1280, (1280, 720), 1.0) == (720, 1280)
    assert rescale_size(720, 1280, (1280, 720), 0.5) == (360, 640)
    assert rescale_size(100, 100, (1280, 720), 1.0) == (720, 720)  # short edge limits
    assert rescale_size(1000, 1000, (2048, 512), 1.0) == (512, 512)


def test_output_is_crop_size_and_padding_is_ignore_and_mean():
    image, mask = encoded_pair(96, 192)
    tf = train_tf(ratio_range=(0.3, 0.5), flip_prob=0.0)  # always smaller than the crop
    for seed in range(5):
        tf.set_random_seed(seed)
        out = tf(image=image, mask=mask)
        assert out["image"].shape == (80, 160, 3) and out["mask"].shape == (80, 160)
        h, w = rescale_size(96, 192, (192, 96), 0.5)
        pad = np.ones((80, 160), bool)
        pad[: min(h, 80), : min(w, 160)] = False
        assert (out["mask"][pad] == 255).all() and (out["image"][pad] == FILL).all()
        pad_rows = np.flatnonzero((out["mask"] == 255).all(axis=1))
        assert pad_rows.size and pad_rows.max() == 79  # padded at the bottom (mmseg Pad)
        check_aligned(out["image"], out["mask"])
    tf = train_tf(ratio_range=(1.5, 2.0))
    for seed in range(5):
        tf.set_random_seed(seed)
        assert tf(image=image, mask=mask)["mask"].shape == (80, 160)


def test_padding_values_exactly():
    image, mask = encoded_pair(40, 60)
    tf = train_tf(scale=(60, 40), ratio_range=(1.0, 1.0), flip_prob=0.0)
    out = tf(image=image, mask=mask)
    assert (out["mask"][40:] == 255).all() and (out["mask"][:, 60:] == 255).all()
    assert (out["image"][40:] == FILL).all() and (out["image"][:, 60:] == FILL).all()
    assert (out["mask"][:40, :60] == mask).all() and (out["image"][:40, :60] == image).all()
    assert FILL == (124, 116, 104)


def test_crop_is_clipped_to_small_images():
    crop = A.Compose([RandomCropCatMax(size=(50, 80), cat_max_ratio=1.0)], strict=True)
    out = crop(image=np.zeros((30, 100, 3), np.uint8), mask=np.zeros((30, 100), np.uint8))
    assert out["mask"].shape == (30, 80)


def test_cat_max_ratio_resamples_until_no_class_dominates():
    h, w = 100, 400
    mask = np.zeros((h, w), np.uint8)
    mask[:, :200] = np.where((np.arange(200) // 10) % 2 == 0, 1, 2)  # mixed left half
    image = np.zeros((h, w, 3), np.uint8)

    def dominated_crops(ratio):
        tf = A.Compose([RandomCropCatMax(size=(100, 100), cat_max_ratio=ratio)], strict=True)
        bad = 0
        for seed in range(100):
            tf.set_random_seed(seed)
            m = tf(image=image, mask=mask)["mask"]
            assert m.shape == (100, 100)
            counts = np.bincount(m.ravel())
            bad += int(counts.max() / counts.sum() >= 0.75)
        return bad

    assert dominated_crops(0.75) == 0
    assert dominated_crops(1.0) > 20  # without the constraint ~40% of crops are dominated


def test_cat_max_ratio_ignores_the_ignore_label():
    crop = RandomCropCatMax(size=(10, 10), cat_max_ratio=0.75)
    mask = np.full((10, 10), 255, np.uint8)
    mask[:, :2], mask[:, 2:4] = 0, 1
    assert crop.accepts(mask)  # 50/50 among non-ignored pixels
    mask[:, 2:4] = 0
    assert not crop.accepts(mask)  # a single class


def test_flip():
    image, mask = encoded_pair(96, 192)
    for prob, expect in ((1.0, lambda a: a[:, ::-1]), (0.0, lambda a: a)):
        tf = train_tf(scale=(192, 96), ratio_range=(1.0, 1.0), crop_size=(96, 192), flip_prob=prob)
        out = tf(image=image, mask=mask)
        assert (out["mask"] == expect(mask)).all() and (out["image"] == expect(image)).all()


def test_strict_compose_and_eval_transform():
    assert train_tf().strict
    assert build_eval_transform(None) is None
    image, mask = encoded_pair(96, 192)
    out = build_eval_transform((96, 48))(image=image, mask=mask)
    # Only the image is resized (keep ratio): the label keeps its size, logits are resized to it.
    assert out["image"].shape == (48, 96, 3) and out["mask"] is mask
    expected = cv2.resize(image, (96, 48), interpolation=cv2.INTER_LINEAR)
    assert (out["image"] == expected).all()
    wide = build_eval_transform((96, 48))(image=image[:24])["image"]  # 192x24: the long edge rules
    assert wide.shape == (12, 96, 3)
    same = build_eval_transform((192, 96))(image=image)["image"]  # already at scale: untouched
    assert same is image


# -- The crop-first rescale: every pixel as the resize-then-crop recipe -------------------------


def reference_rescale_crop(
    image, mask, seed, scale, ratio_range, size, cat_max_ratio=0.75, streams=None
):
    """The recipe as it was first written: rescale the whole pair (mmcv keep-ratio sizes, cv2
    bilinear / nearest), then draw crops until cat_max_ratio holds (at most 10 re-draws). The
    ratio and the crop offsets come from two streams seeded alike, as two seeded transforms
    (``streams``: a dict that receives them, to compare what they drew)."""
    ratio_rng, crop_rng = random.Random(seed), random.Random(seed)
    if streams is not None:
        streams.update(ratio=ratio_rng, crop=crop_rng)
    h, w = rescale_size(*image.shape[:2], scale, ratio_rng.uniform(*ratio_range))
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)

    def draw():
        y = crop_rng.randint(0, max(h - size[0], 0))
        x = crop_rng.randint(0, max(w - size[1], 0))
        return slice(y, min(y + size[0], h)), slice(x, min(x + size[1], w))

    def accepted(window):
        counts = np.bincount(mask[window].ravel(), minlength=256)
        counts[255] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio

    window = draw()
    for _ in range(10):
        if accepted(window):
            break
        window = draw()
    return image[window], mask[window]


@pytest.mark.parametrize(
    ("shape", "crop"),
    [((720, 1280), (512, 1024)), ((96, 192), (80, 160)), ((75, 131), (64, 64)),
     ((128, 256), (128, 256)), ((61, 47), (50, 30))],
)  # fmt: skip
def test_crop_first_rescale_is_pixel_identical_to_resize_then_crop(shape, crop):
    rng = np.random.default_rng(shape[0])
    blocks = rng.integers(0, 20, (shape[0] // 8 + 1, shape[1] // 8 + 1)).astype(np.uint8)
    blocks[blocks == 19] = 255
    mask = cv2.resize(blocks, shape[::-1], interpolation=cv2.INTER_NEAREST)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    scale, ratios = shape[::-1], (0.5, 2.0)
    step = A.Compose([RandomRescaleCrop(scale, ratios, crop)], strict=True)
    two_steps = A.Compose(
        [RandomRescale(scale, ratios), RandomCropCatMax(crop, cat_max_ratio=0.75)], strict=True
    )
    seeds = 12 if shape[0] >= 720 else 60
    for seed in range(seeds):
        want_image, want_mask = reference_rescale_crop(image, mask, seed, scale, ratios, crop)
        for tf in (step, two_steps):
            tf.set_random_seed(seed)
            out = tf(image=image, mask=mask)
            assert out["image"].shape == want_image.shape, seed
            assert np.array_equal(out["image"], want_image), seed
            assert np.array_equal(out["mask"], want_mask), seed


def test_resize_window_equals_the_crop_of_the_full_resize():
    rng = np.random.default_rng(0)
    pyrng = random.Random(0)
    for _ in range(150):
        in_h, in_w = pyrng.randint(8, 300), pyrng.randint(8, 300)
        h, w = (
            pyrng.choice([(in_h * 2, in_w * 2), (in_h // 2 or 1, in_w // 2 or 1)])
            if (pyrng.random() < 0.2)
            else (pyrng.randint(4, 600), pyrng.randint(4, 600))
        )
        image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        y1, x1 = pyrng.randint(0, h - 1), pyrng.randint(0, w - 1)
        box = (x1, y1, pyrng.randint(x1 + 1, w), pyrng.randint(y1 + 1, h))
        for interpolation, data in ((cv2.INTER_LINEAR, image), (cv2.INTER_NEAREST, image[..., 0])):
            full = cv2.resize(data, (w, h), interpolation=interpolation)
            window = resize_window(data, (h, w), box, interpolation)
            assert np.array_equal(window, full[box[1] : box[3], box[0] : box[2]]), (
                in_h,
                in_w,
                h,
                w,
                box,
            )


def test_nearest_indices_are_cv2_nearest():
    rng = np.random.default_rng(1)
    for in_h, in_w, h, w in [(720, 1280, 1440, 2560), (720, 1280, 397, 705), (33, 57, 91, 13)]:
        mask = rng.integers(0, 256, (in_h, in_w), dtype=np.uint8)
        rows, cols = nearest_indices((in_h, in_w), (h, w))
        want = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(mask[np.ix_(rows, cols)], want)


# -- The whole train recipe against a plain reference: every pixel, every draw -----------------


def mmcv_convert(values, alpha=1.0, beta=0.0):
    """mmseg PhotoMetricDistortion.convert: float32 affine map, clip to 0..255, truncate to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def reference_photometric(image, beta=None, alpha=None, contrast_first=True, sat=None, hue=None):
    """PhotoMetricDistortion's arithmetic on whole arrays, no lookup tables: brightness, contrast
    here or last, then saturation and hue in one RGB->HSV->RGB round trip (as the transform does;
    mmseg does one round trip per step, see test_photometric_hsv_round_trip_is_the_fused_one)."""
    if beta is not None:
        image = mmcv_convert(image, beta=beta)
    if alpha is not None and contrast_first:
        image = mmcv_convert(image, alpha=alpha)
    if sat is not None or hue is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        if sat is not None:
            hsv[..., 1] = mmcv_convert(hsv[..., 1], alpha=sat)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0].astype(int) + hue) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if alpha is not None and not contrast_first:
        image = mmcv_convert(image, alpha=alpha)
    return image


def reference_photometric_draws(rnd):
    """The draws, in order, each value only when its 0.5 gate opens (the transform's order)."""
    beta = rnd.uniform(-32, 32) if rnd.random() < 0.5 else None
    contrast_first = rnd.random() < 0.5
    alpha = rnd.uniform(0.5, 1.5) if rnd.random() < 0.5 else None
    sat = rnd.uniform(0.5, 1.5) if rnd.random() < 0.5 else None
    hue = rnd.randint(-18, 18) if rnd.random() < 0.5 else None
    return {"beta": beta, "alpha": alpha, "contrast_first": contrast_first, "sat": sat, "hue": hue}


def reference_train_recipe(image, mask, seed, scale, crop, ratio_range=(0.5, 2.0)):
    """The whole recipe, plainly: resize-then-crop with cat_max_ratio, flip (p=0.5) by numpy
    indexing, the photometric arithmetic without tables, pad at the bottom/right with np.full.
    Every step draws from its own stream seeded with ``seed``; returns them too."""
    streams = {"flip": random.Random(seed), "photometric": random.Random(seed)}
    image, mask = reference_rescale_crop(
        image, mask, seed, scale, ratio_range, crop, streams=streams
    )
    if streams["flip"].random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    image = reference_photometric(image, **reference_photometric_draws(streams["photometric"]))
    padded_image = np.empty((*crop, 3), np.uint8)
    padded_image[...] = FILL
    padded_mask = np.full(crop, 255, np.uint8)
    padded_image[: image.shape[0], : image.shape[1]] = image
    padded_mask[: mask.shape[0], : mask.shape[1]] = mask
    return padded_image, padded_mask, streams


def recipe_pair(shape, seed):
    """Noise image (every value in every channel) and a block label map with ignored blocks and
    a dominant class over a third of it (so that cat_max_ratio re-draws happen)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 20, (shape[0] // 8 + 1, shape[1] // 8 + 1)).astype(np.uint8)
    blocks[blocks == 19] = 255
    blocks[:, : blocks.shape[1] // 3] = 3
    mask = cv2.resize(blocks, shape[::-1], interpolation=cv2.INTER_NEAREST)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8), mask


@pytest.mark.parametrize(
    ("shape", "crop", "seeds"),
    [((720, 1280), (512, 1024), 30), ((96, 192), (80, 160), 150), ((75, 131), (64, 64), 150),
     ((61, 47), (50, 30), 150), ((129, 257), (100, 200), 150), ((33, 301), (32, 97), 100)],
)  # fmt: skip
def test_train_recipe_is_the_plain_reference_pixel_for_pixel(shape, crop, seeds):
    image, mask = recipe_pair(shape, shape[1])
    scale = shape[::-1]
    tf = build_train_transform(scale, (0.5, 2.0), crop, 0.75, 0.5, True, FILL, 255)
    rrc, flip, pmd, _ = tf.transforms
    retried = flipped = 0
    for seed in range(seeds):
        want_image, want_mask, streams = reference_train_recipe(image, mask, seed, scale, crop)
        tf.set_random_seed(seed)
        out = tf(image=image, mask=mask)
        assert out["image"].shape == (*crop, 3) and out["mask"].shape == crop, seed
        assert np.array_equal(out["image"], want_image), seed
        assert np.array_equal(out["mask"], want_mask), seed
        # Every stream drew exactly what the reference drew, no more, no less.
        assert rrc.rescale.py_random.getstate() == streams["ratio"].getstate(), seed
        assert rrc.crop.py_random.getstate() == streams["crop"].getstate(), seed
        assert flip.py_random.getstate() == streams["flip"].getstate(), seed
        assert pmd.py_random.getstate() == streams["photometric"].getstate(), seed
        retried += random.Random(seed).getstate() != streams["crop"].getstate()
        flipped += random.Random(seed).random() < 0.5
    assert 0 < flipped < seeds and retried > 0


def test_photometric_tables_are_the_float_arithmetic_on_every_value():
    # Every value 0..255 in each channel (and many colours), under many draws of the parameters.
    values = np.arange(256, dtype=np.uint8)
    rng = np.random.default_rng(0)
    image = np.stack([np.tile(values, 64), rng.permutation(np.tile(values, 64)),
                      rng.permutation(np.tile(values, 64))], -1).reshape(128, 128, 3)  # fmt: skip
    pmd = PhotoMetricDistortion()
    rnd = random.Random(0)
    for _ in range(300):
        params = reference_photometric_draws(rnd)
        original = image.copy()
        out = pmd.apply(image, **params)
        assert np.array_equal(out, reference_photometric(image, **params)), params
        assert np.array_equal(image, original)  # the input is never written
    # The extremes of every range, where clipping and truncation decide.
    for beta in (-32.0, -0.5, 0.5, 31.999):
        for alpha in (0.5, 0.999, 1.0, 1.5):
            for first in (True, False):
                params = {"beta": beta, "alpha": alpha, "contrast_first": first}
                want = reference_photometric(image, **params)
                assert np.array_equal(pmd.apply(image, **params), want), params
    for sat, hue in ((0.5, -18), (1.5, 18), (1.0, 0), (None, 17), (1.2, None)):
        want = reference_photometric(image, sat=sat, hue=hue)
        assert np.array_equal(pmd.apply(image, sat=sat, hue=hue), want), (sat, hue)


def test_photometric_hsv_round_trip_is_the_fused_one():
    """Saturation and hue share one HSV round trip (the recipe since it was written); mmseg's two
    round trips give other pixels where both apply, so the reference keeps the fused one."""
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = mmcv_convert(hsv[..., 1], alpha=1.3)
    two = cv2.cvtColor(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), cv2.COLOR_RGB2HSV)
    two[..., 0] = (two[..., 0].astype(int) + 7) % 180
    fused = PhotoMetricDistortion().apply(image, sat=1.3, hue=7)
    assert np.array_equal(fused, reference_photometric(image, sat=1.3, hue=7))
    assert not np.array_equal(fused, cv2.cvtColor(two, cv2.COLOR_HSV2RGB))


def test_mask_histogram_counts_every_value():
    rng = np.random.default_rng(0)
    runs = cv2.resize(rng.integers(0, 20, (9, 17)).astype(np.uint8), (300, 200),
                      interpolation=cv2.INTER_NEAREST)  # fmt: skip
    masks = [runs, runs[:, ::-1], runs[3:150:2, 7:290], rng.integers(0, 256, (200, 300)),
             np.full((40, 50), 255), np.zeros((1, 1)), np.zeros((0, 5)), np.arange(256)[None]]  # fmt: skip
    for mask in masks:
        mask = mask.astype(np.uint8)
        want = np.bincount(mask.ravel(), minlength=256)
        got = mask_histogram(mask)
        assert got.dtype == np.int64 and got.shape == (256,)
        assert np.array_equal(got, want), mask.shape


def test_pad_hands_on_a_full_size_pair_and_pads_a_small_one():
    pad = PadIfNeededNoCopy(min_height=4, min_width=6, position="top_left",
                            border_mode=cv2.BORDER_CONSTANT, fill=FILL, fill_mask=255)  # fmt: skip
    image, mask = np.ones((4, 6, 3), np.uint8), np.ones((4, 6), np.uint8)
    out = pad(image=image, mask=mask)
    assert out["image"] is image and out["mask"] is mask
    out = pad(image=image[:3, :5], mask=mask[:3, :5])
    assert (out["image"][:3, :5] == 1).all() and (out["image"][3] == FILL).all()
    assert (out["mask"][:3, :5] == 1).all() and (out["mask"][:, 5] == 255).all()
