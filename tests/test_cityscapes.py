"""Cityscapes: the official label table entry by entry, the layout, ignore regions, bad input."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from semseg.data import CityscapesDataset, DatasetError, build_dataset, make_toy_cityscapes
from semseg.data.checker import check_split
from semseg.data.cityscapes import (
    CITYSCAPES_LABELS,
    ID_TO_TRAIN_ID,
    TRAIN_CLASS_NAMES,
    TRAIN_PALETTE,
    label_ids_to_train_ids,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
LABEL_IDS = "_gtFine_labelIds.png"

# From cityscapesScripts' labels.py, written out independently of the package's table:
# the raw id of each train id 0..18; every other id 0..33 is 255; -1 is the license plate.
TRAINED_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@pytest.mark.parametrize("raw_id", range(34))
def test_label_table_maps_every_id(raw_id):
    expected = TRAINED_IDS.index(raw_id) if raw_id in TRAINED_IDS else 255
    assert ID_TO_TRAIN_ID[raw_id] == expected
    entry = next(lb for lb in CITYSCAPES_LABELS if lb.id == raw_id)
    assert entry.train_id == expected


def test_label_table_names_colours_and_unknown_ids():
    names = {lb.id: lb.name for lb in CITYSCAPES_LABELS}
    assert [names[i] for i in (0, 1, 2, 3)] == [
        "unlabeled", "ego vehicle", "rectification border", "out of roi",
    ]  # fmt: skip
    assert names[-1] == "license plate" and len(CITYSCAPES_LABELS) == 35
    assert sorted(names) == [-1, *range(34)]  # ids are unique
    assert TRAIN_CLASS_NAMES[:3] == ("road", "sidewalk", "building")
    assert TRAIN_CLASS_NAMES[16:] == ("train", "motorcycle", "bicycle")
    assert TRAIN_PALETTE[0] == (128, 64, 128) and TRAIN_PALETTE[18] == (119, 11, 32)
    with pytest.raises(DatasetError, match=r"gt\.png has label ids \[34, 200\]"):
        label_ids_to_train_ids(np.array([[7, 34], [200, 1]], np.uint8), "gt.png")


@pytest.mark.parametrize("name", ["bdd100k", "cityscapes", "toy_folder"])
def test_configs_carry_the_official_19_classes(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert list(cfg.class_names) == list(TRAIN_CLASS_NAMES)
    assert [tuple(c) for c in cfg.palette] == list(TRAIN_PALETTE)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cs") / "cityscapes"
    return make_toy_cityscapes(root, 6, 3, 2, height=64, width=128, seed=2, progress=False)


@pytest.fixture(scope="module")
def cfg(toy):
    cfg = OmegaConf.load(CONF / "cityscapes.yaml")
    cfg.root = str(toy)
    cfg.train_pipeline.scale, cfg.train_pipeline.crop_size = [128, 64], [64, 64]
    return cfg


def test_toy_has_the_official_layout_and_raw_ids(toy):
    images = sorted(toy.glob("leftImg8bit/train/*/*_leftImg8bit.png"))
    labels = sorted(toy.glob(f"gtFine/train/*/*{LABEL_IDS}"))
    assert len(images) == len(labels) == 6
    assert {p.parent.name for p in images} == {"toycity", "toytown"}
    assert len(list(toy.glob("gtFine/train/*/*_gtFine_color.png"))) == 6
    assert (
        len(list(toy.glob("leftImg8bit/test/*/*.png"))) == 2 and not (toy / "gtFine/test").exists()
    )
    seen = set()
    for path in labels:
        seen |= set(np.unique(cv2.imread(str(path), cv2.IMREAD_UNCHANGED)).tolist())
    assert {1, 2, 3} <= seen  # ego vehicle, rectification border, out of roi
    assert seen - set(TRAINED_IDS) - {1, 2, 3}  # other untrained ids (unlabeled, parking, ...)
    assert len(seen & set(TRAINED_IDS)) >= 15 and seen <= set(range(34))


def test_items_are_train_ids_mapped_with_the_table(toy):
    ds = CityscapesDataset(toy, "val", labels="labelIds")
    assert len(ds) == 3 and ds.names[0].startswith("toy") and ds.has_labels
    raw = cv2.imread(str(ds.mask_paths[0]), cv2.IMREAD_UNCHANGED)
    item = ds[0]
    assert item["image"].shape == (3, 64, 128) and item["mask"].shape == (64, 128)
    assert np.array_equal(item["mask"].numpy(), ID_TO_TRAIN_ID[raw])
    assert (item["mask"].numpy()[raw == 26] == 13).all()  # car
    assert not CityscapesDataset(toy, "test").has_labels


def test_label_train_ids_are_preferred_when_present_and_switchable(toy, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(toy, root)
    auto = CityscapesDataset(root, "val")
    assert auto.label_format == "labelIds"
    expected = [auto[i]["mask"] for i in range(len(auto))]
    for path in auto.mask_paths:  # what cityscapesScripts' createTrainIdLabelImgs writes
        train_ids = ID_TO_TRAIN_ID[cv2.imread(str(path), cv2.IMREAD_UNCHANGED)]
        cv2.imwrite(str(path).replace(LABEL_IDS, "_gtFine_labelTrainIds.png"), train_ids)
    auto = CityscapesDataset(root, "val")
    assert auto.label_format == "labelTrainIds"
    assert all(p.name.endswith("_gtFine_labelTrainIds.png") for p in auto.mask_paths)
    assert all(torch.equal(auto[i]["mask"], m) for i, m in enumerate(expected))
    forced = CityscapesDataset(root, "val", labels="labelIds")
    assert all(p.name.endswith(LABEL_IDS) for p in forced.mask_paths)
    with pytest.raises(DatasetError, match=r"dataset\.labels='masks'.*labelTrainIds"):
        CityscapesDataset(root, "val", labels="masks")


def test_ignore_regions_are_never_learned(cfg):
    """Ego vehicle, border and out-of-ROI pixels are 255 after mapping and augmentation, and the
    training loss gives them no gradient."""
    from hydra.utils import instantiate

    from semseg.cli import compose

    run = compose("train", ["dataset=cityscapes"])
    loss_fn = instantiate(run.loss if "loss" in run else run.trainer.loss)  # the run's loss
    ds = build_dataset(cfg, "train", train=False)
    raw = cv2.imread(str(ds.mask_paths[0]), cv2.IMREAD_UNCHANGED)
    mask = ds[0]["mask"].numpy()
    regions = np.isin(raw, [1, 2, 3])
    assert regions.sum() > 100 and (mask[regions] == 255).all()
    train = build_dataset(cfg, "train", train=True)
    batch = [train[(i, 7)] for i in range(len(train))]
    target = torch.stack([b["mask"] for b in batch]).long()
    assert (target == 255).any() and (target < 19).any()
    logits = torch.randn(len(batch), 19, *target.shape[-2:], requires_grad=True)
    loss_fn(logits, target).backward()
    grad = logits.grad.abs().sum(1)
    assert (grad[target == 255] == 0).all() and (grad[target != 255] > 0).all()


def test_missing_folders_name_the_layout(toy, tmp_path):
    for sub in ("leftImg8bit", "gtFine"):
        root = tmp_path / sub
        shutil.copytree(toy, root)
        shutil.rmtree(root / sub)
        with pytest.raises(DatasetError, match=rf"{root} has no {sub}/ folder: expected <root>/"):
            CityscapesDataset(root, "train")
    with pytest.raises(DatasetError, match=r"leftImg8bit/nosplit does not exist"):
        CityscapesDataset(toy, "nosplit")


def test_label_id_outside_the_table_names_the_file(toy, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(toy, root)
    ds = CityscapesDataset(root, "train")
    path = ds.mask_paths[1]
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    raw[5, 5] = 40
    cv2.imwrite(str(path), raw)
    with pytest.raises(DatasetError, match=rf"{path.name} has label ids \[40\] that are not in"):
        ds[1]
    report = check_split(root, "train", layout=CityscapesDataset)
    assert not report.usable and len(report.bad_values) == 1 and path.name in report.bad_values[0]
    assert check_split(toy, "train", layout=CityscapesDataset).usable


def test_unpaired_files_get_the_shared_diagnostics(toy, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(toy, root)
    gone = sorted(root.glob(f"gtFine/train/*/*{LABEL_IDS}"))[0]
    gone.unlink()
    name = gone.name.removesuffix(LABEL_IDS)
    with pytest.raises(DatasetError, match=rf"1 images in .*{name}.*dataset\.strict=false"):
        CityscapesDataset(root, "train")
