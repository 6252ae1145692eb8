"""Training: a composed config in, a trained run folder out (DDP, mixed precision, exact resume).

Read it top-down: what stops a run early, the weights' moving average, what a run reports, ONE
iteration (:func:`train_step`), then :class:`Trainer`: set-up, resume, checkpoints, validation,
and :meth:`Trainer.fit`, the loop with its log / eval / checkpoint / stop cadence and its ending.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from semseg.data import build_dataset, build_eval_loader, build_train_loader, dataset_meta
from semseg.distributed import (
    DistEnv,
    all_gather_object,
    all_reduce_max,
    broadcast_buffers,
    destroy,
    elastic_restart_count,
    init_distributed,
    wrap_ddp,
)
from semseg.engine import run_checkpoints as ckpts
from semseg.engine.debug import DebugSession, first_images, fixed_batches
from semseg.engine.losses import build_loss
from semseg.engine.optim import GradClipper, build_grad_clipper, build_optimizer, build_scheduler
from semseg.errors import ConfigError, UserError
from semseg.evaluation.inference import EvalResult, evaluate_model
from semseg.models import build_model, count_parameters, forward_gflops, load_model_weights
from semseg.models.checkpoint import (
    copy_checkpoint,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from semseg.runtime import autocast, configure_backends, resolve_channels_last, resolve_precision
from semseg.tracking import RunRecorder, build_logger
from semseg.tracking.record import CHECKPOINT_DIR

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "Trainer", "optimized_metric", "train", "train_step"]

EMA_PREFIX = "val_ema/"


# --------------------------------------------------------------------------------------------
# What stops a run before schedule.max_iters: a preemption signal (a clean stop: checkpoint, then
# exit 0), a non-finite loss or no memory (one-line user errors)


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; the last good checkpoint is left untouched."""


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM, Kubernetes, ``kill``); the loop checks it after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. some launchers)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, env: DistEnv, at_log: bool) -> bool:
        """Whether to stop after this step; every rank gets the same answer."""
        if not env.distributed:
            return self.signum is not None
        # Ranks agree (one tiny all-reduce) at log steps, so that all of them stop at the same step.
        return at_log and all_reduce_max(float(self.signum or 0), env.device) > 0


class NonFiniteGuard:
    """Remembers the first iteration whose loss was NaN/inf, on the device: the loop reads it only
    at log, evaluation and checkpoint steps (the same steps on every rank), so the steps in
    between need no sync, and every rank stops together when any rank saw one."""

    def __init__(self, device: torch.device, checkpoint_dir: Path) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.device, self.checkpoint_dir = device, checkpoint_dir

    def see(self, loss: torch.Tensor, iteration: int) -> None:
        bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(bad, iteration, self.first_bad)

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` on every rank when a loss on any rank was NaN/inf."""
        mine = float(self.first_bad.item())
        # The earliest bad iteration of any rank (a NaN spreads to the other ranks' weights
        # through the gradient all-reduce, so theirs turn bad one iteration later).
        bad = -all_reduce_max(-(mine if mine >= 0 else math.inf), self.device)
        if bad < math.inf:
            raise NonFiniteLossError(
                f"the loss became NaN/inf at iteration {int(bad)}; stopped without writing a "
                f"checkpoint (the last good one is in {self.checkpoint_dir}). Lower optimizer.lr "
                "or use trainer.precision=fp32"
            )


def out_of_memory_error(iteration: int, batch_size: int, crop_h: int, crop_w: int) -> UserError:
    """The one line for a CUDA out-of-memory at ``iteration``: what to lower, what to raise."""
    return UserError(
        f"CUDA out of memory at iteration {iteration} with dataset.batch_size={batch_size} and "
        f"crop {crop_h}x{crop_w}: lower dataset.batch_size (and raise trainer.accumulate "
        f"to keep the global batch) or use trainer.precision=bf16"
    )


# --------------------------------------------------------------------------------------------
# Exponential moving average of the weights (``trainer/ema=timm``, timm's ModelEmaV3): updated after
# every optimizer step, evaluated next to the raw model as ``val_ema/*``, kept in every checkpoint


def build_ema(ema_cfg: DictConfig | None, model: nn.Module) -> nn.Module | None:
    """Instantiate ``trainer.ema`` around ``model`` (a deep copy on the same device); None when
    the node is null (off)."""
    if ema_cfg is None:
        return None
    decay = ema_cfg.get("decay")
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
        raise ConfigError(
            f"trainer.ema.decay={decay!r} must be in (0, 1), e.g. 0.999 (trainer.ema=null: no EMA)"
        )
    return instantiate(ema_cfg, model)


def restore_ema(
    ema: nn.Module | None, checkpoint: Mapping[str, Any], model: nn.Module, source: str
) -> None:
    """Load the checkpoint's EMA weights; one without them starts the average from ``model``."""
    if ema is None:
        return
    if checkpoint.get("ema") is None:
        log.info("%s holds no EMA weights: the average starts from the resumed weights", source)
        ema.set(model)
        return
    ema.module.load_state_dict(checkpoint["ema"])


def check_best_metric(name: str, ema: nn.Module | None) -> str:
    """``trainer.best_metric`` names a val metric; a ``val_ema/`` one needs the EMA."""
    if not str(name).startswith(("val/", EMA_PREFIX)):
        raise ConfigError(
            f"trainer.best_metric={name!r} must name an evaluation metric: val/mIoU, or "
            f"{EMA_PREFIX}mIoU with an EMA (trainer/ema=timm)"
        )
    if str(name).startswith(EMA_PREFIX) and ema is None:
        raise ConfigError(
            f"trainer.best_metric={name} needs an EMA: add trainer/ema=timm or use val/mIoU"
        )
    return str(name)


# --------------------------------------------------------------------------------------------
# What a run reports: a start-up line, a row per log step, a line per evaluation, the summary and
# the ending. Rank 0 sends them to metrics.jsonl / summary.json, the experiment loggers and the log.


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
    loss: float, lr: float, images: int, seconds: float, clipper: GradClipper | None
) -> dict[str, float]:
    """One ``metrics.jsonl`` row of training figures since the last log step."""
    row = {"loss": loss, "lr": lr, "img_per_s": images / seconds}
    if clipper is not None:  # the mean pre-clip gradient norm since the last log step
        row["grad_norm"] = clipper.mean_norm()
    return row


def train_line(iteration: int, max_iters: int, row: Mapping[str, float]) -> str:
    return (
        f"iter {iteration}/{max_iters}  loss {row['loss']:.4f}  lr {row['lr']:.3e}  "
        f"{row['img_per_s']:.1f} img/s"
    )


def eval_line(iteration: int, metrics: Mapping[str, float]) -> str:
    ema_miou = metrics.get(f"{EMA_PREFIX}mIoU")
    ema = "" if ema_miou is None else f"  EMA mIoU {100 * ema_miou:.2f}%"
    return (
        f"iter {iteration}: val mIoU {100 * metrics['val/mIoU']:.2f}%  "
        f"pixel acc {100 * metrics['val/pixel_acc']:.2f}%{ema}"
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


# --------------------------------------------------------------------------------------------
# One iteration


def train_step(
    model: nn.Module,
    batches: Iterator[dict[str, Any]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    precision: str,
    accumulate: int = 1,
    channels_last: bool = False,
    clip: GradClipper | None = None,
) -> torch.Tensor:
    """Forward, backward and update over ``accumulate`` micro-batches; returns the loss on the
    device (no host sync). ``model`` may be wrapped in DDP and/or ``torch.compile``."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP object
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for micro in range(accumulate):
        batch = next(batches)
        # uint8 on the wire and through the layout change; the model makes it float (0..255).
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = batch["mask"].to(device, non_blocking=True).long()
        # Under DDP only the last micro-batch all-reduces gradients.
        skip_sync = micro < accumulate - 1 and isinstance(ddp, DistributedDataParallel)
        with ddp.no_sync() if skip_sync else contextlib.nullcontext(), autocast(device, precision):
            loss = loss_fn(model(images), target) / accumulate
        scaler.scale(loss).backward()
        total += loss.detach()
    if clip is not None:  # after the last micro-batch: the accumulated (all-reduced) gradients
        clip(optimizer, scaler)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return total


# --------------------------------------------------------------------------------------------
# The run


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm, timm's fused norm + activation layers included (torch's own
    converter would drop their activation and train another network than the one evaluated)."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


class Trainer:
    """Builds a run from the composed config and trains it. ``Trainer(cfg).fit()`` returns the summary."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.env: DistEnv = init_distributed(cfg.device)
        if not self.env.is_main:  # every rank shares train.log: only rank 0 reports progress
            logging.getLogger().setLevel(logging.WARNING)
        self.device = self.env.device
        self.run_dir = Path(cfg.paths.output_dir)
        self.precision = resolve_precision(cfg.trainer.precision, self.device)
        self.channels_last = resolve_channels_last(
            cfg.trainer.channels_last, self.device, self.precision
        )
        self.accumulate = int(cfg.trainer.accumulate)
        self.global_batch = int(cfg.dataset.batch_size) * self.env.world_size * self.accumulate
        configure_backends(self.device)
        ckpts.seed_everything(cfg.seed)  # identical initial weights on every rank

        data_cfg = cfg.dataset
        self.train_set = build_dataset(data_cfg, data_cfg.train_split, train=True)
        self.val_set = build_dataset(data_cfg, data_cfg.val_split, train=False)
        self.val_set = first_images(self.val_set, cfg.trainer.debug.get("eval_images"))
        self.meta = dataset_meta(data_cfg)  # class names and palette travel with every checkpoint

        self.model = build_model(cfg).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.env.distributed and self.device.type == "cuda" and cfg.trainer.sync_bn:
            self.model = sync_batchnorm(self.model)
            if cfg.trainer.compile:
                log.warning(
                    "trainer.compile with SyncBatchNorm: torch.compile breaks its graph at every "
                    "SyncBatchNorm (slower than it could be); trainer.sync_bn=false avoids that"
                )
        self.loss_fn = build_loss(
            cfg.loss, self.train_set, self.run_dir, self.device, self.env.is_main
        )
        self.clipper = build_grad_clipper(cfg.trainer.clip_grad_norm, self.device)
        self.ema = build_ema(cfg.trainer.ema, self.model)  # before _resume, which restores it
        self.best_metric = check_best_metric(cfg.trainer.best_metric, self.ema)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, cfg.param_groups)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.state = ckpts.TrainState()
        if self.env.rank != 0:  # each rank its own dropout stream; a resume restores them all
            torch.manual_seed(cfg.seed * 1000 + self.env.rank * 7919)
        resumed = self._resume()

        self.train_model: nn.Module = wrap_ddp(self.model, self.env)
        if cfg.trainer.compile:
            self.train_model = torch.compile(self.train_model)
        self._val_loader: torch.utils.data.DataLoader | None = None  # built at the first evaluation
        self.reporter = RunReporter(
            cfg, self.run_dir, self.env.is_main, self.state.iteration if resumed else None
        )

    # -- resume and checkpoints ----------------------------------------------------------------
    def _resume(self) -> bool:
        """Restore the run from ``trainer.resume`` (``auto``: this run folder's latest checkpoint;
        what a torchrun restart does by itself); whether a checkpoint was loaded."""
        resume = self.cfg.trainer.resume
        if not resume and elastic_restart_count() > 0:
            log.info("torchrun restarted this run: continuing from its latest checkpoint")
            resume = "auto"
        if not resume:
            return False
        if self.env.is_main:
            ckpts.remove_partial_checkpoints(self.run_dir)
        path, ckpt = (
            ckpts.load_latest_checkpoint(self.run_dir) if resume == "auto" else (Path(resume), None)
        )
        if path is None:
            log.info(
                "trainer.resume=auto: no checkpoint in %s yet, starting from scratch", self.run_dir
            )
            return False
        ckpt = ckpt or load_checkpoint(path)
        ckpts.check_resume_config(
            ckpt.get("config") or {}, OmegaConf.to_container(self.cfg, resolve=True), str(path)
        )
        load_model_weights(self.model, ckpt["model"], source=f"trainer.resume={path}")
        restore_ema(self.ema, ckpt, self.model, f"trainer.resume={path}")
        ckpts.restore_optimizer(self.optimizer, ckpt["optimizer"])
        # Rebuilt, not loaded: LambdaLR.load_state_dict would bring back the old schedule's fields.
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.schedule, start_iter=int(ckpt["iteration"])
        )
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for warning in (
            ckpts.restore_rank_rng(ckpt, self.env.rank, self.env.world_size, self.device, path),
            ckpts.data_stream_change(ckpt.get("data_position"), self._data_position(), path),
        ):
            if warning:
                log.warning(warning)
        self.state = ckpts.TrainState.from_checkpoint(ckpt)
        log.info("resumed from %s at iteration %d", path, self.state.iteration)
        return True

    def _data_position(self) -> dict[str, int]:
        return ckpts.data_position(
            self.state.iteration,
            self.accumulate,
            int(self.cfg.dataset.batch_size),
            self.env.world_size,
            int(self.cfg.seed),
        )

    def save(self, name: str, weights: nn.Module | None = None) -> Path | None:
        """Rank 0 writes ``checkpoints/<name>.pt`` atomically (``"model"``: ``weights``, default the model)."""
        rng_per_rank = all_gather_object(ckpts.rng_state(self.device))  # every rank calls save()
        if not self.env.is_main:
            return None
        state = make_checkpoint(
            (weights or self.model).state_dict(),
            OmegaConf.to_container(self.cfg, resolve=True),
            self.meta,
            iteration=self.state.iteration,
            best_miou=self.state.best_miou,
            metrics=self.state.metrics,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            rng=rng_per_rank[0],
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            rng_per_rank=rng_per_rank,
            data_position=self._data_position(),
            metrics_iteration=self.state.metrics_iteration,
            precision=self.precision,  # what validation ran in: evaluate.py's default for this run
        )
        return save_checkpoint(state, self.run_dir / CHECKPOINT_DIR / f"{name}.pt")

    def checkpoint(self) -> None:
        """``iter_XXXXXX.pt`` + ``last.pt``, keeping the newest ``trainer.keep_last``."""
        path = self.save(f"iter_{self.state.iteration:06d}")
        if path is not None:
            copy_checkpoint(path, path.parent / "last.pt")
            ckpts.prune_checkpoints(self.run_dir, int(self.cfg.trainer.keep_last))

    # -- validation ----------------------------------------------------------------------------
    def _validate(self, model: nn.Module, num_examples: int) -> EvalResult:
        """The official metric of ``model`` on the validation set (every rank takes part)."""
        broadcast_buffers(model)  # BatchNorm statistics drift apart per rank: rank 0's count
        if self._val_loader is None:
            data = self.cfg.dataset
            self._val_loader = build_eval_loader(
                self.val_set,
                data.eval_batch_size,
                data.num_workers,
                self.env.rank,
                self.env.world_size,
                pin_memory=self.device.type == "cuda",
            )
        with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG stream
            return evaluate_model(
                model,
                self._val_loader,
                self.meta["num_classes"],
                self.meta["ignore_index"],
                self.meta["class_names"],
                self.device,
                self.cfg.inference,
                precision=self.precision,
                num_examples=num_examples,
            )

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Evaluate the model (``val/*``) and its EMA (``val_ema/*``); ``best.pt`` follows ``trainer.best_metric``."""
        ema_model = self.ema.module if self.ema is not None else None
        result = self._validate(self.model, int(self.cfg.trainer.log_images))
        metrics = {f"val/{k}": float(v) for k, v in result.metrics.items()}
        if ema_model is not None:
            ema_metrics = self._validate(ema_model, 0).metrics
            metrics.update({f"{EMA_PREFIX}{k}": float(v) for k, v in ema_metrics.items()})
        self.state.metrics, self.state.metrics_iteration = metrics, self.state.iteration
        self.reporter.evaluation(self.state.iteration, metrics, result, self.meta["palette"], final)
        if self.best_metric not in metrics:
            raise ConfigError(
                f"trainer.best_metric={self.best_metric} is not an evaluation metric; "
                f"available: {sorted(metrics)}"
            )
        if metrics[self.best_metric] > self.state.best_miou:
            self.state.best_miou = metrics[self.best_metric]
            self.save("best", ema_model if self.best_metric.startswith(EMA_PREFIX) else None)
        return metrics

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        max_iters = int(cfg.schedule.max_iters)
        crop_h, crop_w = cfg.dataset.train_pipeline.crop_size
        params = count_parameters(self.model)
        batch = int(cfg.dataset.batch_size)
        with torch.random.fork_rng(devices=[]):  # neither may shift the RNG stream (exact resume)
            gflops = forward_gflops(self.model, crop_h, crop_w) if env.is_main else float("nan")
            batches = build_train_loader(
                self.train_set,
                batch,
                cfg.dataset.num_workers,
                seed=cfg.seed,
                rank=env.rank,
                world_size=env.world_size,
                start_batch=self.state.iteration * self.accumulate,
                pin_memory=self.device.type == "cuda",
            )
            batches = fixed_batches(batches, cfg.trainer.debug.overfit_batches)
        hide_bar = _bar_disabled(cfg.trainer.progress_bar)  # checked on every rank
        layout = "channels_last" if self.channels_last else "NCHW"
        log.info(
            start_line(
                params,
                gflops,
                (crop_h, crop_w),
                self.device,
                f"{self.precision}, {layout}",
                env.world_size,
                self.global_batch,
            )
        )
        preempt = PreemptionFlag()
        preempt.install()
        debug = DebugSession(cfg.trainer.debug, self.run_dir, self.device, env.rank).start()
        self.train_model.train()
        non_finite = NonFiniteGuard(self.device, self.run_dir / CHECKPOINT_DIR)
        loss_sum = torch.zeros((), device=self.device)
        n_logged, start_iter = 0, self.state.iteration
        t_log = t_start = time.perf_counter()
        last_loss = float("nan")
        bar = tqdm(
            total=max_iters,
            initial=start_iter,
            desc="train",
            dynamic_ncols=True,
            disable=hide_bar if env.is_main else True,
        )
        try:
            while self.state.iteration < max_iters:
                try:
                    loss = train_step(
                        self.train_model,
                        batches,
                        self.loss_fn,
                        self.optimizer,
                        self.scheduler,
                        self.scaler,
                        device=self.device,
                        precision=self.precision,
                        accumulate=self.accumulate,
                        channels_last=self.channels_last,
                        clip=self.clipper,
                    )
                except torch.cuda.OutOfMemoryError as e:
                    raise out_of_memory_error(
                        self.state.iteration + 1, batch, crop_h, crop_w
                    ) from e
                self.state.iteration = it = self.state.iteration + 1
                if self.ema is not None:
                    self.ema.update(self.model, step=it)
                debug.step()
                non_finite.see(loss, it)
                loss_sum += loss
                n_logged += 1
                bar.update(1)

                # The cadence: every rank takes the same branches at the same iterations.
                at_end = it == max_iters
                at_log = it % cfg.trainer.log_interval == 0 or at_end
                at_ckpt = _every(it, cfg.trainer.checkpoint_interval) or at_end
                at_eval = _every(it, cfg.trainer.eval_interval) or (
                    at_end and cfg.trainer.eval_at_end
                )
                if at_log or at_ckpt or at_eval:
                    non_finite.check()
                if at_log:
                    last_loss = loss_sum.item() / n_logged
                    lr = self.optimizer.param_groups[0]["lr"]
                    seconds = time.perf_counter() - t_log
                    row = train_row(
                        last_loss, lr, n_logged * self.global_batch, seconds, self.clipper
                    )
                    self.reporter.train(it, row, bar)
                    loss_sum.zero_()
                    n_logged, t_log = 0, time.perf_counter()
                if at_eval:
                    self.evaluate(final=at_end)
                    self.train_model.train()
                if at_ckpt:
                    self.checkpoint()
                if preempt.agreed(env, at_log):
                    non_finite.check()
                    if not at_ckpt:
                        self.checkpoint()
                    return self._finish(
                        t_start, start_iter, params, gflops, last_loss, preempt.signum
                    )
            return self._finish(t_start, start_iter, params, gflops, last_loss)
        finally:
            debug.close()
            bar.close()
            preempt.restore()
            self.reporter.close()

    def _finish(
        self,
        t_start: float,
        start_iter: int,
        params: int,
        gflops: float,
        last_loss: float,
        signum: int | None = None,
    ) -> dict[str, Any]:
        """The summary (``summary.json``) and the run's last line."""
        it = self.state.iteration
        summary = run_summary(
            self.state.metrics,
            last_loss,
            it,
            it - start_iter,
            time.perf_counter() - t_start,
            self.global_batch,
            params,
            gflops,
        )
        self.reporter.finish(summary, signum, self.state.metrics_iteration)
        return summary


def _bar_disabled(setting: str | bool) -> bool | None:
    """tqdm's ``disable`` for ``trainer.progress_bar``: ``auto`` (None) shows the bar at a terminal
    only, so that log files under SLURM or ``nohup`` get the log lines without bar redraws."""
    choices: dict[str, bool | None] = {"auto": None, "true": False, "false": True}
    value = str(setting).lower()
    if value not in choices:
        raise ConfigError(f"trainer.progress_bar must be auto, true or false; got {setting!r}")
    return choices[value]


def _every(iteration: int, interval: int | None) -> bool:
    """Whether ``iteration`` is a multiple of ``interval`` (null: never)."""
    return interval is not None and iteration % int(interval) == 0


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the composed config; returns the summary (also written to ``summary.json``).

    The process group is left on every way out, so that a rank stopping with an error does not
    leave the others waiting in a collective until its timeout.
    """
    try:
        return Trainer(cfg).fit()
    finally:
        destroy()


def optimized_metric(summary: dict[str, Any], key: str) -> float | None:
    """The value a sweeper optimises; a clear error when ``optimized_metric`` names no final metric."""
    value = summary.get(key)
    if isinstance(value, int | float) and not math.isnan(value):
        return float(value)
    available = sorted(
        k for k, v in summary.items() if isinstance(v, int | float) and k.startswith("val/")
    )
    if not available:  # the run did not evaluate (trainer.eval_at_end=false, or preempted)
        log.warning("optimized_metric=%s: this run has no evaluation result to return", key)
        return None
    raise ConfigError(
        f"optimized_metric={key!r} is not a final metric of this run; available: {available}"
    )
