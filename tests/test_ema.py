"""EMA of the weights and gradient clipping: numerics against a direct computation, a short run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import REPO, OneConvModel, read_jsonl, train_in_process
from omegaconf import OmegaConf

from semseg.checkpoints.file import load_checkpoint
from semseg.engine.trainer import build_ema, check_best_metric, restore_ema
from semseg.errors import ConfigError


def ema_cfg(**overrides: object):
    cfg = OmegaConf.load(REPO / "conf/trainer/ema/timm.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_ema_is_off_by_default_and_checks_its_decay():
    model = torch.nn.Linear(2, 2)
    assert OmegaConf.load(REPO / "conf/trainer/default.yaml").ema is None
    assert build_ema(None, model) is None
    for bad in (0, 1, 1.5, -0.1, True, "high", None):
        with pytest.raises(ConfigError, match=r"trainer.ema.decay=.* must be in \(0, 1\)"):
            build_ema(ema_cfg(decay=bad), model)
    with pytest.raises(ConfigError, match=r"needs an EMA: add trainer/ema=timm"):
        check_best_metric("val_ema/mIoU", None)
    with pytest.raises(ConfigError, match=r"trainer\.best_metric"):
        check_best_metric("loss", None)


def test_ema_update_matches_the_formula():
    """step 1 copies the weights, then ema = d * ema + (1 - d) * w, buffers (BN stats) included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decay = 0.75
    ema = build_ema(ema_cfg(decay=decay), model)
    expected: dict[str, torch.Tensor] = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the BN running stats
        ema.update(model, step=step)
        for key, value in model.state_dict().items():
            if not value.is_floating_point() or step == 1:
                expected[key] = value.clone()
            else:
                expected[key] = decay * expected[key] + (1 - decay) * value
    for key, value in ema.module.state_dict().items():
        assert torch.allclose(value.float(), expected[key].float(), atol=1e-6), key
    # Restoring from a checkpoint state gives the same average; one without it copies the model.
    other = build_ema(ema_cfg(decay=decay), model)
    restore_ema(other, {"ema": ema.module.state_dict()}, model, "test")
    assert all(
        torch.equal(a, b)
        for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values())
    )
    restore_ema(other, {}, model, "test")
    assert all(
        torch.equal(a, b)
        for a, b in zip(other.module.state_dict().values(), model.state_dict().values())
    )


def test_clip_grad_norm_after_accumulation_and_unscaling():
    """The update equals SGD on the summed micro-batch gradients scaled to the norm limit."""
    from semseg.engine.optim import build_grad_clipper
    from semseg.engine.trainer import train_step
    from semseg.losses import SegCrossEntropy

    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    masks = torch.randint(0, 3, (2, 8, 8), dtype=torch.uint8)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    start = [p.detach().clone() for p in conv.parameters()]

    model = OneConvModel(conv, scale=1 / 255)

    # Direct computation: gradients of the two micro-batches (each loss / 2), global norm, clip.
    loss_fn = SegCrossEntropy()
    grads = torch.autograd.grad(
        sum(loss_fn(model(images[i : i + 1]), masks[i : i + 1].long()) / 2 for i in range(2)),
        list(conv.parameters()),
    )
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    max_norm = float(norm) / 4  # the clip is active
    expected = [p - 0.5 * g * (max_norm / (norm + 1e-6)) for p, g in zip(start, grads)]

    clipper = build_grad_clipper(max_norm, "cpu")
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    # An enabled scaler multiplies the loss by 2**10: clipping must see the unscaled gradients.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = iter([{"image": images[i : i + 1], "mask": masks[i : i + 1]} for i in range(2)])
    train_step(
        model, batches, loss_fn, opt, sched, scaler, device=torch.device("cpu"),
        precision="fp32", accumulate=2, channels_last=False, clip=clipper,
    )  # fmt: skip
    for got, want in zip(conv.parameters(), expected):
        assert torch.allclose(got.detach(), want, atol=1e-6)
    assert clipper.mean_norm() == pytest.approx(float(norm), rel=1e-5)
    for bad in (0, -1.0, "big"):
        with pytest.raises(ConfigError, match=r"trainer.clip_grad_norm=.* must be a number > 0"):
            build_grad_clipper(bad, "cpu")


def test_overflowed_fp16_steps_stay_out_of_the_logged_norm():
    """A GradScaler that overflowed skips its update; its inf norm must not enter grad_norm."""
    from semseg.engine.optim import build_grad_clipper

    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    clipper = build_grad_clipper(10.0, "cpu")
    for grad in ([3.0, 4.0], [float("inf"), 0.0], [6.0, 8.0]):
        param.grad = torch.tensor(grad)
        clipper(opt, scaler)
    assert clipper.mean_norm() == pytest.approx(7.5)  # (5 + 10) / 2
    param.grad = torch.tensor([float("nan"), 0.0])
    clipper(opt, scaler)
    assert math.isnan(clipper.mean_norm())  # nothing finite to report


@pytest.mark.slow
def test_ema_clip_and_many_loggers_in_one_short_run(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    summary = train_in_process(
        toy_root,
        run_dir,
        "trainer/ema=timm",
        "trainer.ema.decay=0.5",
        "trainer.best_metric=val_ema/mIoU",
        "trainer.clip_grad_norm=1.0",
        "logger=many",
        "trainer.eval_interval=2",
        "trainer.precision=fp32",
    )
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert all(r["grad_norm"] > 0 for r in train_rows)
    evals = [r for r in rows if "val/mIoU" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["val_ema/mIoU"] <= 1 and "val_ema/IoU/road" in r for r in evals)
    last, best = (load_checkpoint(run_dir / f"checkpoints/{n}.pt") for n in ("last", "best"))
    assert last["ema"].keys() == last["model"].keys()
    assert any(not torch.equal(last["ema"][k], t) for k, t in last["model"].items())
    # best.pt follows the EMA score and holds the EMA weights of that evaluation.
    best_step = max(evals, key=lambda r: r["val_ema/mIoU"])["step"]
    assert best["iteration"] == best_step and best["best_miou"] == max(
        r["val_ema/mIoU"] for r in evals
    )
    assert all(torch.equal(best["model"][k], best["ema"][k]) for k in best["model"])
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["val_ema/mIoU"] == evals[-1]["val_ema/mIoU"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
