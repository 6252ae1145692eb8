"""Toy generator: exact BDD100K layout, valid values, all classes, determinism."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import load_script
from omegaconf import OmegaConf

from semseg.data.toy import default_classes, ensure_toy_dataset, make_toy_bdd100k

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "a"
    return make_toy_bdd100k(root, 12, 4, 2, height=64, width=128, seed=3, progress=False)


def test_exact_layout(toy):
    files = tree(toy)
    dirs = {str(Path(f).parent) for f in files}
    assert dirs == {
        "images/10k/train", "images/10k/val", "images/10k/test",
        "labels/sem_seg/masks/train", "labels/sem_seg/masks/val",
        "labels/sem_seg/colormaps/train", "labels/sem_seg/colormaps/val",
        "labels/sem_seg/rles",
    }  # fmt: skip
    assert set(Path(f).name for f in files if "rles" in f) == {
        "sem_seg_train.json",
        "sem_seg_val.json",
    }
    for split, n in (("train", 12), ("val", 4), ("test", 2)):
        stems = sorted(p.stem for p in (toy / "images/10k" / split).glob("*.jpg"))
        assert len(stems) == n
        if split != "test":
            for kind in ("masks", "colormaps"):
                assert stems == sorted(
                    p.stem for p in (toy / "labels/sem_seg" / kind / split).glob("*.png")
                )


def test_masks_images_colormaps_and_rles_are_valid(toy):
    names, palette = default_classes()
    lut = np.zeros((256, 3), np.uint8)
    lut[:19] = palette
    seen = np.zeros(256, np.int64)
    for path in sorted((toy / "labels/sem_seg/masks").rglob("*.png")):
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (64, 128)
        seen += np.bincount(mask.ravel(), minlength=256)
        image = cv2.imread(str(toy / "images/10k" / path.parent.name / f"{path.stem}.jpg"))
        assert image.shape == (64, 128, 3)
        colour = cv2.imread(str(toy / "labels/sem_seg/colormaps" / path.parent.name / path.name))
        assert (colour[..., ::-1] == lut[mask]).all()
    values = set(np.flatnonzero(seen).tolist())
    assert values <= set(range(19)) | {255} and 255 in values
    assert len(values - {255}) >= 18  # (nearly) every class in 16 tiny scenes
    frames = json.loads((toy / "labels/sem_seg/rles/sem_seg_val.json").read_text())["frames"]
    assert len(frames) == 4 and frames[0]["name"].endswith(".jpg")
    label = frames[0]["labels"][0]
    assert label["category"] in names
    assert isinstance(label["rle"]["counts"], str) and label["rle"]["size"] == [64, 128]


def test_same_seed_same_bytes_other_seed_differs(toy, tmp_path):
    again = make_toy_bdd100k(tmp_path / "b", 12, 4, 2, height=64, width=128, seed=3, progress=False)
    assert tree(again) == tree(toy)
    other = make_toy_bdd100k(tmp_path / "c", 2, 0, 0, height=64, width=128, seed=4, progress=False)
    first = lambda root: sorted((root / "images/10k/train").glob("*.jpg"))[0].read_bytes()  # noqa: E731
    assert first(other) != first(toy)


def test_ensure_generates_only_when_missing(tmp_path):
    cfg = OmegaConf.create({
        "root": str(tmp_path / "toy"),
        "generate": {"num_train": 2, "num_val": 1, "num_test": 1, "height": 32, "width": 64, "seed": 0},
    })  # fmt: skip
    root = ensure_toy_dataset(cfg)
    assert len(list((root / "images/10k/train").glob("*.jpg"))) == 2
    assert not list(tmp_path.glob("toy.tmp-*"))
    cfg.generate.num_train = 5
    ensure_toy_dataset(cfg)  # present: left alone
    assert len(list((root / "images/10k/train").glob("*.jpg"))) == 2


def toy_cli_args(layout: str, root: Path) -> list[str]:
    return ["--layout", layout, "--root", str(root), "--num-train", "2", "--num-val", "1",
            "--num-test", "1", "--height", "32", "--width", "64"]  # fmt: skip


@pytest.mark.parametrize(
    ("layout", "val_images"),
    [("bdd100k", "images/10k/val/*.jpg"), ("cityscapes", "leftImg8bit/val/*/*_leftImg8bit.png"),
     ("folder", "images/val/*.jpg")],
)  # fmt: skip
def test_cli(tmp_path, monkeypatch, layout, val_images):
    monkeypatch.setattr(sys, "argv", ["make_toy_dataset.py", *toy_cli_args(layout, tmp_path / "t")])
    load_script("make_toy_dataset").main()
    assert len(list((tmp_path / "t").glob(val_images))) == 1


@pytest.mark.slow
def test_cli_entry_point(tmp_path):
    """The script runs as a command (the layouts are checked in this process above)."""
    script = REPO / "scripts/make_toy_dataset.py"
    args = toy_cli_args("folder", tmp_path / "t")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"toy dataset written to {tmp_path / 't'}" in proc.stdout
    assert len(list((tmp_path / "t/images/val").glob("*.jpg"))) == 1
