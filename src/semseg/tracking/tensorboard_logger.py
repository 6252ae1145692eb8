"""The TensorBoard logger (`logger=tensorboard`): event files in `<run dir>/tensorboard/`, rank 0 only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from semseg.errors import UserError
from semseg.tracking.wandb_logger import git_state

INSTALL_HINT = "pip install tensorboard (it is in requirements.txt)"


def tag(name: str) -> str:
    """A TensorBoard tag: letters, digits, `_ - . /` (spaces in class names become `_`)."""
    return name.replace(" ", "_")


class TensorBoardLogger:
    """Scalars, predicted masks, the config and the final summary as TensorBoard events.

    Args:
        run_dir: the run folder; events go to `<run_dir>/<subdir>/`.
        config: the resolved config (plain dict), written once as text with the git commit.
        subdir: folder under the run folder.
        flush_secs: how often pending events reach the disk (they are flushed at `finish` too).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict[str, Any] | None = None,
        subdir: str = "tensorboard",
        flush_secs: int = 30,
    ) -> None:
        try:  # here, not at the top: start-up does without tensorboard
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                f"logger=tensorboard needs the tensorboard package: {INSTALL_HINT}; "
                "or choose logger=wandb / logger=none"
            ) from None
        self.log_dir = Path(run_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=int(flush_secs))
        if config:
            text = json.dumps({**config, "git": git_state()}, indent=2, default=str)
            self.writer.add_text("config", f"```\n{text}\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One scalar per metric (train/loss, train/lr, train/img_per_s, val/mIoU, val/IoU/<class>, ...)."""
        for name, value in metrics.items():
            if value is not None:
                self.writer.add_scalar(tag(name), float(value), int(step))

    def log_predictions(self, examples: list[dict[str, Any]], palette: list, step: int) -> None:
        """Each example as one image: input | prediction | ground truth (dataset palette)."""
        from semseg.evaluation.export import colorize

        for i, example in enumerate(examples):
            panels = [
                np.asarray(example["image"], dtype=np.uint8),
                colorize(np.asarray(example["pred"], dtype=np.uint8), palette),
            ]
            if example.get("gt") is not None:
                panels.append(colorize(np.asarray(example["gt"], dtype=np.uint8), palette))
            name = tag(str(example.get("name") or i))
            self.writer.add_image(
                f"val/predictions/{name}",
                np.concatenate(panels, axis=1),
                int(step),
                dataformats="HWC",
            )

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The final numbers as a text table (the scalars are already in the curves)."""
        rows = [
            f"| {key} | {value:.6g} |" if isinstance(value, int | float) else f"| {key} | {value} |"
            for key, value in summary.items()
            if value is not None
        ]
        self.writer.add_text("summary", "\n".join(["| metric | value |", "|---|---|", *rows]))

    def finish(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
