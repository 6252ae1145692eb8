"""Full disks and file-size limits for real (the kernel's ENOSPC / EFBIG, not a patched library):
every write fails in one line naming the folder and the reason, and nothing is lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import fill_up, run_python

from semseg.files import WriteError, write_atomically, write_json
from semseg.models.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint

MB = 2**20

# In a subprocess: save a ~8 MB checkpoint over last.pt (and copy over it), print what happened.
SAVE_BIG = """
import sys, torch
from semseg.models.checkpoint import copy_checkpoint, save_checkpoint
from semseg.files import WriteError
folder = sys.argv[1] if len(sys.argv) > 1 else {folder!r}
big = {{"model": {{"w": torch.randn(2 * 2**20)}}, "iteration": 3}}
for write in (lambda: save_checkpoint(big, folder + "/last.pt"),
              lambda: copy_checkpoint(folder + "/big.pt", folder + "/last.pt")):
    try:
        write()
        print("WROTE")
    except WriteError as e:
        print("ERROR", e)
"""


def _assert_one_line_and_intact(out: str, folder: Path, reason: str) -> None:
    lines = [ln for ln in out.splitlines() if ln]
    assert len(lines) == 2, out
    for line in lines:
        assert line.startswith("ERROR cannot write checkpoint last.pt into "), line
        assert str(folder) in line and reason in line and "trainer.resume=auto" in line
    assert load_checkpoint(folder / "last.pt")["iteration"] == 1  # the previous one, loadable
    assert sorted(p.name for p in folder.iterdir() if p.name != "filler") == ["big.pt", "last.pt"]


def _previous_checkpoints(folder: Path) -> None:
    save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 1}, folder / "last.pt")
    save_checkpoint({"model": {"w": torch.randn(2 * 2**20)}, "iteration": 2}, folder / "big.pt")


def test_file_size_limit_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    _previous_checkpoints(tmp_path)
    proc = run_python(SAVE_BIG.format(folder=str(tmp_path)), limit_bytes=1 * MB)
    assert proc.returncode == 0, proc.stderr
    _assert_one_line_and_intact(proc.stdout, tmp_path, "File too large")


def test_full_disk_leaves_the_previous_checkpoint(small_tmpfs) -> None:
    disk = small_tmpfs(32)
    _previous_checkpoints(disk)
    fill_up(disk, leave_bytes=2 * MB)
    proc = run_python(SAVE_BIG.format(folder=str(disk)))
    assert proc.returncode == 0, proc.stderr
    _assert_one_line_and_intact(proc.stdout, disk, "No space left on device")


def test_full_disk_in_process_names_the_folder(small_tmpfs) -> None:
    disk = small_tmpfs(4)
    write_json(disk / "small.json", {"a": 1})
    with pytest.raises(WriteError) as e:
        write_atomically(disk / "big.bin", lambda tmp: tmp.write_bytes(b"\0" * 8 * MB), "blob")
    assert str(e.value) == f"cannot write blob big.bin into {disk}: No space left on device"
    assert sorted(p.name for p in disk.iterdir()) == ["small.json"]  # no temporary file


def test_a_full_disk_never_hides_other_errors(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        write_atomically(tmp_path / "x", lambda tmp: 1 / 0)
    assert list(tmp_path.iterdir()) == []
    save_checkpoint({"model": {}}, tmp_path / "a.pt")
    copy_checkpoint(tmp_path / "a.pt", tmp_path / "b.pt")
    assert load_checkpoint(tmp_path / "b.pt")["model"] == {}
