"""Training: a composed config in, a trained run folder out (DDP, mixed precision, exact resume).

Read it top-down: what stops a run early, the weights' moving average, ONE iteration
(:func:`train_step`), then :class:`Trainer`: set-up, resume, checkpoints, validation, and
:meth:`Trainer.fit`, the loop with its log / eval / checkpoint / stop cadence and its ending.
What a run reports is :mod:`semseg.tracking.report`'s; the checkpoints are :mod:`semseg.checkpoints`'.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from semseg.checkpoints.file import load_checkpoint, make_checkpoint, save_checkpoint
from semseg.checkpoints.resume import (
    TrainState,
    check_resume_config,
    data_position,
    data_stream_change,
    restore_optimizer,
)
from semseg.checkpoints.rng import restore_rank_rng, rng_state, seed_everything
from semseg.checkpoints.run_folder import (
    CHECKPOINT_DIR,
    checkpoint_path,
    load_latest_checkpoint,
    remove_partial_checkpoints,
    save_iteration_checkpoint,
)
from semseg.data import build_dataset, build_eval_loader, build_train_loader, dataset_meta
from semseg.distributed import (
    DistEnv,
    PeerFailureWatch,
    all_gather_object,
    all_reduce_max,
    broadcast_buffers,
    collective_timeout,
    destroy,
    elastic_restart_count,
    get_rank,
    init_distributed,
    peer_failure,
    publish_failure,
    wrap_ddp,
)
from semseg.engine.compiled_step import build_step_forward, forward_loss
from semseg.engine.debug import DebugSession, first_images, fixed_batches
from semseg.engine.failures import FAILURE_FILE, failure_to_repeat, record_failure
from semseg.engine.losses import build_loss
from semseg.engine.optim import GradClipper, build_grad_clipper, build_optimizer, build_scheduler
from semseg.errors import ConfigError, UserError
from semseg.evaluation.inference import EvalResult, evaluate_model
from semseg.models import build_model, count_parameters, forward_gflops, load_model_weights
from semseg.runtime import configure_backends, resolve_channels_last, resolve_precision
from semseg.tracking.report import EMA_PREFIX, RunReporter, run_summary, start_line, train_row

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "Trainer", "optimized_metric", "train", "train_step"]


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

    def __enter__(self) -> PreemptionFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. some launchers)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
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
    forward: Callable[..., torch.Tensor] = forward_loss,
) -> torch.Tensor:
    """Forward, backward and update over ``accumulate`` micro-batches; returns the loss on the
    device (no host sync). ``model`` may be wrapped in DDP; ``forward`` computes a micro-batch's
    loss (:func:`~semseg.engine.compiled_step.forward_loss`, or its compiled :class:`StepForward`)."""
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
        skip_sync = micro < accumulate - 1 and isinstance(model, DistributedDataParallel)
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            loss = forward(model, loss_fn, images, target, device, precision) / accumulate
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


class LogWindow:
    """The losses since the last log step, summed on the device (no host sync in between), and
    the steps and time they took."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.restart()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def read(self) -> tuple[float, int, float]:
        """(mean loss, steps, seconds) since the last restart (one host sync)."""
        return self.loss_sum.item() / self.steps, self.steps, time.perf_counter() - self.since

    def restart(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.since = 0, time.perf_counter()


class Trainer:
    """Builds a run from the composed config and trains it. ``Trainer(cfg).fit()`` returns the summary."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.env: DistEnv = init_distributed(
            cfg.device, collective_timeout(cfg.trainer.get("dist_timeout"))
        )
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
        configure_backends(self.device, self.precision)
        seed_everything(cfg.seed)  # identical initial weights on every rank

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
        self.state = TrainState()
        if self.env.rank != 0:  # each rank its own dropout stream; a resume restores them all
            torch.manual_seed(cfg.seed * 1000 + self.env.rank * 7919)
        resumed = self._resume()

        self.train_model: nn.Module = wrap_ddp(self.model, self.env)
        self.forward = build_step_forward(
            bool(cfg.trainer.compile),
            bool(cfg.trainer.cuda_graphs),
            self.device,
            sync_bn=self.env.distributed and self.device.type == "cuda" and cfg.trainer.sync_bn,
            accumulate=self.accumulate,
        )
        self._val_loader: torch.utils.data.DataLoader | None = None  # built at the first evaluation
        self.reporter = RunReporter(
            cfg, self.run_dir, self.env.is_main, self.state.iteration if resumed else None
        )

    # -- resume and checkpoints ----------------------------------------------------------------
    def _resume(self) -> bool:
        """Restore the run from ``trainer.resume`` (``auto``: this run folder's latest checkpoint);
        whether a checkpoint was loaded. A torchrun restart continues its own run: from the run
        folder's newest valid checkpoint whatever ``trainer.resume`` says (an explicit path
        would rewind it to where the first start began), from ``trainer.resume`` only while the
        folder holds none yet."""
        resume, restarts = self.cfg.trainer.resume, elastic_restart_count()
        if not resume and restarts == 0:
            return False
        if self.env.is_main:
            remove_partial_checkpoints(self.run_dir)
        path, ckpt = None, None
        if restarts > 0:
            path, ckpt = load_latest_checkpoint(self.run_dir)
            if path is not None:
                log.info(
                    "torchrun restart %d: continuing this run from its newest checkpoint %s",
                    restarts,
                    path,
                )
        if path is None and resume:
            path, ckpt = (
                load_latest_checkpoint(self.run_dir) if resume == "auto" else (Path(resume), None)
            )
            if path is None:
                log.info(
                    "trainer.resume=auto: no checkpoint in %s yet, starting from scratch",
                    self.run_dir,
                )
        if path is None:
            return False
        ckpt = ckpt or load_checkpoint(path)
        check_resume_config(
            ckpt.get("config") or {}, OmegaConf.to_container(self.cfg, resolve=True), str(path)
        )
        load_model_weights(self.model, ckpt["model"], source=f"trainer.resume={path}")
        restore_ema(self.ema, ckpt, self.model, f"trainer.resume={path}")
        restore_optimizer(self.optimizer, ckpt["optimizer"])
        # Rebuilt, not loaded: LambdaLR.load_state_dict would bring back the old schedule's fields.
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.schedule, start_iter=int(ckpt["iteration"])
        )
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for warning in (
            restore_rank_rng(ckpt, self.env.rank, self.env.world_size, self.device, path),
            data_stream_change(ckpt.get("data_position"), self._data_position(), path),
        ):
            if warning:
                log.warning(warning)
        self.state = TrainState.from_checkpoint(ckpt)
        log.info("resumed from %s at iteration %d", path, self.state.iteration)
        return True

    def _data_position(self) -> dict[str, int]:
        return data_position(
            self.state.iteration,
            self.accumulate,
            int(self.cfg.dataset.batch_size),
            self.env.world_size,
            int(self.cfg.seed),
        )

    def _checkpoint_state(self, weights: nn.Module | None = None) -> dict[str, Any] | None:
        """This run's checkpoint (``"model"``: ``weights``, default the model) on rank 0, None on
        the others; every rank calls it (each rank's RNG states travel to rank 0)."""
        rng_per_rank = all_gather_object(rng_state(self.device))
        if not self.env.is_main:
            return None
        return make_checkpoint(
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

    def save(self, name: str, weights: nn.Module | None = None) -> Path | None:
        """Rank 0 writes ``checkpoints/<name>.pt`` atomically (``"model"``: ``weights``, default the model)."""
        state = self._checkpoint_state(weights)
        return (
            None if state is None else save_checkpoint(state, checkpoint_path(self.run_dir, name))
        )

    def checkpoint(self) -> None:
        """``iter_XXXXXX.pt`` + ``last.pt``, keeping the newest ``trainer.keep_last``."""
        state = self._checkpoint_state()
        if state is not None:
            save_iteration_checkpoint(state, self.run_dir, int(self.cfg.trainer.keep_last))

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
                ignored_class=self.meta.get("toolkit_ignored_class"),
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
        """Train to ``schedule.max_iters``, or until a stop signal; returns the summary."""
        trainer, eval_at_end = self.cfg.trainer, self.cfg.trainer.eval_at_end
        max_iters = int(self.cfg.schedule.max_iters)
        with torch.random.fork_rng(devices=[]):  # neither may shift the RNG stream (exact resume)
            gflops = self._forward_gflops()
            batches = self._train_batches()
        self._log_start(gflops)
        with contextlib.ExitStack() as ending:
            ending.callback(self.reporter.close)
            preempt = ending.enter_context(PreemptionFlag())
            bar = ending.enter_context(self._progress_bar(max_iters))
            debug = ending.enter_context(self._debug_session())
            self.train_model.train()
            non_finite = NonFiniteGuard(self.device, self.run_dir / CHECKPOINT_DIR)
            start_iter, start_time = self.state.iteration, time.perf_counter()
            window = LogWindow(self.device)
            last_loss, stopped_by = float("nan"), None
            while self.state.iteration < max_iters:
                loss = self._step(batches)
                it = self.state.iteration
                debug.step()
                non_finite.see(loss, it)
                window.add(loss)
                bar.update(1)

                # The cadence: every rank takes the same branches at the same iterations.
                at_end = it == max_iters
                at_log = it % trainer.log_interval == 0 or at_end
                at_ckpt = _every(it, trainer.checkpoint_interval) or at_end
                at_eval = _every(it, trainer.eval_interval) or (at_end and eval_at_end)
                if at_log or at_ckpt or at_eval:
                    non_finite.check()
                if at_log:
                    last_loss = self._log_train(window, bar)
                if at_eval:
                    self.evaluate(final=at_end)
                    self.train_model.train()
                if at_ckpt:
                    self.checkpoint()
                if preempt.agreed(self.env, at_log):
                    non_finite.check()
                    if not at_ckpt:
                        self.checkpoint()
                    stopped_by = preempt.signum
                    break
            return self._finish(start_time, start_iter, gflops, last_loss, stopped_by)

    def _forward_gflops(self) -> float:
        """The model's forward GFLOPs at the training crop (rank 0 only: NaN elsewhere)."""
        if not self.env.is_main:
            return float("nan")
        return forward_gflops(self.model, *self.cfg.dataset.train_pipeline.crop_size)

    def _train_batches(self) -> Iterator[dict[str, Any]]:
        """This rank's training batches from the run's position in the data stream on."""
        data = self.cfg.dataset
        batches = build_train_loader(
            self.train_set,
            int(data.batch_size),
            data.num_workers,
            seed=self.cfg.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            start_batch=self.state.iteration * self.accumulate,
            pin_memory=self.device.type == "cuda",
        )
        return fixed_batches(batches, self.cfg.trainer.debug.overfit_batches)

    def _log_start(self, gflops: float) -> None:
        layout = "channels_last" if self.channels_last else "NCHW"
        log.info(
            start_line(
                count_parameters(self.model),
                gflops,
                tuple(self.cfg.dataset.train_pipeline.crop_size),
                self.device,
                f"{self.precision}, {layout}",
                self.env.world_size,
                self.global_batch,
            )
        )

    def _progress_bar(self, max_iters: int) -> tqdm:
        """Rank 0's bar of ``trainer.progress_bar`` (the setting is checked on every rank)."""
        hide = _bar_disabled(self.cfg.trainer.progress_bar)
        return tqdm(
            total=max_iters,
            initial=self.state.iteration,
            desc="train",
            dynamic_ncols=True,
            disable=hide if self.env.is_main else True,
        )

    def _debug_session(self) -> DebugSession:
        """Anomaly detection and the profiler of ``trainer.debug`` (a context manager)."""
        return DebugSession(self.cfg.trainer.debug, self.run_dir, self.device, self.env.rank)

    def _step(self, batches: Iterator[dict[str, Any]]) -> torch.Tensor:
        """One iteration (:func:`train_step`) and the EMA update; the loss, on the device."""
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
                forward=self.forward,
            )
        except torch.cuda.OutOfMemoryError as e:
            crop_h, crop_w = self.cfg.dataset.train_pipeline.crop_size
            batch = int(self.cfg.dataset.batch_size)
            raise out_of_memory_error(self.state.iteration + 1, batch, crop_h, crop_w) from e
        self.state.iteration += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.iteration)
        return loss

    def _log_train(self, window: LogWindow, bar: tqdm) -> float:
        """Report the training figures since the last log step; their mean loss."""
        loss, steps, seconds = window.read()
        row = train_row(
            loss,
            self.optimizer.param_groups[0]["lr"],
            steps * self.global_batch,
            seconds,
            self.clipper.mean_norm() if self.clipper is not None else None,
        )
        self.reporter.train(self.state.iteration, row, bar)
        window.restart()
        return loss

    def _finish(
        self,
        start_time: float,
        start_iter: int,
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
            time.perf_counter() - start_time,
            self.global_batch,
            count_parameters(self.model),
            gflops,
        )
        if self.forward.compile_s is not None:  # trainer.compile / cuda_graphs
            summary["compile_s"] = self.forward.compile_s
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

    A failure no restart can fix (a :class:`UserError`) is recorded in the run folder, and a
    restarted worker of the same job stops at once with its line (:mod:`.failures`). A rank
    that fails tells the others, which leave with its line (:class:`PeerFailureWatch`); the
    process group is left on every way out.
    """
    run_dir = Path(cfg.paths.output_dir)
    repeated = failure_to_repeat(run_dir)
    if repeated is not None:
        if os.environ.get("RANK", "0") == "0":  # one line in the shared train.log
            log.error(
                "an earlier attempt of this job stopped with a failure a restart cannot fix "
                "(%s): not training again; fix the cause, then start the run anew "
                "(trainer.resume=auto hydra.run.dir=%s)",
                run_dir / FAILURE_FILE,
                run_dir,
            )
        raise UserError(repeated)
    try:
        with PeerFailureWatch():
            return Trainer(cfg).fit()
    except UserError as e:
        publish_failure(str(e), final=True)
        record_failure(run_dir, str(e))
        raise
    except Exception as e:
        peer = peer_failure()
        if peer is not None:  # released from a collective by a peer's failure: its line
            raise UserError(peer) from e
        publish_failure(f"rank {get_rank()} crashed: {type(e).__name__}: {_first_line(e)}")
        raise
    finally:
        destroy()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


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
