"""Model references besides checkpoint files: a model folder and ``hf://<org>/<name>[@<revision>]``.

A model folder is what ``scripts/model_zoo_row.py`` and ``scripts/hub_folder.py`` write, and what a
Hugging Face Hub model repository of this project holds:

    model.safetensors   the inference state dict (tensors only) and, in its metadata, the
                        checkpoint's meta (class names, palette, ...), iteration and precision
    config.yaml         the config that rebuilds the model (model, backbone, dataset, ...)

``hf://org/name[@revision]`` is that folder on the Hub, fetched into huggingface_hub's cache (with
``HF_HUB_OFFLINE=1``: read from the cache only). Either loads into the same dict as
:func:`semseg.models.checkpoint.load_checkpoint`; nothing but safetensors and YAML is read, so no
code from the folder or the repository runs. A folder without ``model.safetensors`` falls back to
its ``weights.pt`` (model-zoo folders written before safetensors).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from semseg.errors import CheckpointError
from semseg.files import reporting_write_errors, write_atomically, write_text
from semseg.models.checkpoint import FORMAT_VERSION, load_checkpoint

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
LEGACY_WEIGHTS_FILE = "weights.pt"
# The checkpoint entries kept in the safetensors metadata (as one JSON string under this key).
METADATA_KEY = "semseg"
METADATA_ENTRIES = ("format_version", "meta", "iteration", "metrics", "precision")
# One request to the Hub to learn a revision's commit; seconds before it counts as unreachable.
HUB_TIMEOUT_S = 10.0
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
        return load_model_folder(download_hub_model(text), map_location, label=text)
    if Path(text).is_dir():
        return load_model_folder(Path(text), map_location)
    return load_checkpoint(text, map_location=map_location)


# --------------------------------------------------------------------------------------------
# Model folders


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
        if (folder / LEGACY_WEIGHTS_FILE).is_file():
            return load_checkpoint(folder / LEGACY_WEIGHTS_FILE, map_location=map_location)
        raise CheckpointError(
            f"{label} holds no {WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE}): {_FOLDER_HINT}"
        )
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


# --------------------------------------------------------------------------------------------
# The Hugging Face Hub


def parse_hub_reference(reference: str) -> tuple[str, str | None]:
    """``hf://<org>/<name>[@<revision>]`` -> (repo id, revision or None); a malformed one is a
    CheckpointError line."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, _, revision = reference.removeprefix(HF_SCHEME).partition("@")
    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("expected <org>/<name>")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise CheckpointError(
            f"{reference} is not a Hub model reference: write hf://<org>/<name>[@<revision>] ({e})"
        ) from None
    if "@" in reference and not revision:
        raise CheckpointError(f"{reference} names no revision after '@' (a branch, tag or commit)")
    return repo_id, revision or None


def download_hub_model(reference: str) -> Path:
    """The cached snapshot folder of ``hf://org/name[@revision]`` holding its model files.

    Online, one request (at most :data:`HUB_TIMEOUT_S` seconds, no retries) turns the revision
    into its commit, so that a cached commit is not fetched again; a Hub that cannot be reached
    falls back to the cache at once. With ``HF_HUB_OFFLINE=1`` only the cache is read.
    """
    from huggingface_hub import constants

    repo_id, revision = parse_hub_reference(reference)
    offline_reason = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None
    if offline_reason is None:
        revision, offline_reason = _commit_of(reference, repo_id, revision)
    paths = [
        _hub_file(reference, repo_id, revision, name, offline_reason)
        for name in (CONFIG_FILE, WEIGHTS_FILE)
    ]
    return paths[-1].parent


def _commit_of(reference: str, repo_id: str, revision: str | None) -> tuple[str | None, str | None]:
    """(the revision's commit, None), or (``revision``, why the Hub cannot be asked)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{reference}: there is no model repository {repo_id} on the Hugging Face Hub (or it "
            "is private or gated: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{reference}: {repo_id} has no revision {revision!r} (a branch, tag or commit)"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{reference}: the Hugging Face Hub answered {e}") from None
    except Exception as e:  # the HTTP client's transport errors (DNS, refused, timeout, proxy)
        reason = f"the Hub cannot be reached ({type(e).__name__}: {e})"
        log.warning("%s: %s; reading the cache", reference, reason)
        return revision, reason
    files = {s.rfilename for s in info.siblings or []}
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in files]
    if missing:
        raise CheckpointError(
            f"{reference}: {repo_id}@{revision or 'main'} has no {' and no '.join(missing)}: not a "
            "model folder of this project (scripts/model_zoo_row.py, scripts/hub_folder.py)"
        )
    return info.sha, None


def _hub_file(
    reference: str, repo_id: str, revision: str | None, name: str, offline_reason: str | None
) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    cache = Path(constants.HF_HUB_CACHE)
    try:
        with reporting_write_errors(cache / name, "Hub download", "free space in HF_HUB_CACHE"):
            return Path(
                hf_hub_download(
                    repo_id, name, revision=revision, local_files_only=offline_reason is not None
                )
            )
    except EntryNotFoundError as e:  # offline: not cached; online: not in the repository
        if offline_reason is None:
            raise CheckpointError(f"{reference}: {repo_id} has no file {name}") from e
        raise CheckpointError(
            f"{reference}: {_not_cached(cache, repo_id, revision, name)} in the Hugging Face cache "
            f"{cache}, and {offline_reason}: download it once with network access (`hf download "
            f"{repo_id}{f' --revision {revision}' if revision else ''}`), or set HF_HUB_CACHE to "
            "a cache holding it"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{reference}: downloading {name} failed: {e}") from None


def _not_cached(cache: Path, repo_id: str, revision: str | None, name: str) -> str:
    """What of ``repo_id@revision``'s ``name`` the cache lacks: the repository, the revision or
    the file."""
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    if not storage.is_dir():
        return f"there is no model repository {repo_id}"
    revisions = sorted(p.name for p in (storage / "refs").glob("*"))
    revision = revision or "main"
    if revision not in revisions and not (storage / "snapshots" / revision).is_dir():
        return f"{repo_id} has no revision {revision!r} (cached: {', '.join(revisions) or 'none'})"
    return f"{repo_id}@{revision} has no {name}"
