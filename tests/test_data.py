"""Dataset (layout, RLE labels, every bad-input case) and loaders (exact resume, sharding)."""

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from semseg.data import (
    BDD100KDataset,
    DatasetError,
    build_dataset,
    build_eval_loader,
    build_train_loader,
    make_toy_bdd100k,
)
from semseg.data.base import chw_tensor, invalid_values, read_rgb
from semseg.data.loader import InfiniteSeededSampler

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "bdd100k.yaml"
IMG, MASK = "images/10k", "labels/sem_seg/masks"


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "bdd100k"
    return make_toy_bdd100k(root, 10, 5, 2, height=64, width=128, seed=1, progress=False)


@pytest.fixture(scope="session")
def cfg(toy_root):
    cfg = OmegaConf.load(CONFIG)
    cfg.root = str(toy_root)
    cfg.train_pipeline.scale = [128, 64]
    cfg.train_pipeline.crop_size = [48, 64]
    return cfg


@pytest.fixture
def copy_root(toy_root, tmp_path) -> Path:
    root = tmp_path / "bdd100k"
    shutil.copytree(toy_root, root)
    return root


def first(root: Path, split: str, sub: str, ext: str) -> Path:
    return sorted((root / sub / split).glob(f"*.{ext}"))[0]


def test_items_have_the_contract_types(toy_root):
    ds = BDD100KDataset(toy_root, "train")
    assert len(ds) == 10 and ds.has_labels
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 128)
    assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (64, 128)
    assert item["name"] == first(toy_root, "train", IMG, "jpg").stem
    png = cv2.imread(str(first(toy_root, "train", MASK, "png")), cv2.IMREAD_UNCHANGED)
    assert (item["mask"].numpy() == png).all()
    bgr = cv2.imread(str(first(toy_root, "train", IMG, "jpg")))
    assert (item["image"].permute(1, 2, 0).numpy() == bgr[..., ::-1]).all()  # RGB


def test_test_split_has_no_masks(toy_root):
    ds = BDD100KDataset(toy_root, "test")
    assert len(ds) == 2 and not ds.has_labels and "mask" not in ds[0]


@pytest.mark.parametrize("split", ["train", "val"])
def test_rle_labels_equal_png_masks(toy_root, split):
    names = OmegaConf.load(CONFIG).class_names
    png = BDD100KDataset(toy_root, split)
    rle = BDD100KDataset(toy_root, split, labels="rles", class_names=list(names))
    assert png.names == rle.names
    for i in range(len(png)):
        assert torch.equal(png[i]["mask"], rle[i]["mask"])


def test_build_dataset_train_and_eval(cfg):
    train = build_dataset(cfg, "train", train=True)
    item = train[(3, 1234)]
    assert item["image"].shape == (3, 48, 64) and item["mask"].shape == (48, 64)
    assert torch.equal(train[(3, 1234)]["image"], item["image"])  # seeded augmentation
    val = build_dataset(cfg, "val", train=False)
    assert val[0]["image"].shape == (3, 64, 128)
    rles = build_dataset(OmegaConf.merge(cfg, {"labels": "rles"}), "val", train=False)
    assert torch.equal(rles[1]["mask"], val[1]["mask"])


# ---------------------------------------------------------------- bad input


def test_missing_root_names_it_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere.*dataset\.root.*experiment=quickstart"):
        BDD100KDataset(tmp_path / "nowhere", "train")


def test_missing_split_folder(toy_root):
    with pytest.raises(DatasetError, match=r"images/10k/nosplit.*dataset\.root"):
        BDD100KDataset(toy_root, "nosplit")


def test_image_without_mask_and_reverse(copy_root):
    gone = first(copy_root, "train", MASK, "png")
    gone.unlink()
    with pytest.raises(DatasetError, match=gone.stem + r".*dataset\.strict=false"):
        BDD100KDataset(copy_root, "train")
    orphan = copy_root / MASK / "train" / "orphan.png"
    cv2.imwrite(str(orphan), np.zeros((64, 128), np.uint8))
    with pytest.raises(DatasetError, match="orphan"):
        BDD100KDataset(copy_root, "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = BDD100KDataset(copy_root, "train", strict=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "1 images" in messages[0] and "1 labels" in messages[0]
    assert len(ds) == 9 and gone.stem not in ds.names


def test_truncated_and_unreadable_images(copy_root):
    path = first(copy_root, "train", IMG, "jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = BDD100KDataset(copy_root, "train")  # pairing only: nothing is read upfront
    with pytest.raises(DatasetError, match=rf"{path.name}.*truncated"):
        ds[0]
    path.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(DatasetError, match=rf"{path.name}.*not a readable image"):
        ds[0]


def test_mask_values_outside_classes(copy_root):
    path = first(copy_root, "train", MASK, "png")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    mask[0, 0], mask[0, 1] = 19, 200
    cv2.imwrite(str(path), mask)
    with pytest.raises(DatasetError, match=rf"{path.name}.*\[19, 200\]"):
        BDD100KDataset(copy_root, "train")[0]


def test_mask_size_mismatch_and_rgb_mask(copy_root):
    path = first(copy_root, "train", MASK, "png")
    cv2.imwrite(str(path), np.zeros((32, 128), np.uint8))
    ds = BDD100KDataset(copy_root, "train")
    with pytest.raises(DatasetError, match=rf"{path.name} is 128x32 but its image is 128x64"):
        ds[0]
    cv2.imwrite(str(path), np.zeros((64, 128, 3), np.uint8))
    with pytest.raises(DatasetError, match=rf"{path.name}.*colormaps"):
        ds[0]


def test_rle_file_missing_and_train_without_labels(copy_root, cfg):
    (copy_root / "labels/sem_seg/rles/sem_seg_train.json").unlink()
    with pytest.raises(DatasetError, match=r"sem_seg_train\.json.*dataset\.labels=masks"):
        BDD100KDataset(copy_root, "train", labels="rles", class_names=["road"])
    shutil.rmtree(copy_root / MASK / "train")
    with pytest.raises(DatasetError, match=r"masks/train is missing"):
        build_dataset(OmegaConf.merge(cfg, {"root": str(copy_root)}), "train", train=True)


# ---------------------------------------------------------------- loaders


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(
        x["name"] == y["name"]
        and torch.equal(x["image"], y["image"])
        and torch.equal(x["mask"], y["mask"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def train_set(cfg):
    return build_dataset(cfg, "train", train=True)


def test_train_loader_is_deterministic_and_resumes_exactly(train_set):
    # 10 images, batch 3: 7 batches cross two epoch boundaries.
    full = take(build_train_loader(train_set, 3, 0, seed=7), 7)
    assert full[0]["image"].shape == (3, 3, 48, 64) and len(full[0]["name"]) == 3
    assert same(full, take(build_train_loader(train_set, 3, 0, seed=7), 7))
    assert not same(full[:1], take(build_train_loader(train_set, 3, 0, seed=8), 1))
    for workers in (0, 2):
        resumed = take(build_train_loader(train_set, 3, workers, seed=7, start_batch=4), 3)
        assert same(full[4:], resumed)


def test_same_image_in_a_later_epoch_is_augmented_differently(train_set):
    epoch0, epoch1 = (InfiniteSeededSampler(10, 7).epoch_order(e) for e in (0, 1))
    idx, seed0 = epoch0[0]
    seed1 = next(s for i, s in epoch1 if i == idx)
    assert seed0 != seed1
    assert not torch.equal(train_set[(idx, seed0)]["image"], train_set[(idx, seed1)]["image"])


def test_train_sampler_shards_ranks_like_distributed_sampler():
    ranks = [InfiniteSeededSampler(10, 3, rank=r, world_size=3).epoch_order(0) for r in range(3)]
    indices = [i for order in ranks for i, _ in order]
    assert all(len(order) == 3 for order in ranks)  # drop_last: 10 // 3 each
    assert len(set(indices)) == 9


def test_eval_loader_covers_every_image_once_across_ranks(toy_root):
    ds = BDD100KDataset(toy_root, "val")  # 5 images over 2 ranks
    seen = []
    for rank in range(2):
        names = [n for batch in build_eval_loader(ds, 2, 0, rank, 2) for n in batch["name"]]
        assert names == [n for batch in build_eval_loader(ds, 2, 0, rank, 2) for n in batch["name"]]
        seen += names
    assert sorted(seen) == sorted(ds.names) and len(seen) == 5


def test_rgb_decode_and_chw_planes_are_the_bgr_path_pixels(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    files = {
        "rgb.jpg": noise,
        "rgb.png": noise,
        "gray.png": noise[..., 0],
        "gray.jpg": noise[..., 0],
        "rgba.png": np.dstack([noise, noise[..., :1]]),
    }
    for name, pixels in files.items():
        assert cv2.imwrite(str(tmp_path / name), pixels)
        want = cv2.cvtColor(cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        got = read_rgb(tmp_path / name)
        assert got.shape == want.shape and np.array_equal(got, want), name
        planes = chw_tensor(got[:, ::-1])  # a flipped (non-contiguous) view, as after a flip
        assert planes.is_contiguous() and torch.equal(
            planes, torch.from_numpy(want[:, ::-1].copy()).permute(2, 0, 1)
        )


def test_train_pipeline_builds_from_its_config(cfg):
    dataset = build_dataset(cfg, "train", train=True)
    steps = [type(t).__name__ for t in dataset.transform.transforms]
    assert steps[:2] == ["RandomRescaleCrop", "HorizontalFlip"] and steps[-1] == "PadIfNeededNoCopy"
    assert dataset.transform.transforms[0].size == (48, 64)  # crop_size (h, w) from the config
    assert dataset.transform.transforms[-1].fill == (124, 116, 104)  # the mean, rounded
    bad = OmegaConf.merge(cfg, {"train_pipeline": {"crop_sise": [8, 8]}})
    with pytest.raises(DatasetError, match=r"dataset\.train_pipeline does not build.*crop_sise"):
        build_dataset(bad, "train", train=True)


def test_invalid_values_are_those_neither_class_nor_ignore():
    rng = np.random.default_rng(0)
    for _ in range(400):
        num_classes = int(rng.integers(0, 257))
        ignore = int(rng.choice([255, int(rng.integers(0, 256)), -1]))
        mask = rng.integers(0, 20, (int(rng.integers(1, 30)), int(rng.integers(1, 30))))
        mask = mask.astype(np.uint8)
        if rng.random() < 0.5:
            mask[rng.random(mask.shape) < 0.05] = rng.integers(0, 256)
        valid = np.zeros(256, bool)
        valid[:num_classes] = True
        valid[ignore] = True  # -1: 255, as indexing a table with the ignore index has always done
        want = [v for v in np.unique(mask).tolist() if not valid[v]][:10]
        assert invalid_values(mask[:, ::-1], num_classes, ignore) == want, (num_classes, ignore)
    for num_classes in (0, 1, 19, 254, 255, 256):
        for ignore in (-1, 0, 18, 19, 100, 254, 255):
            valid = np.zeros(256, bool)
            valid[:num_classes] = True
            valid[ignore] = True
            for value in range(256):  # every value alone: the ends of each invalid range
                got = invalid_values(np.full((2, 3), value, np.uint8), num_classes, ignore)
                assert got == ([] if valid[value] else [value]), (num_classes, ignore, value)
