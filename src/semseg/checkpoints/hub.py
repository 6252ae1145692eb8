"""``hf://<org>/<name>[@<revision>]``: a model folder on the Hugging Face Hub, fetched into
huggingface_hub's cache (with ``HF_HUB_OFFLINE=1`` or no reachable Hub: read from the cache only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from semseg.errors import CheckpointError
from semseg.files import reporting_write_errors

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
# One request to the Hub to learn a revision's commit; seconds before it counts as unreachable.
HUB_TIMEOUT_S = 10.0


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


def download_hub_files(reference: str, files: Sequence[str]) -> Path:
    """The cached snapshot folder of ``hf://org/name[@revision]`` holding ``files``.

    Online, one request (at most :data:`HUB_TIMEOUT_S` seconds, no retries) turns the revision
    into its commit, so that a cached commit is not fetched again; a Hub that cannot be reached
    falls back to the cache at once. With ``HF_HUB_OFFLINE=1`` only the cache is read.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    repo_id, revision = parse_hub_reference(reference)
    offline_reason = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None
    if offline_reason is None:
        revision, offline_reason = _commit_of(reference, repo_id, revision, files)
    cache = Path(constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    try:
        with reporting_write_errors(storage, "Hub download", "free space in HF_HUB_CACHE"):
            folder = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(files),
                local_files_only=offline_reason is not None,
            )
    except LocalEntryNotFoundError:  # the revision is not cached
        folder = None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{reference}: downloading {', '.join(files)} failed: {e}") from None
    if folder is None or not all((Path(folder) / name).is_file() for name in files):
        raise CheckpointError(
            f"{reference}: {_not_cached(cache, repo_id, revision, files)} in the Hugging Face "
            f"cache {cache}, and {offline_reason}: download it once with network access (`hf "
            f"download {repo_id}{f' --revision {revision}' if revision else ''}`), or set "
            "HF_HUB_CACHE to a cache holding it"
        )
    return Path(folder)


def _commit_of(
    reference: str, repo_id: str, revision: str | None, files: Sequence[str]
) -> tuple[str | None, str | None]:
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
    listed = {s.rfilename for s in info.siblings or []}
    missing = [name for name in files if name not in listed]
    if missing:
        raise CheckpointError(
            f"{reference}: {repo_id}@{revision or 'main'} has no {' and no '.join(missing)}: not a "
            "model folder of this project (scripts/model_zoo_row.py, scripts/hub_folder.py)"
        )
    return info.sha, None


def _not_cached(cache: Path, repo_id: str, revision: str | None, files: Sequence[str]) -> str:
    """What of ``repo_id@revision``'s ``files`` the cache lacks: the repository, the revision or
    the first missing file (huggingface_hub's own view of the cache)."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(cache).repos
    except CacheNotFound:
        repos = frozenset()
    repo = next((r for r in repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is None:
        return f"there is no model repository {repo_id}"
    revision = revision or "main"
    commits = {r.commit_hash for r in repo.revisions}
    if revision not in repo.refs and revision not in commits:
        cached = ", ".join(sorted(repo.refs)) or "none"
        return f"{repo_id} has no revision {revision!r} (cached: {cached})"
    missing = [
        name
        for name in files
        if not isinstance(try_to_load_from_cache(repo_id, name, cache, revision), str)
    ]
    return f"{repo_id}@{revision} has no {' and no '.join(missing or files)}"
