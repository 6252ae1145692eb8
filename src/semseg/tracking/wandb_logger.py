"""The Weights & Biases logger (`logger=wandb`), built by `semseg.tracking.loggers.build_logger`.

W&B must never stop training: any failure (no network, bad key, init error, a dead run) warns
once and turns the logger into a no-op.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from semseg.errors import ConfigError

RUN_ID_FILE = "run_id"  # under <run_dir>/wandb/: lets a resumed run continue the same W&B run


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit hash and dirty flag of the repository holding `path` ("unknown" without git)."""
    cwd = Path(path) if path else Path(os.environ.get("PROJECT_ROOT", Path(__file__).parent))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}
    if commit.returncode != 0 or status.returncode != 0:
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def hydra_run_names() -> tuple[str | None, str | None]:
    """Default (group, name) from the Hydra job: the sweep folder and the job's overrides.

    In a multirun the group is the sweep folder name (`<date>_<time>_<pid>` for the project's
    `multirun/<task>/<date>/<time>_<pid>` layout) so all jobs of a sweep group together, and the
    name is the job's override string. Outside Hydra both are None.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, None
        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        if hc.mode != RunMode.MULTIRUN:
            return None, output_dir.name
        sweep = Path(hc.sweep.dir)
        group = sweep.name
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep.parent.name):
            group = f"{sweep.parent.name}_{group}"
        name = hc.job.override_dirname or output_dir.name
        return group, f"{hc.job.num}:{name}"[:128]
    except Exception:  # Hydra internals must not break logging
        return None, None


class WandbLogger:
    """Weights & Biases logger; every failure warns once and makes it a no-op.

    Args:
        run_dir: the run folder; W&B writes `<run_dir>/wandb/` (offline runs: `offline-run-*`,
            upload later with `wandb sync <run_dir>/wandb/offline-run-*`).
        config: the resolved config (plain dict); logged with the git commit and dirty flag.
        mode: online | offline | disabled.
        project, entity, tags, job_type: passed to `wandb.init`.
        group: default the sweep folder name in a multirun, else none.
        name: default the job's override string (multirun) or the run folder name.
        image_style: "masks" logs each example as the image with W&B prediction / ground-truth
            mask layers (toggle classes in the UI); "side_by_side" logs image | pred | gt
            coloured with the dataset palette.
        resume: reuse the W&B run id stored in `<run_dir>/wandb/run_id` (a resumed training run
            continues the same W&B run).
        settings: extra `wandb.Settings` fields (e.g. `init_timeout`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict[str, Any] | None = None,
        mode: str = "offline",
        project: str = "semseg-bdd100k",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        job_type: str = "train",
        image_style: str = "masks",
        resume: bool = True,
        settings: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("online", "offline", "disabled"):
            raise ConfigError(
                f"logger.mode={mode!r} is not one of online | offline | disabled "
                "(conf/logger/wandb.yaml)"
            )
        if image_style not in ("masks", "side_by_side"):
            raise ConfigError(f"logger.image_style={image_style!r} must be masks | side_by_side")
        self.run_dir = Path(run_dir)
        self.image_style = image_style
        self.run = None
        self._failed = False
        config = dict(config or {})
        self.class_names = list(config.get("dataset", {}).get("class_names", []) or [])
        default_group, default_name = hydra_run_names()
        self._environ = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
        try:
            import wandb

            self._wandb = wandb
            wandb_dir = self.run_dir / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            id_file = wandb_dir / RUN_ID_FILE
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
            self.run = wandb.init(
                dir=str(self.run_dir),
                mode=mode,
                project=project,
                entity=entity,
                group=group or default_group,
                tags=list(tags or []),
                name=name or default_name,
                job_type=job_type,
                config={**config, "git": git_state()},
                id=run_id,
                resume="allow" if run_id else None,
                # One process runs every job of a local multirun: close any run left open.
                reinit="finish_previous",
                settings=wandb.Settings(**{"silent": True, **(settings or {})}),
            )
            if mode != "disabled" and self.run is not None:
                id_file.write_text(self.run.id)
        except Exception as exc:
            self._fail("init", exc)

    @property
    def active(self) -> bool:
        """True while W&B is logging (False after a failure or `finish`)."""
        return self.run is not None and not self._failed

    def _fail(self, what: str, exc: BaseException) -> None:
        if not self._failed:
            warnings.warn(
                f"W&B {what} failed ({type(exc).__name__}: {exc}); W&B logging is off for this "
                f"run, training goes on. The local record in {self.run_dir} (metrics.jsonl, "
                "summary.json) is unaffected. Use logger.mode=offline (or logger=none) without "
                "network.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._failed = True
        self.run = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at `step` (train: loss, lr, img_per_s; eval: val/mIoU, val/IoU/...)."""
        if not self.active:
            return
        try:
            self.run.log({k: float(v) for k, v in metrics.items() if v is not None}, step=int(step))
        except Exception as exc:
            self._fail("log", exc)

    def log_predictions(self, examples: list[dict[str, Any]], palette: list, step: int) -> None:
        """Log predicted masks: dicts with name, image HxWx3 uint8, pred HxW uint8, gt HxW or None."""
        if not self.active or not examples:
            return
        try:
            images = [self._image(ex, palette) for ex in examples]
            self.run.log({"val/predictions": images}, step=int(step))
        except Exception as exc:
            self._fail("log_predictions", exc)

    def _image(self, example: dict[str, Any], palette: list) -> Any:
        image = np.asarray(example["image"], dtype=np.uint8)
        pred = np.asarray(example["pred"], dtype=np.uint8)
        gt = example.get("gt")
        name = str(example.get("name", ""))
        if self.image_style == "side_by_side":
            from semseg.evaluation.export import colorize

            panels = [image, colorize(pred, palette)]
            if gt is not None:
                panels.append(colorize(np.asarray(gt, dtype=np.uint8), palette))
            return self._wandb.Image(np.concatenate(panels, axis=1), caption=name)
        labels = {i: n for i, n in enumerate(self.class_names)} or {
            i: str(i) for i in range(len(palette))
        }
        masks = {"prediction": {"mask_data": pred, "class_labels": labels}}
        if gt is not None:
            masks["ground_truth"] = {
                "mask_data": np.asarray(gt, dtype=np.uint8),
                "class_labels": labels,
            }
        return self._wandb.Image(image, masks=masks, caption=name)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Set the run summary (the final numbers shown in the W&B runs table)."""
        if not self.active:
            return
        try:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        except Exception as exc:
            self._fail("log_summary", exc)

    def finish(self) -> None:
        """Finish the W&B run (the engine calls this at the end of every job) and stop W&B's
        service process, leaving the ``WANDB_*`` environment variables as they were before."""
        run, self.run = self.run, None
        try:
            if run is not None and not self._failed:
                run.finish()
        except Exception as exc:
            self._fail("finish", exc)
        if hasattr(self, "_wandb"):
            with contextlib.suppress(Exception):
                self._wandb.teardown()  # the next job of a multirun starts a fresh service
            for key in [k for k in os.environ if k.startswith("WANDB_")]:
                if key not in self._environ:
                    del os.environ[key]
            os.environ.update(self._environ)
