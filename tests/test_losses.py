"""The loss group: reference cross-entropy, OHEM against a hand-computed case, class weights."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, compose_train, train_in_process
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from semseg.data import class_pixel_counts
from semseg.engine.losses import build_loss, enet_class_weights
from semseg.errors import ConfigError
from semseg.losses import OhemCrossEntropy, SegCrossEntropy
from semseg.models.decoders import EncoderDecoder, FCNHead

# One image, 2 classes, 6 pixels; the true class (0) has these softmax probabilities, one is ignored.
PROBS = [0.9, 0.6, 0.8, 0.95, 0.3, 0.5]
TARGET = torch.tensor([[[0, 0, 0], [0, 255, 0]]])


def two_class_logits(probs: list[float]) -> torch.Tensor:
    p = torch.tensor(probs, dtype=torch.float64).reshape(1, 1, 2, 3)
    return torch.cat([p.log(), (1 - p).log()], dim=1).float()


def test_ohem_keeps_the_pixels_mmseg_keeps():
    # Valid probabilities sorted: 0.5 0.6 0.8 0.9 0.95. min_kept=1: p_k = sorted[1] = 0.6 < thresh 0.7,
    # so the threshold is 0.7 and 0.5, 0.6 are kept. min_kept=3: p_k = sorted[3] = 0.9 wins, and
    # 0.5, 0.6, 0.8 are kept (0.9 itself is not below it). mmseg divides by all 6 pixels.
    logits = two_class_logits(PROBS)
    nll = {p: -math.log(p) for p in PROBS}
    cases = {1: (nll[0.5] + nll[0.6]) / 6, 3: (nll[0.5] + nll[0.6] + nll[0.8]) / 6}
    for min_kept, expected in cases.items():
        loss = OhemCrossEntropy(thresh=0.7, min_kept=min_kept)(logits, TARGET)
        assert loss.item() == pytest.approx(expected, rel=1e-5), min_kept
    valid = OhemCrossEntropy(thresh=0.7, min_kept=1, normalize="valid")(logits, TARGET)
    assert valid.item() == pytest.approx((nll[0.5] + nll[0.6]) / 5, rel=1e-5)
    # Only the kept pixels get a gradient.
    logits.requires_grad_(True)
    OhemCrossEntropy(thresh=0.7, min_kept=1)(logits, TARGET).backward()
    touched = logits.grad.abs().sum(1).flatten().nonzero().flatten().tolist()
    assert touched == [1, 5]


def test_ohem_with_min_kept_above_the_pixels_warns_once_and_is_plain_ce(caplog):
    logits = two_class_logits(PROBS)
    ohem = OhemCrossEntropy(min_kept=100000)
    with caplog.at_level(logging.WARNING):
        first, second = ohem(logits, TARGET), ohem(logits, TARGET)
    assert first.item() == pytest.approx(SegCrossEntropy()(logits, TARGET).item(), rel=1e-6)
    assert second.item() == first.item()
    warnings = [r for r in caplog.records if "loss.min_kept=100000" in r.getMessage()]
    assert len(warnings) == 1 and "plain cross-entropy" in warnings[0].getMessage()


def previous_ohem(loss: OhemCrossEntropy, logits: torch.Tensor, target: torch.Tensor):
    """OhemCrossEntropy.forward as it was before the threshold stayed on the device (it indexed
    the sorted probabilities with a tensor: a host sync), the reference for the values."""
    valid = target != loss.ignore_index
    safe_target = target.masked_fill(~valid, 0)
    per_pixel = F.cross_entropy(logits.float(), safe_target, reduction="none")
    with torch.no_grad():
        prob = torch.exp(-per_pixel).masked_fill(~valid, 2.0)
        batch_kept = loss.min_kept * target.shape[0]
        smallest = prob.flatten().topk(batch_kept + 1, largest=False).values
        position = (valid.sum() - 1).clamp(0, batch_kept)
        kept = valid & (prob < smallest[position].clamp_min(loss.thresh))
    weight = kept.float()
    if loss.class_weight is not None:
        weight = weight * loss.class_weight[safe_target]
    return (per_pixel * weight).sum() / loss.denominator(target)


class HostSyncs(TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (``.item()``, tensor-valued indices, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


OHEM_CASES = {
    "reference": {},
    "valid": {"normalize": "valid"},
    "weighted": {"class_weight": [0.5, 1.0, 2.0, 1.5, 3.0]},
    "few valid": {"min_kept": 300},  # fewer valid pixels than min_kept x images: the last one
    "high thresh": {"thresh": 0.99, "min_kept": 20},
}


@pytest.mark.parametrize("case", sorted(OHEM_CASES))
def test_ohem_equals_the_previous_threshold_without_a_host_sync(case: str) -> None:
    torch.manual_seed(sorted(OHEM_CASES).index(case))
    kwargs = {"min_kept": 50, **OHEM_CASES[case]}
    loss = OhemCrossEntropy(**kwargs)
    target = torch.randint(0, 5, (2, 16, 24))
    ignored = 0.8 if case == "few valid" else 0.2
    target[torch.rand(target.shape) < ignored] = 255
    logits = torch.randn(2, 5, 16, 24, requires_grad=True)
    reference = previous_ohem(loss, logits, target)
    (expected_grad,) = torch.autograd.grad(reference, logits)
    with HostSyncs() as syncs:
        value = loss(logits, target)
        value.backward()
    assert syncs.count == 0
    assert torch.equal(value, reference) and torch.equal(logits.grad, expected_grad)


def two_head_model(**aux_settings: object) -> EncoderDecoder:
    """An encoder-decoder with a decode head and an auxiliary head (``aux_settings``) on 5 classes."""
    heads = [
        FCNHead([4] * 4, 5, channels=4, num_convs=1, concat_input=False, **settings)
        for settings in ({}, aux_settings)
    ]
    return EncoderDecoder(torch.nn.Identity(), heads[0], heads[1])


def test_ohem_samples_the_decode_head_only() -> None:
    # mmseg: each head has its own loss; the zoo's auxiliary head has no pixel sampler.
    torch.manual_seed(0)
    target = torch.randint(0, 5, (2, 16, 24))
    out, aux = torch.randn(2, 2, 5, 16, 24).unbind(0)
    ohem = OhemCrossEntropy(min_kept=20)
    model = two_head_model(loss_weight=0.4, sample_pixels=False)
    both = model.loss({"out": out, "aux": aux}, target, ohem)
    assert both == ohem(out, target) + 0.4 * SegCrossEntropy()(aux, target)
    assert ohem(aux, target) < SegCrossEntropy()(aux, target)  # OHEM would drop pixels there
    sampled = two_head_model(loss_weight=0.4, sample_pixels=True)  # OHEM on both heads
    assert sampled.loss({"out": out, "aux": aux}, target, ohem) < both
    assert model.loss(out, target, ohem) == ohem(out, target)  # logits alone: the decode head's
    with HostSyncs() as syncs:
        model.loss({"out": out, "aux": aux}, target, ohem)
    assert syncs.count == 0


def test_class_weights_follow_mmseg_normalisation():
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0] = 255
    weight = [0.5, 2.0, 1.0]
    per_pixel = torch.nn.functional.cross_entropy(
        logits, target, ignore_index=255, reduction="none"
    )
    w = torch.tensor(weight)[target.clamp(max=2)] * (target != 255)
    loss_all = SegCrossEntropy(class_weight=weight)(logits, target)
    loss_valid = SegCrossEntropy(class_weight=weight, normalize="valid")(logits, target)
    assert loss_all.item() == pytest.approx((per_pixel * w).sum().item() / target.numel(), rel=1e-5)
    assert loss_valid.item() == pytest.approx(
        (per_pixel * w).sum().item() / (target != 255).sum().item(), rel=1e-5
    )


def test_enet_weights_formula():
    counts = [600, 300, 100, 0]
    weights = enet_class_weights(counts)
    raw = [1 / math.log(1.02 + c / 1000) for c in counts]
    assert weights == pytest.approx([r * 4 / sum(raw) for r in raw])
    assert (
        np.mean(weights) == pytest.approx(1.0) and weights[0] < weights[1] < weights[2] < weights[3]
    )


def loss_cfg(name: str, **overrides: object):
    cfg = OmegaConf.create(
        {"dataset": {"ignore_index": 255}, "loss": OmegaConf.load(REPO / f"conf/loss/{name}.yaml")}
    )
    for key, value in overrides.items():
        cfg.loss[key] = value
    return cfg.loss


def test_default_loss_is_the_reference():
    loss = build_loss(loss_cfg("ce"), train_set=None, run_dir="/nowhere")
    assert type(loss) is SegCrossEntropy and loss.normalize == "all" and loss.class_weight is None


def test_auto_class_weights_count_the_train_split_once(toy_root, tmp_path):
    from semseg.data import build_dataset

    cfg = compose_train("experiment=smoke", f"dataset.root={toy_root}", "loss=ce_weighted")
    train_set = build_dataset(cfg.dataset, "train", train=True)
    cache = toy_root / "class_pixels_train.json"
    cache.unlink(missing_ok=True)
    loss = build_loss(cfg.loss, train_set, tmp_path)
    # The counts are the masks' histograms, as the dataset checker computes them.
    from semseg.data.transforms import mask_histogram

    expected = sum(mask_histogram(train_set.read_label(i)[0]) for i in range(len(train_set)))
    saved = json.loads(cache.read_text())
    assert saved["class_pixels"] == expected[:19].tolist() and saved["images"] == len(train_set)
    assert loss.class_weight.tolist() == pytest.approx(enet_class_weights(expected[:19]))
    # A second build reads the cache (a changed cache shows that it is read, not recounted).
    saved["class_pixels"] = [1] * 19
    cache.write_text(json.dumps(saved))
    assert class_pixel_counts(train_set, [toy_root]).tolist() == [1] * 19
    cache.unlink()


def test_class_weights_of_the_wrong_length_name_the_key(toy_root):
    from semseg.data import build_dataset

    cfg = compose_train("experiment=smoke", f"dataset.root={toy_root}", "loss=ce_weighted")
    train_set = build_dataset(cfg.dataset, "train", train=True)
    for bad in ([1.0, 2.0], [1.0] * 18 + [-1.0], "often"):
        cfg.loss.class_weight = bad
        with pytest.raises(ConfigError, match=r"loss.class_weight.*19 numbers > 0"):
            build_loss(cfg.loss, train_set, "/nowhere")
    cfg.loss.class_weight = [2.0] * 19
    assert build_loss(cfg.loss, train_set, "/nowhere").class_weight.tolist() == [2.0] * 19


@pytest.mark.slow
def test_ohem_and_weighted_runs(toy_root: Path, tmp_path: Path, caplog):
    """One short run each: OHEM that really mines (64x64 crops, min_kept 500) and auto weights."""
    caplog.set_level(logging.INFO)
    for name, extra in (("ohem", ["loss.min_kept=500"]), ("ce_weighted", [])):
        run_dir = tmp_path / name
        caplog.clear()
        train_in_process(toy_root, run_dir, f"loss={name}", *extra, "trainer.eval_at_end=false")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["loss"]) for r in rows)
        assert "iter 4/4" in caplog.text  # the run's log is captured ...
        assert "plain cross-entropy" not in caplog.text  # ... and OHEM did not fall back
    assert (toy_root / "class_pixels_train.json").is_file()
