"""Load run folders (or a W&B project) into pandas for analysis; `notebooks/analyze_runs.ipynb` calls these.

A run folder (README, "Where results land") holds `.hydra/{config,overrides}.yaml`,
`metrics.jsonl`, `summary.json` and, after the final evaluation, `eval/confusion_matrix.npy` and
`eval/examples/<name>_{image,pred,gt}.png`. A sweep folder holds one run folder per job.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from semseg.tracking.record import (
    CONFUSION_FILE,
    EVAL_DIR,
    EXAMPLE_PARTS,
    EXAMPLES_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
)

HYDRA_DIR = ".hydra"
# Columns of load_runs that describe the run rather than a parameter or a metric.
INFO_COLUMNS = ("run", "run_dir", "status")


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a folder with `.hydra/config.yaml` and `summary.json` or `metrics.jsonl`."""
    path = Path(path)
    return (path / HYDRA_DIR / "config.yaml").is_file() and (
        (path / SUMMARY_FILE).is_file() or (path / METRICS_FILE).is_file()
    )


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """Every run folder under `root` (itself included), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"No folder {root}: pass a sweep folder (multirun/...) or a run folder."
        )
    found = {p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == HYDRA_DIR}
    return sorted((p for p in found if is_run_dir(p)), key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    # Job folders are 0, 1, ..., 10: sort numerically, not as text.
    return [int(part) if part.isdigit() else part for part in path.parts]


def latest_sweep(root: str | os.PathLike | None = None) -> Path:
    """The newest sweep folder under `root`: the parent of the most recently started job folder.

    `root` defaults to the first `multirun/` folder found in the working directory or its parents
    (a notebook runs in `notebooks/`).
    """
    if root is None:
        for folder in [Path.cwd(), *Path.cwd().parents]:
            if (folder / "multirun").is_dir():
                root = folder / "multirun"
                break
        else:
            raise FileNotFoundError(
                f"No multirun/ folder in {Path.cwd()} or its parents: run a sweep "
                "(python src/train.py -m ...) or set SWEEP_DIR."
            )
    configs = [p for p in Path(root).rglob("config.yaml") if p.parent.name == HYDRA_DIR]
    if not configs:
        raise FileNotFoundError(f"No run folders under {root}: run a sweep or set SWEEP_DIR.")
    # The sweep folder is the parent of its job folders (basic and Optuna sweeps alike).
    return max(configs, key=lambda p: p.stat().st_mtime).parent.parent.parent


def load_metrics(run_dir: str | os.PathLike, merge_steps: bool = True) -> pd.DataFrame:
    """The rows of `<run_dir>/metrics.jsonl` as a DataFrame with a `step` column.

    With `merge_steps` (default) there is one row per step: the train and eval lines of a step are
    merged and, after a resume, the later value of a metric wins. A truncated last line (a killed
    run) is skipped with a warning.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {METRICS_FILE} in {run_dir}: is it a run folder of train.py?")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: skipped a line that is not JSON", stacklevel=2)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    if merge_steps:
        # groupby.last takes the last non-null value of each column: later lines win.
        df = df.groupby("step", sort=True).last().reset_index()
    return df


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["backbone=resnet18", "optimizer.lr=0.01"]` -> `{"backbone": "resnet18", "optimizer.lr": 0.01}`.

    Values are parsed with Hydra's override grammar (numbers become int/float); `+`/`++` prefixes
    are dropped and deletions (`~key`) skipped.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params: dict[str, Any] = {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # keep unparsable text rather than failing the whole table
            key, _, value = text.lstrip("+~").partition("=")
            params[key] = value
            continue
        if override.is_delete():
            continue
        key = override.key_or_group  # without the +/++ prefix
        value = override.value()
        params[key] = (
            value if isinstance(value, bool | int | float | str) or value is None else str(value)
        )
    return params


def _read_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One run folder: `{"run_dir", "config", "overrides", "params", "summary"}`.

    `config` is `.hydra/config.yaml` (as saved by Hydra, interpolations unresolved), `overrides`
    the command-line overrides of the job, `params` those parsed into values, `summary` the
    content of `summary.json` (empty while the run has not finished).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / HYDRA_DIR / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"No {HYDRA_DIR}/config.yaml in {run_dir}: not a Hydra run folder.")
    overrides_path = run_dir / HYDRA_DIR / "overrides.yaml"
    overrides = (_read_yaml(overrides_path) or []) if overrides_path.is_file() else []
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "run_dir": run_dir,
        "config": _read_yaml(config_path) or {},
        "overrides": list(overrides),
        "params": parse_overrides(list(overrides)),
        "summary": summary,
    }


def _final_metrics(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    if summary:
        return pd.json_normalize(summary, sep=".").iloc[0].to_dict()
    # Unfinished run: the latest value of each metric logged so far.
    metrics = load_metrics(run_dir)
    return {k: v for k, v in metrics.ffill().iloc[-1].items()} if len(metrics) else {}


def load_runs(root: str | os.PathLike, metric: str = "val/mIoU") -> pd.DataFrame:
    """One row per run folder under `root`: `run`, `run_dir`, `status`, override values, final metrics.

    Override columns are named by their key (`backbone`, `optimizer.lr`); `df.attrs["params"]`
    lists them and `swept_params(df)` keeps those that vary. Metrics come from `summary.json`
    (`val/mIoU`, `val/IoU/<class>`, `steps`, ...), or the last logged values while a run is
    unfinished (`status` "running"). Rows are sorted by `metric`, best first.
    """
    root = Path(root)
    rows, params = [], {}
    for run_dir in find_run_dirs(root):
        run = load_run(run_dir)
        params.update(dict.fromkeys(run["params"]))
        rows.append(
            {
                "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
                "run_dir": str(run_dir),
                "status": "finished" if run["summary"] else "running",
                **run["params"],
                **_final_metrics(run_dir, run["summary"]),
            }
        )
    if not rows:
        raise FileNotFoundError(
            f"No run folders under {root} (a run folder has .hydra/config.yaml and "
            f"{SUMMARY_FILE} or {METRICS_FILE})."
        )
    df = pd.DataFrame(rows)
    if metric in df.columns:
        df = df.sort_values(metric, ascending=False, na_position="last", kind="stable")
    df = df.reset_index(drop=True)
    df.attrs["params"] = list(params)
    return df


def swept_params(df: pd.DataFrame) -> list[str]:
    """The override columns of `load_runs` whose value differs between runs (the swept ones)."""
    columns = df.attrs.get("params")
    if columns is None:
        raise ValueError("swept_params needs the DataFrame of load_runs (df.attrs['params']).")
    return [c for c in columns if c in df.columns and df[c].astype(str).nunique(dropna=False) > 1]


def run_labels(df: pd.DataFrame) -> pd.Series:
    """A legend label per row of `load_runs`: the run folder and its swept values ("1: optimizer.lr=0.02")."""
    params = swept_params(df) if "params" in df.attrs else []
    labels = df["run"].astype(str) if "run" in df.columns else df["run_dir"].astype(str)
    if not params:
        return labels
    values = df[params].apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1)
    return labels + ": " + values


def class_iou_columns(df: pd.DataFrame, prefix: str = "val/IoU/") -> list[str]:
    """The per-class IoU columns (`val/IoU/<class name>`), in logged (class id) order."""
    return [c for c in df.columns if c.startswith(prefix)]


def load_confusion_matrix(run_dir: str | os.PathLike) -> np.ndarray:
    """The (K+1)x(K+1) confusion matrix of the final evaluation (rows ground truth, columns prediction;
    the last row/column counts "ignored" predictions)."""
    path = Path(run_dir) / EVAL_DIR / CONFUSION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {EVAL_DIR}/{CONFUSION_FILE} in {run_dir}: the engine writes it at the final "
            "evaluation (trainer.eval_at_end=true)."
        )
    return np.load(path, allow_pickle=False)


def load_examples(run_dir: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """Sample predictions of the final evaluation from `<run_dir>/eval/examples/`.

    Returns dicts `{"name", "image" HxWx3 uint8, "pred" HxW uint8, "gt" HxW uint8 or None}` read
    from `<name>_image.png`, `<name>_pred.png` (class ids) and `<name>_gt.png` (class ids).
    """
    from PIL import Image

    folder = Path(run_dir) / EVAL_DIR / EXAMPLES_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No {EVAL_DIR}/{EXAMPLES_DIR}/ in {run_dir}: the engine writes sample predictions "
            "there at the final evaluation."
        )
    names = sorted(p.name[: -len("_image.png")] for p in folder.glob("*_image.png"))
    examples = []
    for name in names[:limit]:
        parts = {}
        for part in EXAMPLE_PARTS:
            path = folder / f"{name}_{part}.png"
            parts[part] = np.asarray(Image.open(path)) if path.is_file() else None
        if parts["pred"] is None:
            continue
        examples.append({"name": name, **parts})
    return examples


def load_wandb_runs(
    project: str, entity: str | None = None, filters: dict[str, Any] | None = None
) -> pd.DataFrame:
    """One row per run of a W&B project: name, id, group, state, flattened config, summary metrics.

    Needs an online W&B server and a login; offline, analyse run folders with `load_runs`.
    """
    path = f"{entity}/{project}" if entity else project
    hint = (
        "load_wandb_runs needs an online W&B server and a login (`wandb login`); without one, "
        "analyse the local run folders with load_runs(<sweep folder>)."
    )
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise RuntimeError(f"WANDB_MODE={os.environ['WANDB_MODE']}: {hint}")
    try:
        import wandb

        runs = list(wandb.Api().runs(path, filters=filters))
    except Exception as exc:
        raise RuntimeError(f"Could not list the W&B runs of {path!r} ({exc}). {hint}") from exc
    rows = []
    for run in runs:
        summary = getattr(run.summary, "_json_dict", run.summary)
        rows.append(
            {
                "run": run.name,
                "id": run.id,
                "group": run.group,
                "state": run.state,
                **pd.json_normalize(dict(run.config), sep=".").iloc[0].to_dict(),
                **{
                    k: v
                    for k, v in dict(summary).items()
                    if not k.startswith("_") and isinstance(v, bool | int | float | str)
                },
            }
        )
    return pd.DataFrame(rows)
