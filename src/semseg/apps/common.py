"""What every application does before it predicts: join the process group for its device, load
the model as its training run validated it, and open a split."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from semseg.checkpoints.hub import HF_SCHEME
from semseg.checkpoints.model_folder import load_model_checkpoint
from semseg.data import build_dataset, build_eval_loader, check_dataset_config, eval_scale
from semseg.distributed import DistEnv, destroy, get_rank, init_distributed
from semseg.errors import ConfigError
from semseg.evaluation.inference import inference_recipe
from semseg.models import model_from_checkpoint
from semseg.runtime import (
    CUDA_ONLY_PRECISIONS,
    configure_backends,
    cuda_precision,
    resolve_channels_last,
    resolve_precision,
    use_fp32_math,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[DistEnv]:
    """This process's rank and device, inside the torchrun process group when there is one. The
    group is joined only once ``device`` is resolved (gloo for the CPU, NCCL for CUDA: a
    ``device=cpu`` run on a GPU host gets no NCCL) and left on every exit path."""
    env = init_distributed(device)
    try:
        configure_backends(env.device)
        yield env
    finally:
        destroy()


def output_dir(cfg: DictConfig) -> Path:
    """``output_dir`` if set, else the Hydra run folder (``paths.output_dir``)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    try:
        return Path(cfg.paths.output_dir)
    except Exception as e:  # outside a Hydra run the ${hydra:...} resolver has nothing to say
        raise ConfigError("set output_dir=<folder> (no Hydra run folder to write into)") from e


def is_checkpoint_file(reference: str) -> bool:
    """Whether ``checkpoint=`` names a file (not ``hf://`` or a model folder): only then do
    results go next to it too."""
    return not reference.startswith(HF_SCHEME) and Path(reference).is_file()


# --------------------------------------------------------------------------------------------
# Precision and memory layout: as the checkpoint's run validated, unless told otherwise


def precision_supported(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` runs on ``device`` as the device policy has it: fp32 everywhere;
    CUDA tf32 and fp16, and bf16 on GPUs that run it natively
    (:func:`semseg.runtime.cuda_precision`); the CPU bf16 and fp16 too (emulated, and slower,
    where the CPU lacks them) but not tf32; on MPS only fp32."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        native = cuda_precision(torch.cuda.get_device_capability(device))
        return precision in ("tf32", "fp16") or native == "bf16"
    return device.type == "cpu" and precision not in CUDA_ONLY_PRECISIONS


def inference_precision(
    setting: str, recorded: str | None, device: torch.device
) -> tuple[str, str]:
    """(precision, why). ``auto`` takes the precision the checkpoint's run validated in when this
    device supports it, so that evaluation reproduces the run's number; an explicit setting wins;
    checkpoints that do not record one (older or converted ones) get this device's default."""
    if setting != "auto":
        return resolve_precision(setting, device), f"inference.precision={setting}"
    if recorded is None:
        return resolve_precision("auto", device), "auto: this device's default"
    if precision_supported(recorded, device):
        return recorded, "auto: the precision its training run validated in"
    chosen = resolve_precision("auto", device)
    return (
        chosen,
        f"auto: its run's {recorded} does not run on {device.type}: this device's default",
    )


def inference_layout(
    setting: str | bool, config: Mapping[str, Any], device: torch.device, precision: str
) -> tuple[bool, str]:
    """(channels_last, why). ``auto`` follows the run's ``trainer.channels_last`` (the layout
    changes the rounding of reduced-precision convolutions), else this device's default."""
    run_setting = (config.get("trainer") or {}).get("channels_last")
    if str(setting).lower() == "auto" and run_setting is not None:
        chosen = resolve_channels_last(run_setting, device, precision)
        return chosen, f"its run's trainer.channels_last={run_setting}"
    return resolve_channels_last(setting, device, precision), f"inference.channels_last={setting}"


# --------------------------------------------------------------------------------------------
# The model and the data


@dataclass
class InferenceModel:
    """A checkpoint loaded for inference, and how to run it."""

    model: nn.Module  # eval mode, on ``device``, in its memory layout
    state: dict[str, Any]  # the checkpoint's entries (weights, config, meta, precision, ...)
    meta: dict[str, Any]  # class names, palette, ...
    dataset_cfg: DictConfig  # what to read with: cfg.dataset, at the run's evaluation scale
    device: torch.device
    precision: str
    inference: dict[str, Any]  # mode, crop_size, stride, flip, scales: the recipe's, key by key

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.state.get("config") or {})

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])


def load_inference_model(
    cfg: DictConfig, device: torch.device, state: Mapping[str, Any] | None = None
) -> InferenceModel:
    """The checkpoint ``cfg.checkpoint`` (a file, model folder or hf://; ``state`` if already
    loaded) ready to predict ``cfg.dataset`` by the recipe it records (its training run's
    validation, or the zoo row's test): its evaluation scale (an explicit
    ``dataset.test_pipeline.scale`` wins), inference mode, windows, stride and TTA (each
    ``inference.*`` key given wins: :func:`~semseg.evaluation.inference.inference_recipe`),
    precision and memory layout (explicit ``inference.precision`` / ``inference.channels_last``
    win). The log says which recipe is used and where each part came from."""
    check_dataset_config(cfg.dataset)
    source = str(cfg.checkpoint)
    state = dict(state) if state is not None else load_model_checkpoint(source)
    model, meta, config = model_from_checkpoint(state, source=source)
    num_classes = int(meta["num_classes"])
    dataset_cfg = _dataset_for(cfg.dataset, config, meta, source)
    if "num_classes" in dataset_cfg and int(dataset_cfg.num_classes) != num_classes:
        raise ConfigError(
            f"checkpoint {source} predicts {num_classes} classes but "
            f"dataset.num_classes={dataset_cfg.num_classes}: pick the dataset it was trained on"
        )
    run_scale = eval_scale(config["dataset"]) if config.get("dataset") else None
    scale_source = "dataset.test_pipeline.scale"
    if OmegaConf.select(dataset_cfg, "test_pipeline.scale") is None:
        scale_source = "the dataset config's training scale"
        if run_scale is not None:
            dataset_cfg.test_pipeline = {"scale": run_scale}
            scale_source = "checkpoint"
    given = OmegaConf.to_container(cfg.inference, resolve=True)
    inference, sources = inference_recipe(given, config.get("inference"))
    precision, why = inference_precision(
        cfg.inference.get("precision", "auto"), state.get("precision"), device
    )
    channels_last, why_layout = inference_layout(
        cfg.inference.get("channels_last", "auto"), config, device, precision
    )
    if get_rank() == 0:
        parts = [f"{k}={v} ({sources[k]})" for k, v in inference.items()]
        scale = eval_scale(dataset_cfg)
        parts.append(
            f"test scale {'x'.join(map(str, scale)) if scale else 'native'} ({scale_source})"
        )
        align = (config.get("model") or {}).get("align_corners")
        if align is not None:
            parts.append(f"model.align_corners={align} (checkpoint)")
        log.info("inference recipe of %s: %s", source, ", ".join(parts))
        log.info(
            "inference on %s in %s (%s), %s memory layout (%s)",
            device, precision, why, "channels_last" if channels_last else "NCHW", why_layout,
        )  # fmt: skip
    use_fp32_math(device, precision)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout).eval()
    return InferenceModel(model, state, meta, dataset_cfg, device, precision, inference)


# The keys of the command's dataset config that say where the images are, not what they hold.
_LOCATION_KEYS = ("root", "split")


def _dataset_for(
    given: DictConfig, config: Mapping[str, Any], meta: Mapping[str, Any], source: str
) -> DictConfig:
    """The dataset config to predict and score with: ``given`` (``dataset=...``), unless the
    checkpoint predicts another number of classes, which ``given`` cannot score, and records the
    dataset config of its own classes (a converted drivable zoo file, a drivable run, with the
    default ``dataset=bdd100k``): then that one (its classes, metric and submission format), with
    ``given``'s root and split. As many classes under other names stay a one-line error
    (:func:`check_classes`): cross-dataset evaluation is the user's explicit choice."""
    resolved = OmegaConf.create(OmegaConf.to_container(given, resolve=True))
    recorded = config.get("dataset") or {}
    names = list(meta.get("class_names") or [])
    if (
        len(resolved.get("class_names") or []) == len(names)
        or list(recorded.get("class_names") or []) != names
    ):
        return resolved
    dataset = OmegaConf.create(dict(recorded))
    for key in _LOCATION_KEYS:
        if resolved.get(key) is not None:
            dataset[key] = resolved[key]
    if get_rank() == 0:
        log.info(
            "dataset: %s, the checkpoint's (%s predicts %s, not the classes of dataset=%s)",
            dataset.get("name"), source, ", ".join(names), resolved.get("name"),
        )  # fmt: skip
    return dataset


def ignored_class(meta: Mapping[str, Any], dataset_cfg: Mapping[str, Any]) -> str | None:
    """The toolkit's "ignored" class to score with: the checkpoint's, else the dataset's (a
    converted checkpoint may carry none; the classes were checked to be the dataset's)."""
    return meta.get("toolkit_ignored_class") or dataset_cfg.get("toolkit_ignored_class")


def check_classes(dataset_cfg: DictConfig, checkpoint: str, trained: list[str]) -> None:
    """Stop with one line listing how the checkpoint's classes differ from the dataset's."""
    wanted = list(dataset_cfg.class_names)
    if trained == wanted:
        return
    differences = [
        f"{i}: {a!r} (checkpoint) vs {b!r} (dataset)"
        for i, (a, b) in enumerate(zip(trained, wanted, strict=True))
        if a != b
    ]
    raise ConfigError(
        f"checkpoint {checkpoint} was trained on other classes than "
        f"dataset={dataset_cfg.get('name')}: class {'; '.join(differences)}. Evaluate on a "
        "dataset with the checkpoint's classes (same names, same order)"
    )


def batch_size(cfg: DictConfig, dataset_cfg: DictConfig) -> int:
    """``inference.batch_size``, else the dataset's ``eval_batch_size``."""
    return int(cfg.inference.get("batch_size") or dataset_cfg.get("eval_batch_size", 1))


def split_loader(dataset_cfg: DictConfig, split: str, size: int, env: DistEnv) -> DataLoader:
    """The eval loader of ``split`` (this rank's share of it); a missing or empty split is a
    one-line DatasetError."""
    return eval_loader(build_dataset(dataset_cfg, split, train=False), dataset_cfg, size, env)


def eval_loader(dataset: Dataset, dataset_cfg: DictConfig, size: int, env: DistEnv) -> DataLoader:
    """This rank's share of ``dataset`` in batches of ``size``, pinned for a CUDA device only (on
    a GPU host, pinning for a CPU run would create a CUDA context for nothing)."""
    # No more workers than batches: a folder of three images needs no four processes.
    batches = -(-len(dataset) // size)
    num_workers = min(int(dataset_cfg.get("num_workers", 0)), batches)
    pin = env.device.type == "cuda"
    return build_eval_loader(dataset, size, num_workers, env.rank, env.world_size, pin)
