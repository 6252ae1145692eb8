"""What every entry point does before Hydra composes its config."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from semseg.errors import ConfigError, UserError, error_line

_STAMP_ENV = "SEMSEG_RUN_STAMP"
# The repository's config tree (the package is installed editable from src/).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"


def run_stamp() -> str:
    """``<date>/<time>_<pid>``: one per process (or per torchrun job, restarts included), so
    folders never collide."""
    if _STAMP_ENV not in os.environ:
        os.environ[_STAMP_ENV] = time.strftime("%Y-%m-%d/%H-%M-%S") + f"_{os.getpid()}"
    return os.environ[_STAMP_ENV]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)


def several_processes_launched() -> bool:
    """Whether a launcher may have started several processes (torchrun's ``WORLD_SIZE``, a SLURM
    job's tasks): read from the environment, so that a single process never imports torch here
    (printing a config or the help stays fast)."""
    return any(int(os.environ.get(key, "1")) > 1 for key in ("WORLD_SIZE", "SLURM_NTASKS"))


def _share_stamp_across_ranks() -> None:
    """Under torchrun every rank composes its own config: rank 0 picks the run stamp for all (and
    workers that torchrun restarts get the first start's: they continue in the same folder)."""
    if _STAMP_ENV in os.environ or not several_processes_launched():
        return
    from semseg.distributed import agree_on, env_world_size

    if env_world_size() > 1:
        os.environ[_STAMP_ENV] = agree_on("run_stamp", run_stamp())


def prepare(project_root: str | os.PathLike) -> None:
    """Set PROJECT_ROOT (paths.root_dir), register resolvers, share one run folder under torchrun."""
    os.environ.setdefault("PROJECT_ROOT", str(Path(project_root).resolve()))
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    register_resolvers()
    _share_stamp_across_ranks()


def compose(config_name: str | None = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config of ``conf/`` outside ``@hydra.main`` (tests, scripts, the benchmark): the
    one place besides ``@hydra.main`` where configs are composed."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException, OverrideParseException

    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        except (ConfigCompositionException, OverrideParseException) as e:  # a bad override
            raise ConfigError(one_line(str(e))) from None


def compose_groups(groups: Mapping[str, str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Resolved containers of only the given config groups (e.g. ``{"model": "semantic_fpn",
    "backbone": "resnet50c", "dataset": "bdd100k"}``) with ``overrides`` applied; ``paths`` is
    added for the interpolations."""
    group_overrides = [f"+{g}={name}" for g, name in {"paths": "default", **groups}.items()]
    cfg = compose(None, [*group_overrides, *overrides])
    return {g: OmegaConf.to_container(cfg[g], resolve=True) for g in groups}


def one_line(message: str) -> str:
    """Hydra's multi-line message as one line: its options listed after their heading, the
    config search path left out."""
    parts: list[str] = []
    for line in message.split("Config search path:")[0].splitlines():
        if not line.strip():
            continue
        if line.startswith("\t") and parts:  # an option under the line before
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        else:
            parts.append(line.strip().rstrip("."))
    return "; ".join(parts)


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`UserError` into one clear line on stderr and exit code 2 (no traceback wall)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(error_line(str(e)), file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
