"""Composed configs for tests: the smoke experiment on the toy data, on the CPU; any entry
point's config composed in this process; the device markers."""

from __future__ import annotations

from pathlib import Path

import pytest

# Tests that train run on the CPU whatever the machine has: their numbers are compared bit for bit,
# and a machine with GPUs runs the suite as one without (CUDA tests say so: @needs_cuda).
CPU_PINNED = ("device=cpu",)


def needs_cuda(test):
    """Mark a test of what only a GPU host shows (``-m cuda``; skipped without a GPU)."""
    import torch

    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return skip(pytest.mark.cuda(test))


SMOKE_ITERS = 2  # the fewest iterations that still write last.pt, best.pt and an evaluation


def smoke_overrides(toy_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A seconds-long CPU training run on the tiny dataset, writing into ``run_dir``."""
    return [
        "experiment=smoke",
        *CPU_PINNED,
        f"dataset.root={toy_root}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def compose_smoke(toy_root: Path, run_dir: Path, *overrides: str):
    """The smoke training config (as :func:`smoke_overrides`) composed here, writing into ``run_dir``."""
    from semseg.cli import compose

    cfg = compose(
        "train", ["experiment=smoke", *CPU_PINNED, f"dataset.root={toy_root}", *overrides]
    )
    cfg.paths.output_dir = str(run_dir)  # what Hydra's run folder gives a launched run
    return cfg


def compose_train(*overrides: str):
    """The ``src/train.py`` config with ``overrides``, composed here."""
    from semseg.cli import compose

    return compose("train", overrides)


def entry_config(name: str, *overrides: str):
    """An entry point's config (``conf/<name>.yaml``) composed in this process, with ``overrides``."""
    from semseg.cli import compose

    return compose(name, list(overrides))


def resolved(cfg) -> dict:
    """The whole config resolved (the run folder comes from Hydra at run time: a stand-in)."""
    from omegaconf import OmegaConf

    cfg.paths.output_dir = "/run/folder"
    return OmegaConf.to_container(cfg, resolve=True)


def data_overrides(toy_root: Path, split: str = "val") -> list[str]:
    """evaluate.py / predict.py overrides reading ``split`` of the toy data on the CPU."""
    return ["dataset=toy_bdd100k", f"dataset.root={toy_root}", f"dataset.split={split}",
            "dataset.num_workers=0", "device=cpu"]  # fmt: skip
