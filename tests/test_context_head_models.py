"""NLNet, GCNet, DNLNet, EMANet, DMNet and APCNet: mmseg's sizes, the blocks' own behaviour
(identity at the start; EMANet's moving bases, one all-reduce under DDP; DMNet's dynamic filters
in export form), head variants the converter refuses. The forward contract, training, resume,
DDP, ONNX, the model-zoo row and the benchmark: tests/test_model_contract.py; the logits against
mmseg's own models: tests/test_mmseg_exactness.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    REPO,
    build_row,
    free_port,
)

from semseg.cli import compose_groups
from semseg.data import dataset_meta
from semseg.errors import CheckpointError
from semseg.models import (
    build_model,
    count_parameters,
    mmseg_to_checkpoint,
)
from semseg.models.context_heads import DynamicConvModule, EMAModule
from semseg.models.mmseg_conversion import recognise_mmseg

MMSEG = json.loads((REPO / "tests/fixtures/mmseg/cases.json").read_text())["cases"]
# The model each mmseg case holds (mmseg's state dict layout, tests/fixtures/mmseg/cases.json).
ZOO_CASES = {
    "nonlocal": ("nonlocal", "resnet50c_d8"),
    "gcnet": ("gcnet", "resnet50c_d8"),
    "dnlnet": ("dnlnet", "resnet50c_d8"),
    "dnlnet_r101": ("dnlnet", "resnet101c_d8"),
    "emanet": ("emanet", "resnet50c_d8"),
    "dmnet": ("dmnet", "resnet50c_d8"),
    "apcnet": ("apcnet", "resnet50c_d8"),
}


# --------------------------------------------------------------------------------------------
# The models


@pytest.mark.parametrize("case", list(ZOO_CASES))
def test_zoo_models_have_mmseg_sizes(case: str) -> None:
    """Tensor for tensor mmseg's model (its state dict, from the fixtures), on the meta device."""
    model_name, backbone = ZOO_CASES[case]
    cfg = compose_groups(
        {"model": model_name, "backbone": backbone, "dataset": "bdd100k"},
        ["backbone.pretrained=false"],
    )
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = MMSEG[case]["shapes"]
    ours = sorted(tuple(t.shape) for t in model.state_dict().values())
    assert ours == sorted(tuple(s) for s in shapes.values())
    params = {k: s for k, s in shapes.items() if k.rsplit(".", 1)[-1] in ("weight", "bias")}
    total = sum(int(np.prod(s)) for s in params.values())
    assert sum(p.numel() for p in model.parameters()) == total
    aux = sum(int(np.prod(s)) for k, s in params.items() if k.startswith("auxiliary_head."))
    assert count_parameters(model) == total - aux


def test_context_blocks_start_as_identity() -> None:
    """mmcv's init: NonLocal2d's output norm and ContextBlock's last conv are zero, so the
    blocks start as the identity (DNL's too)."""
    x = torch.randn(2, 16, 9, 11)
    for name, attr in (("nonlocal", "nl_block"), ("gcnet", "gc_block"), ("dnlnet", "dnl_block")):
        block = getattr(build_row(name).decode_head, attr).eval()
        with torch.no_grad():
            torch.testing.assert_close(block(x), x)


def test_ema_bases_move_with_momentum_in_training_only() -> None:
    """mmseg's update: bases <- (1 - m) bases + m * l2-normalised batch mean of the EM bases;
    the same input in eval leaves them; the frozen 1x1 conv gets no gradient."""
    torch.manual_seed(0)
    module = EMAModule(channels=8, num_bases=4, num_stages=3, momentum=0.1)
    start = module.bases.clone()
    torch.testing.assert_close(start.norm(dim=1), torch.ones(1, 4))
    feats = torch.randn(3, 8, 5, 6)
    module.eval()(feats)
    assert torch.equal(module.bases, start)
    snapshot = EMAModule(8, 4, 3, momentum=1.0)  # momentum 1: the batch's bases themselves
    snapshot.bases.copy_(start)
    snapshot.train()(feats)
    batch = snapshot.bases.clone()
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(1, 4))
    module.train()(feats)
    torch.testing.assert_close(module.bases, 0.9 * start + 0.1 * batch)

    model = build_row("emanet").train()
    head = model.decode_head
    before = head.ema_module.bases.clone()
    model(torch.randint(0, 256, (2, 3, 64, 64)).float())["out"].sum().backward()
    assert not torch.equal(head.ema_module.bases, before)
    assert all(p.grad is None and not p.requires_grad for p in head.ema_mid_conv.parameters())
    assert head.ema_in_conv[0].weight.grad is not None


def _ema_rank(rank: int, port: int, feats: torch.Tensor, start: torch.Tensor, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        module = EMAModule(8, 4, 3, momentum=0.1).train()
        module.bases.copy_(start)
        module(feats[rank : rank + 1])
        torch.save(module.bases, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ema_bases_are_averaged_over_ddp_ranks(tmp_path: Path) -> None:
    """Two gloo processes with one image each end with the same bases, those of one process
    with both images (the EM steps are per image; the update's batch mean spans the ranks)."""
    torch.manual_seed(0)
    feats, start = torch.randn(2, 8, 5, 6), EMAModule(8, 4, 3, 0.1).bases.clone()
    mp.spawn(_ema_rank, args=(free_port(), feats, start, tmp_path), nprocs=2)
    single = EMAModule(8, 4, 3, momentum=0.1).train()
    single.bases.copy_(start)
    single(feats)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), single.bases)


@pytest.mark.parametrize("filter_size", [1, 2, 3, 7])
def test_dynamic_convolution_export_form_equals_grouped_conv(filter_size: int) -> None:
    """DMNet's per-image filters: the sum of shifted maps (ONNX export) equals the grouped
    convolution (odd and even filter sizes, mmseg's asymmetric padding for even ones)."""
    torch.manual_seed(0)
    dcm = DynamicConvModule(filter_size, 6, 4, torch.nn.BatchNorm2d).eval()
    x = torch.randn(3, 6, 9, 11)
    filters = torch.randn(3, 4, filter_size, filter_size)
    padded = torch.nn.functional.pad(torch.randn(3, 4, 9, 11), dcm.padding)
    grouped = torch.nn.functional.conv2d(
        padded.reshape(1, 12, *padded.shape[2:]),
        filters.reshape(12, 1, filter_size, filter_size),
        groups=12,
    ).reshape(3, 4, 9, 11)
    torch.testing.assert_close(dcm._shifted_sum(padded, filters), grouped, rtol=1e-5, atol=1e-5)
    assert dcm(x).shape == (3, 4, 9, 11)


# --------------------------------------------------------------------------------------------
# The converter


@pytest.mark.slow
def test_head_variants_the_zoo_lacks_are_refused_in_one_line() -> None:
    """An mmseg NLHead in 'concatenation' mode (its concat_project conv) is not the zoo's
    embedded-Gaussian head: the converter names the tensor that does not fit, in one line."""
    shapes = {**MMSEG["nonlocal"]["shapes"],
              "decode_head.nl_block.concat_project.conv.weight": [1, 512, 1, 1]}  # fmt: skip
    weights = {k: torch.zeros(s) for k, s in shapes.items()}
    arch = recognise_mmseg(weights)
    config = compose_groups({**arch.config_groups, "dataset": "bdd100k"}, arch.overrides)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): .*concat_project") as info:
        mmseg_to_checkpoint(weights, "nl.pth", config, dataset_meta(config["dataset"]))
    assert "\n" not in str(info.value)
