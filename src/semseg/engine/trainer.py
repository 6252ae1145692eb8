"""The iteration-based training loop: DDP, mixed precision, exact resume, preemption.

Read :func:`train_step` for what one iteration does and :func:`train` for everything around it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from semseg.data import build_dataset, build_eval_loader, build_train_loader, ensure_toy_dataset
from semseg.engine.checkpoint import CHECKPOINT_DIR, load_latest_checkpoint, prune_checkpoints
from semseg.engine.debug import DebugSession, first_images, fixed_batches
from semseg.engine.distributed import (
    DistEnv,
    all_gather_object,
    all_reduce_max,
    barrier,
    broadcast_buffers,
    init_distributed,
)
from semseg.engine.ema import EMA_PREFIX, build_ema, check_best_metric, restore_ema
from semseg.engine.losses import build_loss
from semseg.engine.optim import GradClipper, build_grad_clipper, build_optimizer, build_scheduler
from semseg.engine.resume import (
    check_resume_config,
    restore_rank_rng,
    rng_state,
    seed_everything,
)
from semseg.errors import ConfigError, UserError
from semseg.evaluation.inference import evaluate_model
from semseg.models import build_model, count_parameters, forward_gflops, load_model_weights
from semseg.models.checkpoint import (
    copy_checkpoint,
    dataset_meta,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from semseg.runtime import (
    autocast,
    configure_backends,
    resolve_channels_last,
    resolve_precision,
)
from semseg.tracking import RunRecorder, build_logger

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; the last good checkpoint is left untouched."""


# --------------------------------------------------------------------------------------------
# Small pieces


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


@dataclass
class TrainState:
    """Everything that a checkpoint restores."""

    iteration: int = 0
    best_miou: float = -1.0
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_iteration: int | None = None  # the iteration ``metrics`` were evaluated at


# --------------------------------------------------------------------------------------------
# One iteration


def train_step(
    model: nn.Module,
    batches: Any,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    precision: str,
    accumulate: int,
    channels_last: bool,
    clip: GradClipper | None = None,
) -> torch.Tensor:
    """Forward, backward and update over ``accumulate`` micro-batches; returns the loss on the device."""
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
        sync = micro == accumulate - 1 or not isinstance(model, DistributedDataParallel)
        with (
            contextlib.nullcontext() if sync else model.no_sync(),
            autocast(device, precision),
        ):
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


class Trainer:
    """Builds a run from the composed config and trains it. ``Trainer(cfg).fit()`` returns the summary."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.env: DistEnv = init_distributed(cfg.trainer.device)
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
        seed_everything(cfg.seed)  # identical initial weights on every rank

        data_cfg = cfg.dataset
        if data_cfg.get("generate") is not None:
            if self.env.is_main:
                ensure_toy_dataset(data_cfg)
            barrier()
        self.train_set = build_dataset(data_cfg, data_cfg.train_split, train=True)
        self.val_set = build_dataset(data_cfg, data_cfg.val_split, train=False)
        self.val_set = first_images(self.val_set, cfg.trainer.debug.get("eval_images"))
        self.meta = dataset_meta(data_cfg)  # class names and palette travel with every checkpoint

        self.model = build_model(cfg).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.env.distributed and self.device.type == "cuda" and cfg.trainer.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.loss_fn = build_loss(
            cfg.loss, self.train_set, self.run_dir, self.device, self.env.is_main
        )
        self.clipper = build_grad_clipper(cfg.trainer.clip_grad_norm, self.device)
        self.ema = build_ema(cfg.trainer.ema, self.model)  # before _resume, which restores it
        self.best_metric = check_best_metric(cfg.trainer.best_metric, self.ema)
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.state = TrainState()
        if self.env.rank != 0:  # each rank its own dropout stream; a resume restores them all
            torch.manual_seed(cfg.seed * 1000 + self.env.rank * 7919)
        self._resume()

        self.train_model: nn.Module = self.model
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.trainer.compile:
            self.train_model = torch.compile(self.train_model)

        self._eval_loader = None
        self.recorder = RunRecorder(self.run_dir) if self.env.is_main else None
        self.logger = build_logger(
            cfg.get("logger") or {"_target_": "semseg.tracking.NullLogger"},
            self.run_dir,
            OmegaConf.to_container(cfg, resolve=True),
            is_main=self.env.is_main,
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def _resume(self) -> None:
        resume = self.cfg.trainer.resume
        if not resume:
            return
        path, ckpt = (
            load_latest_checkpoint(self.run_dir) if resume == "auto" else (Path(resume), None)
        )
        if path is None:
            log.info(
                "trainer.resume=auto: no checkpoint in %s yet, starting from scratch", self.run_dir
            )
            return
        ckpt = ckpt or load_checkpoint(path)
        check_resume_config(
            ckpt.get("config") or {}, OmegaConf.to_container(self.cfg, resolve=True), str(path)
        )
        load_model_weights(self.model, ckpt["model"], source=f"trainer.resume={path}")
        restore_ema(self.ema, ckpt, self.model, f"trainer.resume={path}")
        # Moments and step counts come from the checkpoint, hyper-parameters from this run's config.
        config_hparams = [
            {k: v for k, v in group.items() if k != "params"}
            for group in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, hparams in zip(self.optimizer.param_groups, config_hparams):
            group.update(hparams)
        iteration = int(ckpt["iteration"])
        # Rebuilt, not loaded: LambdaLR.load_state_dict would bring back the old schedule's fields.
        self.scheduler = build_scheduler(self.optimizer, self.cfg.schedule, start_iter=iteration)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if not restore_rank_rng(ckpt, self.env.rank, self.env.world_size):
            log.warning(
                "%s holds no RNG state for rank %d of %d processes: this rank's random streams "
                "start fresh (the resumed run is not bit-exact)",
                path,
                self.env.rank,
                self.env.world_size,
            )
        self._check_data_position(ckpt.get("data_position"), path)
        self.state = TrainState(
            iteration,
            float(ckpt.get("best_miou", -1.0)),
            dict(ckpt.get("metrics", {})),
            ckpt.get("metrics_iteration"),
        )
        log.info("resumed from %s at iteration %d", path, self.state.iteration)

    def _data_position(self) -> dict[str, int]:
        """Where each rank is in its data stream (a pure function of these numbers, data/loader.py)."""
        return {
            "batches": self.state.iteration * self.accumulate,
            "batch_size": int(self.cfg.dataset.batch_size),
            "world_size": self.env.world_size,
            "seed": int(self.cfg.seed),
        }

    def _check_data_position(self, saved: dict[str, int] | None, path: Path) -> None:
        if not saved:
            return
        now = {**self._data_position(), "batches": saved["batches"]}
        changed = {k: (v, now[k]) for k, v in saved.items() if now.get(k) != v}
        if changed:
            log.warning(
                "%s: the data stream differs from the checkpoint's (%s): the resumed run sees "
                "other samples than an uninterrupted one would",
                path,
                ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
            )

    def save(self, name: str, weights: nn.Module | None = None) -> Path | None:
        """Rank 0 writes ``checkpoints/<name>.pt`` atomically (``"model"``: ``weights``, default the model)."""
        rng_per_rank = all_gather_object(rng_state())  # collective: every rank calls save()
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
        )
        return save_checkpoint(state, self.run_dir / CHECKPOINT_DIR / f"{name}.pt")

    def checkpoint(self) -> None:
        """``iter_XXXXXX.pt`` + ``last.pt``, keeping the newest ``trainer.keep_last``."""
        path = self.save(f"iter_{self.state.iteration:06d}")
        if path is not None:
            copy_checkpoint(path, path.parent / "last.pt")
            prune_checkpoints(self.run_dir, int(self.cfg.trainer.keep_last))

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Evaluate the model (``val/*``) and its EMA (``val_ema/*``); ``best.pt`` follows ``trainer.best_metric``."""
        result = self._evaluate_weights(self.model, int(self.cfg.trainer.log_images))
        metrics = {f"val/{k}": float(v) for k, v in result.metrics.items()}
        if self.ema is not None:
            ema_metrics = self._evaluate_weights(self.ema.module, 0).metrics
            metrics.update({f"{EMA_PREFIX}{k}": float(v) for k, v in ema_metrics.items()})
        self.state.metrics, self.state.metrics_iteration = metrics, self.state.iteration
        if self.env.is_main:
            self.recorder.log(self.state.iteration, metrics)
            self.logger.log_metrics(metrics, self.state.iteration)
            self.logger.log_predictions(result.examples, self.meta["palette"], self.state.iteration)
            ema_miou = metrics.get(f"{EMA_PREFIX}mIoU")
            log.info(
                "iter %d: val mIoU %.2f%%  pixel acc %.2f%%%s",
                self.state.iteration,
                100 * metrics["val/mIoU"],
                100 * metrics["val/pixel_acc"],
                "" if ema_miou is None else f"  EMA mIoU {100 * ema_miou:.2f}%",
            )
            if final:  # for the analysis notebook
                # Here, not at the top: tracking.runs brings pandas, which start-up does without.
                from semseg.tracking.runs import save_eval_artifacts

                save_eval_artifacts(self.run_dir, result.confmat, result.examples)
        if self.best_metric not in metrics:
            raise ConfigError(
                f"trainer.best_metric={self.best_metric} is not an evaluation metric; "
                f"available: {sorted(metrics)}"
            )
        if metrics[self.best_metric] > self.state.best_miou:
            self.state.best_miou = metrics[self.best_metric]
            self.save("best", self.ema.module if self.best_metric.startswith(EMA_PREFIX) else None)
        return metrics

    def _evaluate_weights(self, model: nn.Module, num_examples: int) -> Any:
        """The official metric of ``model`` on the validation set (every rank takes part)."""
        data_cfg = self.cfg.dataset
        broadcast_buffers(model)
        if self._eval_loader is None:
            self._eval_loader = build_eval_loader(
                self.val_set,
                data_cfg.eval_batch_size,
                data_cfg.num_workers,
                rank=self.env.rank,
                world_size=self.env.world_size,
            )
        with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG stream
            return evaluate_model(
                model,
                self._eval_loader,
                self.meta["num_classes"],
                self.meta["ignore_index"],
                self.meta["class_names"],
                self.device,
                self.cfg.inference,
                precision=self.precision,
                num_examples=num_examples,
            )

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, sched, env = self.cfg, self.cfg.schedule, self.env
        max_iters = int(sched.max_iters)
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
        log.info(
            f"model: {params / 1e6:.2f}M parameters, {gflops:.1f} GFLOPs forward at "
            f"{crop_h}x{crop_w}; {self.device}, precision {self.precision}, {env.world_size} "
            f"process(es), global batch {self.global_batch}"
        )
        step = functools.partial(
            train_step, self.train_model, batches, self.loss_fn, self.optimizer, self.scheduler,
            self.scaler, self.device, self.precision, self.accumulate, self.channels_last,
            self.clipper,
        )  # fmt: skip
        preempt = PreemptionFlag()
        preempt.install()
        debug = DebugSession(cfg.trainer.debug, self.run_dir, self.device, env.rank).start()
        self.train_model.train()
        # The first iteration whose loss was NaN/inf, kept on the device (read at log steps only).
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        n_logged, start_iter = 0, self.state.iteration
        t_log = t_start = time.perf_counter()
        last_loss = float("nan")
        bar = tqdm(
            total=max_iters,
            initial=start_iter,
            disable=not (env.is_main and cfg.trainer.progress_bar),
            dynamic_ncols=True,
            desc="train",
        )
        try:
            while self.state.iteration < max_iters:
                it = self.state.iteration
                try:
                    loss = step()
                except torch.cuda.OutOfMemoryError as e:
                    raise UserError(
                        f"CUDA out of memory at iteration {it + 1} with dataset.batch_size={batch} and "
                        f"crop {crop_h}x{crop_w}: lower dataset.batch_size (and raise trainer.accumulate "
                        f"to keep the global batch) or use trainer.precision=bf16"
                    ) from e
                self.state.iteration = it = it + 1
                if self.ema is not None:
                    self.ema.update(self.model, step=it)
                debug.step()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), it, first_bad)
                loss_sum += loss
                n_logged += 1
                bar.update(1)

                at_end = it == max_iters
                at_log = it % sched.log_interval == 0 or at_end
                at_ckpt = it % sched.checkpoint_interval == 0 or at_end
                at_eval = it % sched.eval_interval == 0 or (at_end and cfg.trainer.eval_at_end)
                if at_log or at_ckpt or at_eval:
                    self._stop_if_non_finite(first_bad)
                if at_log:
                    last_loss = self._log_train(
                        it, loss_sum.item() / n_logged, n_logged, t_log, bar
                    )
                    loss_sum.zero_()
                    n_logged, t_log = 0, time.perf_counter()
                if at_eval:
                    self.evaluate(final=at_end)
                    self.train_model.train()
                if at_ckpt:
                    self.checkpoint()
                if self._preempted(preempt, at_log):
                    self._stop_if_non_finite(first_bad)
                    if not at_ckpt:
                        self.checkpoint()
                    return self._finish(
                        t_start, start_iter, params, gflops, last_loss, signum=preempt.signum
                    )
            return self._finish(t_start, start_iter, params, gflops, last_loss)
        finally:
            debug.close()
            bar.close()
            preempt.restore()
            self.logger.finish()

    def _log_train(self, it: int, loss: float, steps: int, t_log: float, bar: tqdm) -> float:
        """One ``metrics.jsonl`` row, W&B point, progress-bar update and log line (rank 0)."""
        row = {
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": steps * self.global_batch / (time.perf_counter() - t_log),
        }
        if self.clipper is not None:  # the mean pre-clip gradient norm since the last log step
            row["grad_norm"] = self.clipper.mean_norm()
        if self.env.is_main:
            self.recorder.log(it, row)
            self.logger.log_metrics({f"train/{k}": v for k, v in row.items()}, it)
            bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.1f}"
            )
            log.info(
                "iter %d/%d  loss %.4f  lr %.3e  %.1f img/s",
                it,
                self.cfg.schedule.max_iters,
                loss,
                row["lr"],
                row["img_per_s"],
            )
        return loss

    def _preempted(self, preempt: PreemptionFlag, at_log: bool) -> bool:
        if not self.env.distributed:
            return preempt.signum is not None
        # Ranks agree (one tiny all-reduce) at log steps, so that all of them stop at the same step.
        return at_log and all_reduce_max(float(preempt.signum or 0), self.device) > 0

    def _stop_if_non_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad.item())
        if bad >= 0:
            raise NonFiniteLossError(
                f"the loss became NaN/inf at iteration {bad}; stopped without writing a checkpoint "
                f"(the last good one is in {self.run_dir / CHECKPOINT_DIR}). Lower optimizer.lr or use "
                f"trainer.precision=fp32"
            )

    def _finish(
        self,
        t_start: float,
        start_iter: int,
        params: int,
        gflops: float,
        last_loss: float,
        signum: int | None = None,
    ) -> dict[str, Any]:
        wall = time.perf_counter() - t_start
        steps = self.state.iteration - start_iter
        summary = {
            **self.state.metrics,
            "loss": last_loss,
            "steps": self.state.iteration,
            "wall_s": wall,
            "img_per_s": steps * self.global_batch / wall if wall > 0 else float("nan"),
            "params": params,
            "gflops": gflops,
        }
        if self.env.is_main:
            self.recorder.write_summary(summary)
            self.logger.log_summary(summary)
            if signum is not None:
                log.warning(self._stopped_message(signum))
            elif "val/mIoU" in summary:
                log.info(
                    "final val mIoU: %.2f%% (run folder %s)",
                    100 * summary["val/mIoU"],
                    self.run_dir,
                )
        return summary

    def _stopped_message(self, signum: int) -> str:
        """The last line of a preempted run: where it stopped, its last evaluation, how to go on."""
        state = self.state
        last_eval = (
            f"last val mIoU {100 * state.metrics['val/mIoU']:.2f}% (iteration {state.metrics_iteration})"
            if "val/mIoU" in state.metrics
            else "no evaluation yet"
        )
        return (
            f"stopped at iteration {state.iteration} of {self.cfg.schedule.max_iters} by signal "
            f"{signal.Signals(signum).name}; {last_eval}; checkpoints/last.pt saved; continue with "
            f"trainer.resume=auto hydra.run.dir={self.run_dir}"
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the composed config; returns the summary (also written to ``summary.json``)."""
    return Trainer(cfg).fit()


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
