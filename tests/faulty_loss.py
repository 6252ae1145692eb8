"""A loss that turns NaN after a number of calls, to test the trainer's NaN stop in a subprocess."""

import torch

from semseg.engine.losses import SegCrossEntropy


class NaNAfter(SegCrossEntropy):
    def __init__(self, after: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.after, self.calls = after, 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = super().forward(logits, target)
        return loss * float("nan") if self.calls > self.after else loss
