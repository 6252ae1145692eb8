"""What a training run reports: a start-up line, a row per log step, a line per evaluation, the
summary and the ending. :class:`RunReporter` sends them, on rank 0, to the run record
(``metrics.jsonl`` / ``summary.json``), the experiment loggers and the log.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from semseg.tracking.loggers import build_logger
from semseg.tracking.record import RunRecorder

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from semseg.evaluation.inference import EvalResult

log = logging.getLogger(__name__)

EMA_PREFIX = "val_ema/"  # the metrics of the weights' moving average (trainer.ema)


def start_line(
    params: int,
    gflops: float,
    crop: tuple[int, int],
    device: torch.device,
    precision: str,
    world_size: int,
    global_batch: int,
) -> str:
    """Model size and cost, device, precision, processes and global batch."""
    return (
        f"model: {params / 1e6:.2f}M parameters, {gflops:.1f} GFLOPs forward at "
        f"{crop[0]}x{crop[1]}; {device}, precision {precision}, {world_size} "
        f"process(es), global batch {global_batch}"
    )


def train_row(
    loss: float, lr: float, images: int, seconds: float, grad_norm: float | None = None
) -> dict[str, float]:
    """One ``metrics.jsonl`` row of training figures since the last log step (``grad_norm``: the
    mean pre-clip gradient norm, when gradients are clipped)."""
    row = {"loss": loss, "lr": lr, "img_per_s": images / seconds}
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    return row


def train_line(iteration: int, max_iters: int, row: Mapping[str, float]) -> str:
    return (
        f"iter {iteration}/{max_iters}  loss {row['loss']:.4f}  lr {row['lr']:.3e}  "
        f"{row['img_per_s']:.1f} img/s"
    )


def eval_line(iteration: int, metrics: Mapping[str, float]) -> str:
    ema_miou = metrics.get(f"{EMA_PREFIX}mIoU")
    ema = "" if ema_miou is None else f"  EMA mIoU {100 * ema_miou:.2f}%"
    mmseg_miou = metrics.get("val/mmseg_mIoU")  # drivable area: mmseg's, background scored too
    mmseg = "" if mmseg_miou is None else f"  (mmseg mIoU {100 * mmseg_miou:.2f}%)"
    return (
        f"iter {iteration}: val mIoU {100 * metrics['val/mIoU']:.2f}%  "
        f"pixel acc {100 * metrics['val/pixel_acc']:.2f}%{mmseg}{ema}"
    )


def run_summary(
    metrics: Mapping[str, float],
    last_loss: float,
    iteration: int,
    steps: int,
    wall: float,
    global_batch: int,
    params: int,
    gflops: float,
) -> dict[str, Any]:
    """``summary.json``: the last evaluation plus loss, steps, wall time, throughput and size."""
    return {
        **metrics,
        "loss": last_loss,
        "steps": iteration,
        "wall_s": wall,
        "img_per_s": steps * global_batch / wall if wall > 0 else float("nan"),
        "params": params,
        "gflops": gflops,
    }


def final_line(summary: Mapping[str, Any], run_dir: Path) -> str | None:
    """The last line of a finished run that evaluated; None when it did not."""
    if "val/mIoU" not in summary:
        return None
    return f"final val mIoU: {100 * summary['val/mIoU']:.2f}% (run folder {run_dir})"


def stopped_message(
    iteration: int,
    max_iters: int,
    metrics: Mapping[str, float],
    metrics_iteration: int | None,
    signum: int,
    run_dir: Path,
) -> str:
    """The last line of a preempted run: where it stopped, its last evaluation, how to go on."""
    last_eval = (
        f"last val mIoU {100 * metrics['val/mIoU']:.2f}% (iteration {metrics_iteration})"
        if "val/mIoU" in metrics
        else "no evaluation yet"
    )
    return (
        f"stopped at iteration {iteration} of {max_iters} by signal "
        f"{signal.Signals(signum).name}; {last_eval}; checkpoints/last.pt saved; continue with "
        f"trainer.resume=auto hydra.run.dir={run_dir}"
    )


class RunReporter:
    """Rank 0 records and reports; on the other ranks every method does nothing.

    ``resumed_at``: the iteration a resumed run continues from (its metrics.jsonl lines after
    that iteration are dropped: they will be logged again).
    """

    def __init__(
        self, cfg: DictConfig, run_dir: Path, is_main: bool, resumed_at: int | None = None
    ) -> None:
        self.run_dir, self.is_main = run_dir, is_main
        self.max_iters = int(cfg.schedule.max_iters)
        self.recorder = RunRecorder(run_dir, resumed_at) if is_main else None
        self.logger = build_logger(
            cfg.logger,  # conf/logger/, none (NullLogger) by default
            run_dir,
            OmegaConf.to_container(cfg, resolve=True),
            is_main=is_main,
        )

    def train(self, iteration: int, row: Mapping[str, float], bar: tqdm) -> None:
        """One ``metrics.jsonl`` row, logger point, progress-bar update and log line."""
        if not self.is_main:
            return
        self.recorder.log(iteration, row)
        self.logger.log_metrics({f"train/{k}": v for k, v in row.items()}, iteration)
        bar.set_postfix(
            loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.1f}"
        )
        log.info(train_line(iteration, self.max_iters, row))

    def evaluation(
        self,
        iteration: int,
        metrics: Mapping[str, float],
        result: EvalResult,
        palette: Any,
        final: bool,
    ) -> None:
        """The metrics, the example predictions and, at the end, the notebook's artifacts."""
        if not self.is_main:
            return
        self.recorder.log(iteration, metrics)
        self.logger.log_metrics(metrics, iteration)
        self.logger.log_predictions(result.examples, palette, iteration)
        log.info(eval_line(iteration, metrics))
        if final:  # for the analysis notebook
            self.recorder.write_eval_artifacts(result.confmat, result.examples)

    def finish(
        self, summary: dict[str, Any], signum: int | None, metrics_iteration: int | None
    ) -> None:
        """``summary.json`` and the last line: where a preempted run (``signum``) stopped and how
        to continue, or the final mIoU."""
        if not self.is_main:
            return
        self.recorder.write_summary(summary)
        self.logger.log_summary(summary)
        if signum is not None:
            log.warning(
                stopped_message(
                    summary["steps"],
                    self.max_iters,
                    summary,
                    metrics_iteration,
                    signum,
                    self.run_dir,
                )
            )
        elif (line := final_line(summary, self.run_dir)) is not None:
            log.info(line)

    def close(self) -> None:
        self.logger.finish()
        if self.recorder is not None:
            self.recorder.close()
