"""Checkpoints under attack and under stress: pickled code payloads are refused in one line, a full
disk leaves the previous checkpoint intact, a damaged last.pt falls back to an iter_*.pt."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import compose_smoke, fill_up, run_entry

from semseg.checkpoints.file import load_checkpoint, save_checkpoint
from semseg.checkpoints.run_folder import CHECKPOINT_DIR, load_latest_checkpoint
from semseg.engine.trainer import Trainer
from semseg.errors import CheckpointError
from semseg.models import TimmBackbone, WeightsError, model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this object opens (creates) ``marker``: any code would run the same way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def assert_refusal_line(message: str, label: str) -> None:
    assert "\n" not in message and "\x1b" not in message
    assert message.startswith(f"{label} holds pickled objects")
    assert "not loaded, because loading them could run code" in message
    assert "weights_only" not in message


@pytest.fixture
def evil(tmp_path: Path) -> Path:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": Payload(tmp_path / "marker")}, path)
    return path


def test_pickle_payload_is_refused_in_one_line(evil: Path) -> None:
    for load in (load_checkpoint, model_from_checkpoint):
        with pytest.raises(CheckpointError) as e:
            load(evil)
        assert_refusal_line(str(e.value), str(evil))
        assert "io.open" in str(e.value)
        assert "convert_mmseg_checkpoint" not in str(e.value)  # not an mmseg file
    assert not (evil.parent / "marker").exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert (evil.parent / "marker").exists()


def test_old_format_payload_and_garbage_are_one_line_without_running_code(tmp_path: Path) -> None:
    old = tmp_path / "old_format.pt"
    torch.save({"model": {}, "payload": Payload(tmp_path / "marker")}, old,
               _use_new_zipfile_serialization=False)  # fmt: skip
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    for path in (old, garbage):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        message = str(e.value)
        assert message.startswith(f"cannot read checkpoint {path}") and "could run code" in message
        assert "\n" not in message and "weights_only" not in message
    assert not (tmp_path / "marker").exists()


def test_pickled_backbone_weights_are_refused_not_misfit(evil: Path) -> None:
    pth = evil.with_suffix(".pth")
    evil.rename(pth)
    with pytest.raises(WeightsError) as e:
        TimmBackbone("resnet18", pretrained=True, weights=pth)
    assert_refusal_line(str(e.value), f"backbone.weights={pth}")
    assert "does not fit" not in str(e.value)
    assert not (pth.parent / "marker").exists()


@pytest.fixture
def mmengine_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An mmseg 1.x-style checkpoint: the state dict plus an mmengine object in its meta."""
    from helpers import mmseg_fpn_r50_v1c

    module = types.ModuleType("mmengine.logging")

    class HistoryBuffer:  # stands for mmengine's logging class: harmless, but still a pickle
        pass

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = "mmengine.logging", "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    monkeypatch.setitem(sys.modules, "mmengine", types.ModuleType("mmengine"))
    monkeypatch.setitem(sys.modules, "mmengine.logging", module)
    path = tmp_path / "fpn_r50_mmseg1x.pth"
    torch.save({"meta": {"log": HistoryBuffer()}, "state_dict": mmseg_fpn_r50_v1c()}, path)
    return path


def test_mmseg_checkpoint_points_at_the_converter(mmengine_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(mmengine_checkpoint)
    assert_refusal_line(str(e.value), str(mmengine_checkpoint))
    assert "mmengine.logging.HistoryBuffer" in str(e.value)
    assert str(e.value).endswith("scripts/convert_mmseg_checkpoint.py --trust-pickle")


def test_plain_mmseg_checkpoint_points_at_the_converter(tmp_path: Path) -> None:
    path = tmp_path / "fpn_r50_mmseg0x.pth"
    torch.save({"meta": {"CLASSES": ["road"]}, "state_dict": {"w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match=r"mmseg checkpoint .*convert_mmseg_checkpoint\.py"):
        load_checkpoint(path)


@pytest.mark.slow
def test_converter_refuses_in_one_line_and_trust_pickle_converts(
    mmengine_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = importlib.util.spec_from_file_location(
        "convert_mmseg_checkpoint", REPO / "scripts" / "convert_mmseg_checkpoint.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "converted.pt"
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(mmengine_checkpoint), str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert_refusal_line(err.removeprefix("error: ").strip(), str(mmengine_checkpoint))
    assert err.strip().endswith("if you trust its source, rerun with --trust-pickle")
    assert not out.exists()
    assert script.main([str(mmengine_checkpoint), str(out), "--trust-pickle"]) == 0
    assert load_checkpoint(out)["config"]["backbone"]["name"] == "resnet50c"


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated"])
def test_damaged_last_falls_back_to_newest_loadable_iter(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt_dir = tmp_path / CHECKPOINT_DIR
    for it in (2, 4, 6):
        save_checkpoint({"model": {"w": torch.full((64,), it)}, "iteration": it},
                        ckpt_dir / f"iter_{it:06d}.pt")  # fmt: skip
    (ckpt_dir / "iter_000006.pt").write_bytes(b"")  # the newest iter is damaged too
    last = ckpt_dir / "last.pt"
    data = (ckpt_dir / "iter_000004.pt").read_bytes()
    last.write_bytes(b"" if damage == "zero_bytes" else data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="semseg.checkpoints.run_folder"):
        path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "iter_000004.pt" and state["iteration"] == 4
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(last) in warning and str(path) in warning and "\n" not in warning


def test_nothing_loadable_is_an_error_naming_last(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_DIR).mkdir()
    (tmp_path / CHECKPOINT_DIR / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        load_latest_checkpoint(tmp_path)
    assert load_latest_checkpoint(tmp_path / "empty") == (None, None)


SMALL_SMOKE = (
    "experiment=smoke", "device=cpu", "trainer.checkpoint_interval=1", "trainer.keep_last=5",
    "trainer.precision=fp32", "trainer.eval_at_end=false", "model.neck.out_channels=32",
    "model.decode_head.channels=16",
)  # fmt: skip


def smoke_config(toy_root: Path, run_dir: Path, *overrides: str):
    return compose_smoke(toy_root, run_dir, *SMALL_SMOKE[1:], "schedule.max_iters=2", *overrides)


def _resume_cannot_write(toy_root: Path, run_dir: Path, reason: str, **limits) -> None:
    """A resumed run whose checkpoints cannot be written: exit 2, one line, nothing lost."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    proc = run_entry(
        "train.py", *SMALL_SMOKE, f"dataset.root={toy_root}", f"hydra.run.dir={run_dir}",
        "schedule.max_iters=2", "trainer.resume=auto", check=False, **limits,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write checkpoint iter_000002.pt into {ckpt_dir}: ")
    assert line.split(": ")[2].startswith(reason)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["iter_000001.pt", "last.pt"]
    assert load_checkpoint(ckpt_dir / "last.pt")["iteration"] == 1


@pytest.mark.slow
def test_trainer_file_size_limit_and_damaged_last(toy_root: Path, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / CHECKPOINT_DIR
    Trainer(smoke_config(toy_root, tmp_path, "schedule.max_iters=1")).fit()
    _resume_cannot_write(toy_root, tmp_path, "File too large", limit_bytes=4 * 2**20)

    (ckpt_dir / "last.pt").write_bytes(b"")  # damaged: the resume falls back to iter_000001.pt
    trainer = Trainer(smoke_config(toy_root, tmp_path, "trainer.resume=auto"))
    assert trainer.state.iteration == 1


@pytest.mark.slow
def test_trainer_full_disk(toy_root: Path, small_tmpfs) -> None:
    disk = small_tmpfs(512)
    run_dir = disk / "run"
    Trainer(smoke_config(toy_root, run_dir, "schedule.max_iters=1")).fit()
    fill_up(disk, leave_bytes=4 * 2**20)
    _resume_cannot_write(toy_root, run_dir, "No space left on device")
