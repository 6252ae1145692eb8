"""dataset=folder: a user's own image/mask folders, paired by name, with every bad-input check."""

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import REPO, load_script
from omegaconf import OmegaConf

from semseg.cli import compose
from semseg.data import DatasetError, FolderDataset, build_dataset, make_toy_folder
from semseg.data.build import check_dataset_config

CONF = REPO / "conf" / "dataset"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "mine"
    return make_toy_folder(root, 5, 3, 1, height=32, width=64, seed=4, progress=False)


@pytest.fixture
def copy(toy, tmp_path) -> Path:
    shutil.copytree(toy, tmp_path / "mine")
    return tmp_path / "mine"


def three_class_cfg(root: Path) -> OmegaConf:
    cfg = OmegaConf.load(CONF / "folder.yaml")
    cfg.root, cfg.num_classes = str(root), 3
    cfg.class_names, cfg.palette = (
        ["background", "crack", "rust"],
        [[0, 0, 0], [255, 0, 0], [0, 0, 255]],
    )
    return cfg


def test_pairs_by_name_and_reads_train_ids(toy):
    ds = FolderDataset(toy, "train")
    assert len(ds) == 5 and ds.has_labels and ds.names[0] == "scene_0004_0000"
    item = ds[0]
    png = cv2.imread(str(toy / "masks/train/scene_0004_0000.png"), cv2.IMREAD_UNCHANGED)
    assert torch.equal(item["mask"], torch.from_numpy(png))
    assert item["image"].shape == (3, 32, 64) and item["image"].dtype == torch.uint8
    assert not FolderDataset(toy, "test").has_labels


def test_own_classes_folders_and_suffixes(tmp_path):
    """Three classes from the config, other folder names, PNG images with suffixes."""
    for split in ("train", "val"):
        for i in range(2):
            (tmp_path / "rgb" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "ann" / split).mkdir(parents=True, exist_ok=True)
            image = np.full((16, 24, 3), 40 * i, np.uint8)
            mask = np.array([[0, 1, 2, 255] * 6] * 16, np.uint8)
            cv2.imwrite(str(tmp_path / "rgb" / split / f"p{i}_rgb.png"), image)
            cv2.imwrite(str(tmp_path / "ann" / split / f"p{i}_label.png"), mask)
            cv2.imwrite(str(tmp_path / "ann" / split / f"p{i}_preview.png"), image)  # not a label
    cfg = three_class_cfg(tmp_path)
    cfg.layout.update(image_dir="rgb", mask_dir="ann", image_suffixes=["_rgb.png"],
                      mask_suffix="_label.png")  # fmt: skip
    cfg.train_pipeline.update(scale=[24, 16], crop_size=[16, 16])
    val = build_dataset(cfg, "val", train=False)
    assert val.names == ["p0", "p1"] and val[1]["mask"][0, :4].tolist() == [0, 1, 2, 255]
    train = build_dataset(cfg, "train", train=True)
    assert train[(0, 3)]["mask"].shape == (16, 16)
    cfg.num_classes = 2
    cfg.class_names, cfg.palette = ["background", "crack"], [[0, 0, 0], [255, 0, 0]]
    with pytest.raises(DatasetError, match=r"p0_label\.png has values \[2\] outside 0\.\.1"):
        build_dataset(cfg, "val", train=False)[0]


def test_config_must_name_the_classes(tmp_path):
    cfg = OmegaConf.load(CONF / "folder.yaml")
    with pytest.raises(DatasetError, match=r"dataset\.class_names, dataset\.num_classes, "
                       r"dataset\.palette, dataset\.root not set"):  # fmt: skip
        check_dataset_config(cfg)
    cfg = three_class_cfg(tmp_path)
    cfg.palette = [[0, 0, 0]]
    with pytest.raises(
        DatasetError, match=r"dataset\.palette has 1 entries but dataset\.num_classes=3"
    ):
        check_dataset_config(cfg)
    # what train.py stops with when building its datasets (printed as one `error:` line, exit
    # code 2: see test_runtime)
    cfg = compose("train", ["dataset=folder", f"dataset.root={tmp_path}"])
    with pytest.raises(
        DatasetError, match=r"^dataset\.class_names, dataset\.num_classes, dataset\.palette not set"
    ):
        build_dataset(cfg.dataset, cfg.dataset.train_split, train=True)


def test_unpaired_files_get_the_bdd100k_diagnostics(copy):
    gone = copy / "masks/train/scene_0004_0001.png"
    gone.unlink()
    cv2.imwrite(str(copy / "masks/train/orphan.png"), np.zeros((32, 64), np.uint8))
    with pytest.raises(DatasetError, match=r"1 images in .*scene_0004_0001.*1 labels have no image "
                       r"\(e\.g\. \['orphan'\]\).*dataset\.strict=false"):  # fmt: skip
        FolderDataset(copy, "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = FolderDataset(copy, "train", strict=False)
    assert len(caught) == 1 and len(ds) == 4 and "scene_0004_0001" not in ds.names


def test_bad_files_and_missing_folders(copy, capsys):
    with pytest.raises(DatasetError, match=r"images/nosplit does not exist: set dataset\.root"):
        FolderDataset(copy, "nosplit")
    cv2.imwrite(str(copy / "masks/train/scene_0004_0002.png"), np.zeros((16, 64), np.uint8))
    (copy / "images/train/scene_0004_0003.jpg").write_bytes(b"not a jpeg" * 20)
    ds = FolderDataset(copy, "train")
    with pytest.raises(DatasetError, match=r"scene_0004_0002\.png is 64x16 but its image is 64x32"):
        ds[2]
    with pytest.raises(DatasetError, match=r"scene_0004_0003\.jpg is not a readable image"):
        ds[3]
    check = load_script("check_dataset").main
    assert check([str(copy), "--dataset", "toy_folder", "--splits", "train", "val"]) == 1
    out = capsys.readouterr().out
    for text in ("[train] NOT USABLE: 5 images, 5 masks", "unreadable files: 1", "scene_0004_0003.jpg",
                 "size mismatches: 1", "[val] OK", "sidewalk"):  # fmt: skip
        assert text in out, text
