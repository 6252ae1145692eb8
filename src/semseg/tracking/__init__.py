"""Experiment tracking: the local run record, W&B logging, and loading runs for analysis.

`RunRecorder` and the loggers are used by the engine; `semseg.tracking.runs` and
`semseg.tracking.plots` by the notebook (imported as submodules: they pull in pandas/matplotlib).
"""

from semseg.tracking.record import RunRecorder
from semseg.tracking.wandb_logger import NullLogger, WandbLogger, build_logger, git_state

__all__ = ["NullLogger", "RunRecorder", "WandbLogger", "build_logger", "git_state"]
