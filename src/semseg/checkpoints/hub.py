"""``hf://<org>/<name>[@<revision>]``: a model folder on the Hugging Face Hub, fetched into
huggingface_hub's cache by huggingface_hub itself (with ``HF_HUB_OFFLINE=1`` or no reachable Hub:
read from the cache only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from semseg.errors import CheckpointError
from semseg.files import reporting_write_errors

HF_SCHEME = "hf://"


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

    huggingface_hub's ``snapshot_download`` resolves the revision and fetches what the cache
    lacks; with ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, it reads the cache only.
    Each way of failing (its typed errors) is one line.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.file_download import repo_folder_name

    repo_id, revision = parse_hub_reference(reference)
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    try:
        with reporting_write_errors(storage, "Hub download", "free space in HF_HUB_CACHE"):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except LocalEntryNotFoundError as e:  # offline or unreachable, and not in the cache
        raise CheckpointError(_cache_miss(reference, repo_id, revision, files, e)) from None
    except RepositoryNotFoundError:  # also a gated repository without access
        raise CheckpointError(
            f"{reference}: there is no model repository {repo_id} on the Hugging Face Hub (or it "
            "is private or gated: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{reference}: {repo_id} has no revision {revision!r} (a branch, tag or commit)"
        ) from None
    except HfHubHTTPError as e:
        answer = " ".join(str(e).split())  # the Hub's message, on one line
        raise CheckpointError(
            f"{reference}: downloading {', '.join(files)} failed: {answer}"
        ) from None
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        what = f"{repo_id}@{revision or 'main'} has no {' and no '.join(missing)}"
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"{reference}: {what} {_cache_advice(repo_id, revision)}")
        raise CheckpointError(
            f"{reference}: {what} (on the Hub, or in the Hugging Face cache {constants.HF_HUB_CACHE} "
            "when the Hub cannot be reached): a model folder of this project holds "
            f"{' and '.join(files)} (scripts/model_zoo_row.py, scripts/hub_folder.py write one)"
        )
    return folder


def _cache_miss(
    reference: str,
    repo_id: str,
    revision: str | None,
    files: Sequence[str],
    error: Exception,
) -> str:
    """The line for a reference that is neither reachable nor cached: what of it the cache lacks
    (the repository, the revision or a file, in huggingface_hub's own view of the cache), why the
    Hub was not asked, and what to do."""
    from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except CacheNotFound:
        repos = frozenset()
    repo = next((r for r in repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    revision = revision or "main"
    if repo is None:
        what = f"there is no model repository {repo_id}"
    elif revision not in repo.refs and revision not in {r.commit_hash for r in repo.revisions}:
        cached = ", ".join(sorted(repo.refs)) or "none"
        what = f"{repo_id} has no revision {revision!r} (cached: {cached})"
    else:
        missing = [
            f
            for f in files
            if not isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str)
        ]
        what = f"{repo_id}@{revision} has no {' and no '.join(missing or files)}"
    return f"{reference}: {what} {_cache_advice(repo_id, revision, error.__cause__)}"


def _cache_advice(repo_id: str, revision: str | None, cause: BaseException | None = None) -> str:
    """Where was looked (the cache), why the Hub was not asked (offline mode, or ``cause``: it
    cannot be reached, or it failed), and how to get the model."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE=1"
    elif cause is None:
        why = "the Hub cannot be reached"
    else:
        what = "failed" if isinstance(cause, HfHubHTTPError) else "cannot be reached"
        why = f"the Hub {what} ({type(cause).__name__}: {' '.join(str(cause).split())})"
    pin = f" --revision {revision}" if revision and revision != "main" else ""
    return (
        f"in the Hugging Face cache {constants.HF_HUB_CACHE}, and {why}: download it once with "
        f"network access (`hf download {repo_id}{pin}`), or set HF_HUB_CACHE to a cache holding it"
    )
