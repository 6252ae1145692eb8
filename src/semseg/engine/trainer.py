"""The iteration-based training loop: DDP, mixed precision, exact resume, preemption.

Read :func:`train_step` for what one iteration does and :func:`train` for everything around it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from semseg.data import build_dataset, build_train_loader, dataset_meta, ensure_toy_dataset
from semseg.distributed import (
    DistEnv,
    all_gather_object,
    barrier,
    init_distributed,
    wrap_ddp,
)
from semseg.engine import report
from semseg.engine.checkpoint import CHECKPOINT_DIR, load_latest_checkpoint, prune_checkpoints
from semseg.engine.debug import DebugSession, first_images, fixed_batches
from semseg.engine.ema import EMA_PREFIX, build_ema, check_best_metric, restore_ema
from semseg.engine.losses import build_loss
from semseg.engine.optim import GradClipper, build_grad_clipper, build_optimizer, build_scheduler
from semseg.engine.resume import (
    TrainState,
    check_resume_config,
    data_position,
    data_stream_change,
    restore_optimizer,
    restore_rank_rng,
    rng_state,
    seed_everything,
)
from semseg.engine.stopping import (
    NonFiniteGuard,
    NonFiniteLossError,
    PreemptionFlag,
    out_of_memory_error,
)
from semseg.engine.validation import Validator, check_best_metric_present
from semseg.errors import ConfigError
from semseg.models import build_model, count_parameters, forward_gflops, load_model_weights
from semseg.models.checkpoint import (
    copy_checkpoint,
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

log = logging.getLogger(__name__)


__all__ = ["NonFiniteLossError", "Trainer", "optimized_metric", "train", "train_step"]


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

        self.train_model: nn.Module = wrap_ddp(self.model, self.env)
        if cfg.trainer.compile:
            self.train_model = torch.compile(self.train_model)

        self.validator = Validator(
            self.val_set, cfg.dataset, cfg.inference, self.meta, self.env, self.precision
        )
        self.reporter = report.RunReporter(cfg, self.run_dir, self.env.is_main, log)

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
        restore_optimizer(self.optimizer, ckpt["optimizer"])
        # Rebuilt, not loaded: LambdaLR.load_state_dict would bring back the old schedule's fields.
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.schedule, start_iter=int(ckpt["iteration"])
        )
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for warning in (
            restore_rank_rng(ckpt, self.env.rank, self.env.world_size, path),
            data_stream_change(ckpt.get("data_position"), self._data_position(), path),
        ):
            if warning:
                log.warning(warning)
        self.state = TrainState.from_checkpoint(ckpt)
        log.info("resumed from %s at iteration %d", path, self.state.iteration)

    def _data_position(self) -> dict[str, int]:
        return data_position(
            self.state.iteration,
            self.accumulate,
            int(self.cfg.dataset.batch_size),
            self.env.world_size,
            int(self.cfg.seed),
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
            precision=self.precision,  # what validation ran in: evaluate.py's default for this run
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
        ema_model = self.ema.module if self.ema is not None else None
        metrics, result = self.validator(self.model, ema_model, int(self.cfg.trainer.log_images))
        self.state.metrics, self.state.metrics_iteration = metrics, self.state.iteration
        self.reporter.evaluation(self.state.iteration, metrics, result, self.meta["palette"], final)
        check_best_metric_present(self.best_metric, metrics)
        if metrics[self.best_metric] > self.state.best_miou:
            self.state.best_miou = metrics[self.best_metric]
            self.save("best", ema_model if self.best_metric.startswith(EMA_PREFIX) else None)
        return metrics

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
            report.start_line(
                params, gflops, (crop_h, crop_w), self.device,
                f"{self.precision}, {'channels_last' if self.channels_last else 'NCHW'}",
                env.world_size, self.global_batch,
            )
        )  # fmt: skip
        step = functools.partial(
            train_step, self.train_model, batches, self.loss_fn, self.optimizer, self.scheduler,
            self.scaler, self.device, self.precision, self.accumulate, self.channels_last,
            self.clipper,
        )  # fmt: skip
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
                    raise out_of_memory_error(it + 1, batch, crop_h, crop_w) from e
                self.state.iteration = it = it + 1
                if self.ema is not None:
                    self.ema.update(self.model, step=it)
                debug.step()
                non_finite.see(loss, it)
                loss_sum += loss
                n_logged += 1
                bar.update(1)

                at_end = it == max_iters
                at_log = it % sched.log_interval == 0 or at_end
                at_ckpt = it % sched.checkpoint_interval == 0 or at_end
                at_eval = it % sched.eval_interval == 0 or (at_end and cfg.trainer.eval_at_end)
                if at_log or at_ckpt or at_eval:
                    non_finite.check()
                if at_log:
                    last_loss = loss_sum.item() / n_logged
                    lr = self.optimizer.param_groups[0]["lr"]
                    row = report.train_row(
                        last_loss, lr, n_logged * self.global_batch, time.perf_counter() - t_log,
                        self.clipper,
                    )  # fmt: skip
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
                        t_start, start_iter, params, gflops, last_loss, signum=preempt.signum
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
        state = self.state
        summary = report.run_summary(
            state.metrics, last_loss, state.iteration, state.iteration - start_iter,
            time.perf_counter() - t_start, self.global_batch, params, gflops,
        )  # fmt: skip
        self.reporter.finish(summary, signum, state.metrics_iteration)
        return summary


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
