"""The applications' files on a full disk or under a file-size limit, for real (the kernel's ENOSPC
and EFBIG): the evaluation JSON, prediction masks and the model-zoo folder each stop with one line
naming the folder and the reason, and leave only whole files behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import data_overrides, entry_config, fill_up, run_entry, run_python
from PIL import Image

from semseg.apps.predict import run_predict
from semseg.apps.zoo import build_model_zoo_row
from semseg.files import TEMP_SUFFIX, WriteError

NO_SPACE = "No space left on device"


def _no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


EVALUATE = """
from semseg.apps.evaluate import run_evaluate
from semseg.cli import compose
from semseg.files import WriteError
try:
    run_evaluate(compose("evaluate", {overrides!r}))
except WriteError as e:
    print("ERROR", e)
"""


@pytest.mark.slow
def test_evaluation_json_under_a_file_size_limit(checkpoint, toy_root, tmp_path) -> None:
    out = tmp_path / "out"
    overrides = [f"checkpoint={checkpoint}", *data_overrides(toy_root), f"output_dir={out}"]
    proc = run_python(EVALUATE.format(overrides=overrides), limit_bytes=4096)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == (
        f"ERROR cannot write evaluation eval_val.json into {out}: File too large; free space "
        "there or set output_dir=<folder>"
    )
    assert list(out.iterdir()) == []  # no half file, no temporary file


@pytest.mark.slow
def test_evaluation_json_on_a_full_disk_through_evaluate_py(
    checkpoint, toy_root, tmp_path, small_tmpfs
) -> None:
    disk = small_tmpfs(1)
    fill_up(disk, leave_bytes=0)
    proc = run_entry(
        "evaluate.py", f"checkpoint={checkpoint}", *data_overrides(toy_root), f"output_dir={disk}",
        f"hydra.run.dir={tmp_path / 'run'}", check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: cannot write evaluation eval_val.json into {disk}: {NO_SPACE}; free space there "
        "or set output_dir=<folder>\n"
    )
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_predictions_on_a_full_disk(checkpoint, toy_root, small_tmpfs) -> None:
    """The disk fills after a few files: one line naming the folder; every file there is whole."""
    disk = small_tmpfs(1)
    fill_up(disk, leave_bytes=3 * 4096)  # room for about three files (tmpfs counts 4 KiB pages)
    out = disk / "pred"
    cfg = entry_config(
        "predict", f"checkpoint={checkpoint}", *data_overrides(toy_root), f"output_dir={out}"
    )
    with pytest.raises(WriteError) as error:
        run_predict(cfg)
    message = str(error.value)
    assert message.startswith("cannot write ") and message.endswith(f": {NO_SPACE}")
    assert f" into {out}/" in message and "\n" not in message
    written = [p for p in out.rglob("*.png")]
    assert written  # some were written before the disk filled up ...
    for path in written:  # ... and each of them is complete
        with Image.open(path) as image:
            image.load()
    assert _no_temporary_files(out)


@pytest.mark.slow
def test_model_zoo_folder_on_a_full_disk(smoke_run, toy_root, small_tmpfs) -> None:
    """Weights larger than the disk: one line naming the output folder, and no folder at all
    (nor a temporary one) is left."""
    disk = small_tmpfs(8)
    out = disk / "row"
    cfg = entry_config("model_zoo", f"run_dir={smoke_run('bdd100k')}", f"dataset.root={toy_root}",
                       "device=cpu", "progress=false", f"output_dir={out}")  # fmt: skip
    with pytest.raises(WriteError) as error:
        build_model_zoo_row(cfg)
    message = str(error.value)
    assert message.startswith("cannot write ") and message.endswith(f"into {out}: {NO_SPACE}")
    assert list(disk.iterdir()) == []
