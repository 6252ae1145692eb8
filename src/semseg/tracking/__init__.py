"""Experiment tracking: the local run record, W&B / TensorBoard logging, and loading runs for analysis.

`RunRecorder` and the loggers are used by the engine; `semseg.tracking.runs` and
`semseg.tracking.plots` by the notebook (imported as submodules: they pull in pandas/matplotlib).
wandb and tensorboard themselves are imported only when a logger that needs them is built.
"""

from semseg.tracking.loggers import MultiLogger, NullLogger, build_logger
from semseg.tracking.record import RunRecorder
from semseg.tracking.tensorboard_logger import TensorBoardLogger
from semseg.tracking.wandb_logger import WandbLogger, git_state

__all__ = [
    "MultiLogger",
    "NullLogger",
    "RunRecorder",
    "TensorBoardLogger",
    "WandbLogger",
    "build_logger",
    "git_state",
]
