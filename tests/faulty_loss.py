"""Losses that fail on purpose (NaN, a crash, a user error), to test the trainer's stops in
subprocesses and under torchrun (``loss._target_=faulty_loss.<Name>`` with tests/ on the path)."""

import os
import signal

import torch

from semseg.distributed import elastic_restart_count
from semseg.errors import UserError
from semseg.losses import SegCrossEntropy


class FaultOnRank(SegCrossEntropy):
    """A loss that fails on one rank (``RANK``, 0 without a launcher) from its ``at``-th call:

    - ``fault="nonfinite"``: NaN from then on;
    - ``fault="error"``: a UserError (a bad file only that rank reads, say);
    - ``fault="kill"``: the process kills itself (SIGKILL, nothing cleaned up), in torchrun's first
      attempt only: a crashed worker that a restart replaces.
    """

    def __init__(self, fault: str, at: int, rank: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fault, self.at, self.rank, self.calls = fault, at, rank, 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = super().forward(logits, target)
        if self.calls < self.at or os.environ.get("RANK", "0") != str(self.rank):
            return loss
        if self.fault == "kill" and self.calls == self.at and elastic_restart_count() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == "error" and self.calls == self.at:
            raise UserError(f"rank {self.rank} cannot go on")
        return loss * float("nan") if self.fault == "nonfinite" else loss
