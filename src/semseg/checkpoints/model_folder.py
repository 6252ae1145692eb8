"""Model references besides checkpoint files: a model folder and ``hf://<org>/<name>[@<revision>]``.

A model folder is what ``scripts/model_zoo_row.py`` and ``scripts/hub_folder.py`` write, and what a
Hugging Face Hub model repository of this project holds:

    model.safetensors   the inference state dict (tensors only) and, in its metadata, the
                        checkpoint's meta (class names, palette, ...), iteration and precision
    config.yaml         the config that rebuilds the model (model, backbone, dataset, ...)

``hf://org/name[@revision]`` is that folder on the Hub (:mod:`semseg.checkpoints.hub`). Either
loads into the same dict as :func:`semseg.checkpoints.file.load_checkpoint`; nothing but
safetensors and YAML is read, so no code from the folder or the repository runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from semseg.checkpoints.file import FORMAT_VERSION, load_checkpoint
from semseg.checkpoints.hub import HF_SCHEME, download_hub_files
from semseg.errors import CheckpointError
from semseg.files import write_atomically, write_text

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
MODEL_FOLDER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# The checkpoint entries kept in the safetensors metadata (as one JSON string under this key).
METADATA_KEY = "semseg"
METADATA_ENTRIES = ("format_version", "meta", "iteration", "metrics", "precision")
_FOLDER_HINT = (
    "point at a model folder written by scripts/model_zoo_row.py or scripts/hub_folder.py, "
    "or at a checkpoint file"
)


def load_model_checkpoint(
    reference: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The checkpoint dict of ``reference``: a checkpoint file of this project, a model folder or
    ``hf://<org>/<name>[@<revision>]``; every failure is one CheckpointError line naming it."""
    text = str(reference)
    if text.startswith(HF_SCHEME):
        folder = download_hub_files(text, MODEL_FOLDER_FILES)
        return load_model_folder(folder, map_location, label=text)
    if Path(text).is_dir():
        return load_model_folder(Path(text), map_location)
    return load_checkpoint(text, map_location=map_location)


def save_model_folder(
    state: Mapping[str, Any], config: Mapping[str, Any], out_dir: str | os.PathLike
) -> Path:
    """Write ``model.safetensors`` (``state["model"]`` as contiguous CPU tensors, the entries of
    :data:`METADATA_ENTRIES` in its metadata) and ``config.yaml`` (``config``) into ``out_dir``."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    entries = {"format_version": FORMAT_VERSION}
    entries |= {k: state[k] for k in METADATA_ENTRIES if state.get(k) is not None}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(entries)}
    write_atomically(
        out_dir / WEIGHTS_FILE, lambda tmp: _save_safetensors(tensors, tmp, metadata), "weights"
    )
    write_text(out_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(dict(config))), "config")
    return out_dir


def _save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata)
    except SafetensorError as e:  # its writer reports a refused write as text: "(os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from e


def load_model_folder(
    folder: Path, map_location: str | torch.device = "cpu", label: str | None = None
) -> dict[str, Any]:
    """The checkpoint dict of a model folder (module docstring); ``label`` names it in messages."""
    label = label or str(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{label} holds no {WEIGHTS_FILE}: {_FOLDER_HINT}")
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{label} has {WEIGHTS_FILE} but no {CONFIG_FILE}, the config that rebuilds the "
            f"model: {_FOLDER_HINT}"
        )
    tensors, entries = _read_safetensors(weights, label, map_location)
    config = _read_config(folder / CONFIG_FILE, label)
    version = int(entries.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{label} has checkpoint format {version}, newer than this code's {FORMAT_VERSION}: "
            "update the code"
        )
    return {**entries, "format_version": version, "model": tensors, "config": config}


def _read_safetensors(
    path: Path, label: str, map_location: str | torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
            metadata = f.metadata() or {}
        return tensors, json.loads(metadata.get(METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {WEIGHTS_FILE} of {label} ({type(e).__name__}: {e}): the file is damaged "
            "or truncated (download it again)"
        ) from e


def _read_config(path: Path, label: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())  # plain YAML: no tags, no code
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {CONFIG_FILE} of {label}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{CONFIG_FILE} of {label} is not a mapping of config groups")
    return config
