"""The training step's hot path: no host sync per step, one graph for torch.compile, fused
optimizers with the per-parameter loop's numbers, and the CUDA-graphs option's refusals."""

from __future__ import annotations

import collections
import copy
import logging
import math

import pytest
import torch
from helpers import compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from semseg.engine.compiled_step import build_step_forward, forward_loss
from semseg.engine.optim import build_grad_clipper, build_optimizer, build_scheduler
from semseg.engine.trainer import NonFiniteGuard, build_ema, train_step
from semseg.errors import ConfigError
from semseg.models import build_model

CPU = torch.device("cpu")
NUM_CLASSES = 19  # toy_bdd100k
# Ops that make the host wait for the device: reading a value, or an output whose size depends
# on the values (nonzero-like).
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select",
            "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}  # fmt: skip
LOSSES = {
    "ce": [],
    "ce_weighted": ["loss=ce_weighted", f"loss.class_weight=[{','.join(['1.5'] * NUM_CLASSES)}]"],
    "ohem": ["loss=ohem", "loss.min_kept=64"],
}


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops of :data:`SYNC_OPS` dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def tiny_setup(*overrides: str):
    """A narrow Semantic FPN (ResNet-18) and the run's loss and optimizer, on the CPU."""
    cfg = compose_train(
        "experiment=smoke", "device=cpu", "model.neck.out_channels=16", "model.decode_head.channels=16",
        *overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).train()
    loss_fn = instantiate(cfg.loss)
    return cfg, model, loss_fn


def synthetic_batches(batch: int = 2, size: int = 32):
    gen = torch.Generator().manual_seed(0)
    while True:
        mask = torch.randint(0, NUM_CLASSES, (batch, size, size), dtype=torch.uint8, generator=gen)
        mask[:, :4] = 255
        image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
        yield {"image": image, "mask": mask}


def sync_params():
    """Every loss (plain options), then every option (plain cross-entropy)."""
    for name, overrides in LOSSES.items():
        yield pytest.param(overrides, id=name)
    options = {
        "ema": ["trainer/ema=timm", "trainer.ema.decay=0.9"],
        "clip": ["trainer.clip_grad_norm=1.0"],
        "accumulate": ["trainer.accumulate=2"],
        "bf16": ["trainer.precision=bf16"],
        "adamw": ["optimizer=adamw"],
        "all": [
            "trainer/ema=timm",
            "trainer.ema.decay=0.9",
            "trainer.clip_grad_norm=1.0",
            "trainer.accumulate=2",
        ],
    }
    for name, overrides in options.items():
        yield pytest.param(overrides, id=name)


@pytest.mark.parametrize("overrides", list(sync_params()))
def test_no_host_sync_in_a_training_step(overrides):
    """What the loop does at a step that is not a log, eval or checkpoint step syncs nothing."""
    cfg, model, loss_fn = tiny_setup(*overrides)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    clipper = build_grad_clipper(cfg.trainer.clip_grad_norm, CPU)
    ema = build_ema(cfg.trainer.ema, model)
    guard = NonFiniteGuard(CPU, "checkpoints")
    loss_sum = torch.zeros(())
    batches = synthetic_batches()
    counts = []
    for it in (1, 2):
        with SyncCounter() as counter:
            loss = train_step(
                model, batches, loss_fn, optimizer, scheduler, scaler, device=CPU,
                precision=cfg.trainer.precision, accumulate=int(cfg.trainer.accumulate),
                clip=clipper,
            )  # fmt: skip
            if ema is not None:
                ema.update(model, step=it)
            guard.see(loss, it)
            loss_sum += loss
        counts.append(dict(counter.counts))
    assert torch.isfinite(loss_sum) and loss_sum > 0
    assert counts == [{}, {}]


@pytest.mark.parametrize(("fused", "syncs"), [(True, 0), (False, 1)])
def test_fp16_gradscaler_syncs_only_without_a_fused_optimizer(fused, syncs):
    """fp16's GradScaler must know whether the gradients overflowed: torch's for-loop optimizers
    read it on the host (one sync per step); fused ones take it as a tensor (none)."""
    cfg, model, loss_fn = tiny_setup("trainer.precision=fp16", f"optimizer.fused={fused}")
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batches = synthetic_batches(size=16)
    with SyncCounter() as counter:
        train_step(model, batches, loss_fn, optimizer, scheduler, scaler, device=CPU,
                   precision="fp16")  # fmt: skip
    assert counter.counts["_local_scalar_dense"] == syncs, counter.counts


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_compiled_forward_has_no_graph_break(loss, precision):
    """torch.compile captures forward + loss of a micro-batch in ONE graph (what CUDA graphs need)."""
    _, model, loss_fn = tiny_setup(*LOSSES[loss])
    batch = next(synthetic_batches())
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(forward_loss)(
            model, loss_fn, batch["image"], batch["mask"].long(), CPU, precision
        )
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_optimizer_matches_the_per_parameter_loop(optimizer):
    """The configs' ``fused: true`` makes the updates of torch's for-loop implementation.

    Both get the same gradients, so only the optimizers' arithmetic differs (on a Sapphire
    Rapids Xeon: equal, or one rounding apart where a tensor's size leaves a vector tail). The
    tolerance: a fused kernel evaluates the same formula in another order (FMA), at most a
    rounding of the weight (2**-24 relative) and a few of the lr-sized update per step, so
    ``steps * 2**-23 * max|w|`` per tensor.
    """
    cfg, model, _ = tiny_setup(f"optimizer={optimizer}")
    assert cfg.optimizer.fused is True
    twin = copy.deepcopy(model)
    fused = build_optimizer(cfg.optimizer, model)
    settings = OmegaConf.to_container(cfg.optimizer, resolve=True)
    loop = build_optimizer(OmegaConf.create({**settings, "fused": False, "foreach": False}), twin)
    assert fused.defaults["fused"] and not loop.defaults["foreach"]
    gen = torch.Generator().manual_seed(0)
    steps = 10
    for _ in range(steps):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    start = tiny_setup()[1].state_dict()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert not torch.equal(p, start[name]), name
        tolerance = steps * 2**-23 * float(q.detach().abs().max())
        torch.testing.assert_close(p, q, rtol=0, atol=tolerance, msg=name)


@pytest.mark.slow
def test_cuda_graphs_refuses_what_it_cannot_serve():
    with pytest.raises(ConfigError, match=r"trainer.cuda_graphs=true needs a CUDA device"):
        build_step_forward(False, True, CPU, sync_bn=False)
    with pytest.raises(ConfigError, match=r"trainer.sync_bn=false"):
        build_step_forward(True, True, torch.device("cuda", 0), sync_bn=True)
    assert build_step_forward(False, False, CPU, sync_bn=False).compile_s is None
    assert build_step_forward(True, False, CPU, sync_bn=False).mode == "default"


def test_cuda_graphs_with_accumulation_is_refused_until_a_gpu_shows_it_exact():
    """Each micro-batch replays the graphs, which may overwrite the graph-owned outputs of the
    one before: one config line until a GPU test shows eager's gradients (docs/performance.md)."""
    cuda = torch.device("cuda", 0)
    with pytest.raises(ConfigError) as info:
        build_step_forward(False, True, cuda, sync_bn=False, accumulate=2)
    message = str(info.value)
    assert message.startswith("trainer.cuda_graphs=true with trainer.accumulate=2:")
    assert "\n" not in message
    assert build_step_forward(False, True, cuda, sync_bn=False, accumulate=1).mode == (
        "reduce-overhead"
    )
    assert build_step_forward(True, False, CPU, sync_bn=False, accumulate=2).mode == "default"


def test_compile_time_is_the_first_step_and_is_logged(caplog):
    """``compile_s`` runs from the first call of the compiled forward to the second one."""
    forward = build_step_forward(True, False, CPU, sync_bn=False)
    assert math.isnan(forward.compile_s)
    forward.fn = lambda *args: torch.ones(())  # stands in for the compiled function: no compiling
    with caplog.at_level(logging.INFO, logger="semseg.engine.compiled_step"):
        forward()
        assert math.isnan(forward.compile_s)  # the first step is not over yet
        forward()
        forward()
    assert forward.compile_s >= 0 and caplog.text.count("the first step took") == 1
    assert "TORCHINDUCTOR_CACHE_DIR" in caplog.text
