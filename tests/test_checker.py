"""Dataset checker: exit 0 on good data, every problem reported on broken data."""

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import load_script

from semseg.data.checker import check_split
from semseg.data.toy import make_toy_bdd100k

REPO = Path(__file__).resolve().parents[1]
main = load_script("check_dataset").main


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "good"
    return make_toy_bdd100k(root, 6, 3, 2, height=32, width=64, seed=0, progress=False)


def test_good_data_passes(toy, capsys):
    assert main([str(toy)]) == 0
    out = capsys.readouterr().out
    assert "[train] OK: 6 images, 6 masks" in out and "[test] OK: 2 images, 0 masks" in out
    assert "road" in out and "%" in out and "dataset usable" in out
    report = check_split(toy, "val")
    assert report.usable and report.class_pixels.sum() == 3 * 32 * 64


@pytest.mark.slow
def test_script_entry_point(toy):
    res = subprocess.run([sys.executable, str(REPO / "scripts/check_dataset.py"), str(toy),
                          "--splits", "val"], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0 and "[val] OK" in res.stdout


def test_broken_data_reports_every_problem(toy, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(toy, root)
    images = sorted((root / "images/10k/train").glob("*.jpg"))
    masks = sorted((root / "labels/sem_seg/masks/train").glob("*.png"))
    masks[0].unlink()  # image without mask
    cv2.imwrite(str(masks[0].with_name("orphan.png")), np.zeros((32, 64), np.uint8))
    images[1].write_bytes(images[1].read_bytes()[:200])  # truncated
    bad = cv2.imread(str(masks[2]), cv2.IMREAD_UNCHANGED)
    bad[0, 0] = 42
    cv2.imwrite(str(masks[2]), bad)  # value outside the classes
    cv2.imwrite(str(masks[3]), np.zeros((16, 64), np.uint8))  # size mismatch
    assert main([str(root), "--splits", "train", "val"]) == 1
    out = capsys.readouterr().out
    assert "[train] NOT USABLE" in out and "[val] OK" in out
    for text in ("images without mask: 1", images[0].name, "masks without image: 1", "orphan.png",
                 "unreadable files: 1", images[1].name, "values outside the classes: 1",
                 masks[2].name, "[42]", "size mismatches: 1", masks[3].name, "NOT usable"):  # fmt: skip
        assert text in out, text


def test_missing_split_and_root(toy, tmp_path, capsys):
    assert main([str(toy), "--splits", "nosplit"]) == 1
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "nothing")])
    assert info.value.code == 2
    out = capsys.readouterr()
    assert out.err == f"error: dataset root {tmp_path / 'nothing'} does not exist\n"
    with pytest.raises(SystemExit):
        main([str(toy), "--dataset", "nope"])
    assert capsys.readouterr().err.startswith(
        "error: In 'train': Could not find 'dataset/nope'; Available options in 'dataset': bdd100k, "
    )
    root = tmp_path / "nolabels"
    shutil.copytree(toy, root)
    shutil.rmtree(root / "labels/sem_seg/masks/val")
    report = check_split(root, "val")
    assert not report.usable and report.missing.endswith("masks/val")
