"""Full disks and file-size limits for real (the kernel's ENOSPC / EFBIG, not a patched library):
every write fails in one line naming the folder and the reason, and nothing is lost."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import child_env, fill_up, run_python

from semseg.checkpoints.file import copy_checkpoint, load_checkpoint, save_checkpoint
from semseg.errors import ConfigError
from semseg.files import (
    WriteError,
    restore_interrupted_folder,
    write_atomically,
    write_folder_atomically,
    write_json,
)

MB = 2**20

# In a subprocess: save a ~8 MB checkpoint over last.pt (and copy over it), print what happened.
SAVE_BIG = """
import sys, torch
from semseg.checkpoints.file import copy_checkpoint, save_checkpoint
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


@pytest.mark.slow
def test_file_size_limit_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    _previous_checkpoints(tmp_path)
    proc = run_python(SAVE_BIG.format(folder=str(tmp_path)), limit_bytes=1 * MB)
    assert proc.returncode == 0, proc.stderr
    _assert_one_line_and_intact(proc.stdout, tmp_path, "File too large")


@pytest.mark.slow
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


def _folder(path: Path, text: str) -> Callable[[Path], None]:
    """A ``write`` for write_folder_atomically: one file ``a`` holding ``text``."""
    return lambda tmp: (tmp / "a").write_text(text)


def test_failed_second_rename_keeps_the_old_folder(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "row"
    write_folder_atomically(out, _folder(out, "old"))
    real_replace = os.replace

    def refuse_new(src, dst) -> None:  # the old folder moves aside; the new one is refused
        if Path(src).name.endswith(f".{os.getpid()}.tmp"):
            raise PermissionError(errno.EACCES, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_new)
    with pytest.raises(WriteError) as info:
        write_folder_atomically(out, _folder(out, "new"), "Hub folder", overwrite=True)
    assert str(info.value) == (
        f"cannot move the new Hub folder into place at {out}: Permission denied; "
        "the previous Hub folder is kept there"
    )
    assert (out / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["row"]  # no temporary folder


def test_failed_rollback_keeps_both_and_says_where(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "row"
    write_folder_atomically(out, _folder(out, "old"))
    real_replace = os.replace

    def refuse_into_place(src, dst) -> None:  # only moving aside works
        if Path(dst) == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_into_place)
    with pytest.raises(WriteError, match=r"kept at .*\.old\.tmp and the new one at .*\.new$"):
        write_folder_atomically(out, _folder(out, "new"), overwrite=True)
    texts = sorted((p / "a").read_text() for p in tmp_path.iterdir())
    assert texts == ["new", "old"]
    monkeypatch.undo()
    assert restore_interrupted_folder(out) is not None and (out / "a").read_text() == "old"


# In a subprocess: write the folder again, killed (SIGKILL, by the test's own hook) right after
# the old folder was moved aside, before the new one is renamed into place.
KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from semseg.files import write_folder_atomically
real_replace = os.replace
def replace_then_die(src, dst):
    real_replace(src, dst)
    if Path(dst).name.endswith(".old.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
write_folder_atomically(sys.argv[1], lambda tmp: (tmp / "a").write_text("new"), overwrite=True)
"""


def test_a_kill_between_the_renames_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "row"
    write_folder_atomically(out, _folder(out, "old"))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(out)], env=child_env(), timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the window the kill hit: the old folder is aside
    assert [(p / "a").read_text() for p in tmp_path.glob(".row.*.old.tmp")] == ["old"]
    # The next writer puts the old folder back first: refusing to overwrite it, or failing, or
    # replacing it.
    with pytest.raises(ConfigError, match="exists"):
        write_folder_atomically(out, _folder(out, "newer"))
    assert (out / "a").read_text() == "old"
    write_folder_atomically(out, _folder(out, "newer"), overwrite=True)
    assert (out / "a").read_text() == "newer"
    assert [p.name for p in tmp_path.iterdir()] == ["row"]
