"""A Hugging Face Hub cache, laid out as huggingface_hub's downloads lay it out (no network)."""

from __future__ import annotations

import os
from pathlib import Path


def hub_cache_repo(
    cache: Path, repo_id: str, folder: Path, files: list[str], tags: tuple[str, ...] = ()
) -> str:
    """Put ``files`` of ``folder`` into the Hub cache ``cache`` as revision ``main`` (and
    ``tags``) of model repo ``repo_id``, exactly as ``hf_hub_download`` stores a download: blobs
    named by the file's Hub ETag (sha256 for LFS files such as weights, the git blob hash for
    the others), ``snapshots/<commit>/<file>`` relative links to them, ``refs/<revision>``
    holding the commit. Returns the commit hash."""
    import hashlib

    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils.sha import git_hash

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    contents = {name: (folder / name).read_bytes() for name in files}
    commit = hashlib.sha1(repr(sorted(contents.items())).encode()).hexdigest()
    for name, data in contents.items():
        lfs = name.endswith((".safetensors", ".pt"))
        etag = hashlib.sha256(data).hexdigest() if lfs else git_hash(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    for ref in ("main", *tags):
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit
