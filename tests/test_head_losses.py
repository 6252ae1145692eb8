"""Heads own their losses: every ``conf/model`` option's training loss (and a few gradients), with
and without an auxiliary head, for each loss group and normalisation, equals bit for bit the values
recorded before the heads computed their own losses (tests/fixtures/head_losses.json), when the
loss group's module picked the outputs by key (``aux``, ``points``).

``python tests/test_head_losses.py`` records the fixture again (with the code as it is).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import compose_train, resolved
from hydra.utils import instantiate

from semseg.checkpoints.resume import ResumeConfigError, check_resume_config
from semseg.losses import SegCrossEntropy
from semseg.models.decoders import EncoderDecoder, FCNHead

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/fixtures/head_losses.json"

D8 = ["backbone=resnet18_d8", "backbone.pretrained=false", "model.decode_head.channels=16"]
FPN = ["backbone=resnet18", "backbone.pretrained=false", "model.neck.out_channels=16"]
VIT = [
    "backbone=vit_base", "backbone.embed_dims=32", "backbone.num_heads=2",
    "backbone.num_layers=4", "backbone.out_indices=[0,1,2,3]", "backbone.img_size=[64,64]",
    "backbone.pretrained=false", "model.decode_head.channels=16",
]  # fmt: skip
HRNET = [
    "backbone=hrnet_w18", "backbone.pretrained=false", "backbone.width=4",
    "backbone.modules_per_stage=[1,1,1]", "backbone.blocks_per_branch=1",
]  # fmt: skip
# Every conf/model option, narrow: its overrides.
MODELS = {
    "fcn": D8,
    "pspnet": D8,
    "deeplabv3": D8,
    "deeplabv3plus": D8,
    "upernet": ["backbone=resnet18", "backbone.pretrained=false", "model.decode_head.channels=16"],
    "upernet_vit": VIT,
    "dpt": [*VIT, "model.decode_head.post_process_channels=[8,16,32,32]"],
    "semantic_fpn": [*FPN, "model.decode_head.channels=16"],
    "semantic_fpn_gn": [*FPN, "model.decode_head.channels=16", "model.norm_layer.num_groups=8"],
    "pointrend": [*FPN, "model.decode_head.coarse_head.channels=16", "model.decode_head.point_head.num_points=256"],
    "fcn_hr": HRNET,
    "ccnet": D8,
    "psanet": [*D8, "model.decode_head.mask_size=[15,15]"],
    "nonlocal": D8,
    "gcnet": D8,
    "dnlnet": D8,
    "emanet": [*D8, "model.decode_head.ema_channels=16", "model.decode_head.num_bases=8"],
    "dmnet": D8,
    "apcnet": D8,
}  # fmt: skip
# The models whose config has no auxiliary head, and those that cannot have one: DPT's maps come
# with class tokens (an FCN head cannot read them); fcn_hr's config sets it to null after the group.
WITHOUT_AUX = {"semantic_fpn", "semantic_fpn_gn", "pointrend", "dpt", "fcn_hr"}
NO_AUX_POSSIBLE = {"dpt", "fcn_hr"}
# PointRend with an auxiliary head (no config has one) sums its terms in mmseg's order now, the
# decode heads' (coarse, points) then the auxiliary head's, where the loss added the auxiliary term
# before the points: the loss may differ in its last bit (float addition is not associative); the
# gradients of every output are those recorded, bit for bit.
SUMMED_IN_MMSEG_ORDER = {"pointrend/aux"}
# Loss-group overrides.
OHEM = ["loss=ohem", "loss.min_kept=500"]
CLASS_WEIGHT = "[" + ",".join(f"{0.5 + 0.1 * c:.1f}" for c in range(19)) + "]"
LOSSES = {
    "ce": ["loss=ce"],
    "ce_valid": ["loss=ce", "loss.normalize=valid"],
    "ce_weighted": ["loss=ce_weighted", f"loss.class_weight={CLASS_WEIGHT}"],
    "ce_weighted_valid": [
        "loss=ce_weighted", f"loss.class_weight={CLASS_WEIGHT}", "loss.normalize=valid",
    ],
    # A low threshold: the (min_kept x images)-th smallest probability decides what is kept.
    "ohem": [*OHEM, "loss.thresh=0.01"],
    "ohem_valid": [*OHEM, "loss.thresh=0.01", "loss.normalize=valid"],
    "ohem_weighted": [*OHEM, "loss.thresh=0.01", f"loss.class_weight={CLASS_WEIGHT}"],
    "ohem_thresh": [*OHEM, "loss.thresh=0.0526"],  # near 1/19: the threshold decides
    "ohem_all_kept": ["loss=ohem"],  # min_kept above an image's pixels: plain cross-entropy
}  # fmt: skip
# {name: (loss overrides, the auxiliary head's loss weight; None: its config's, 0.4)}
LOSS_OVERRIDES = {
    **{name: (overrides, None) for name, overrides in LOSSES.items()},
    "ce_aux_weight": (["loss=ce"], 0.25),
}


def variants() -> Iterator[tuple[str, str, list[str]]]:
    """(model, "aux" | "no_aux", overrides) for every model with and without an auxiliary head."""
    for name, overrides in MODELS.items():
        model = [f"model={name}", *overrides]
        if name in WITHOUT_AUX:
            yield name, "no_aux", model
            if name not in NO_AUX_POSSIBLE:
                yield name, "aux", [*model, "model/aux_head=fcn", "model.aux_head.channels=8"]
        else:
            yield name, "no_aux", [*model, "model.aux_head=null"]
            yield name, "aux", [*model, "model.aux_head.channels=8"]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64 x 128 images (0..255) and labels with ignored (255) patches."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 128, generator=gen) * 255
    target = torch.randint(0, 19, (2, 64, 128), generator=gen)
    target[0, :10, :30] = 255
    target[1, 40:, 90:] = 255
    return images, target


def classifier_biases(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters whose gradients are recorded exactly: each head's classifier bias."""
    return {k: v for k, v in model.named_parameters() if k.endswith("classifier.bias")}


def digest(tensor: torch.Tensor | None) -> str:
    """The SHA-256 of a tensor's bytes (its first 16 hex digits): equal digests, equal tensors
    (bit for bit); "" for no gradient."""
    if tensor is None:
        return ""
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


@functools.cache
def loss_config(name: str):
    from semseg.cli import compose

    return compose("train", LOSS_OVERRIDES[name][0]).loss


def model_outputs(overrides: list[str]):
    """The narrow model in training mode and its outputs on :func:`inputs`."""
    from semseg.cli import compose
    from semseg.models import build_model

    images, _ = inputs()
    torch.manual_seed(0)
    model = build_model(compose("train", overrides)).train()
    torch.manual_seed(1)  # dropout, PointRend's points
    return model, model(images)


def loss_values(model, outputs, loss_name: str) -> dict[str, torch.Tensor | str]:
    """{"loss": the value, "grad:<classifier bias or output>": digest of its gradient}."""
    _, target = inputs()
    _, aux_weight = LOSS_OVERRIDES[loss_name]
    aux_head = model.aux_head if aux_weight is not None else None
    weight = aux_head.loss_weight if aux_head is not None else None
    if aux_head is not None:
        aux_head.loss_weight = aux_weight
    try:
        loss = model.loss(outputs, target, instantiate(loss_config(loss_name)))
    finally:
        if aux_head is not None:
            aux_head.loss_weight = weight
    params = classifier_biases(model)
    tensors = {k: v for k, v in outputs.items() if v.is_floating_point() and v.requires_grad}
    watched = {**params, **tensors}
    grads = torch.autograd.grad(loss, list(watched.values()), retain_graph=True, allow_unused=True)
    row: dict[str, torch.Tensor | str] = {"loss": loss.detach()}
    row |= {f"grad:{key}": digest(grad) for key, grad in zip(watched, grads, strict=True)}
    return row


def computed(overrides: list[str]) -> dict[str, dict[str, torch.Tensor | str]]:
    """{loss name: :func:`loss_values`} of one model variant, on one thread (a sum's order, hence
    its last bit, may depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, outputs = model_outputs(overrides)
        outputs = outputs if isinstance(outputs, dict) else {"out": outputs}
        return {loss: loss_values(model, outputs, loss) for loss in LOSS_OVERRIDES}
    finally:
        torch.set_num_threads(threads)


# Checked in the quick subset: one of each kind of head and loss path (an auxiliary head, a neck,
# a cascade, a transformer, an attention head); the others are slow (a second each).
QUICK = {
    "fcn/aux",
    "upernet/aux",
    "semantic_fpn/no_aux",
    "pointrend/no_aux",
    "dpt/no_aux",
    "ccnet/aux",
}


def variant_params() -> list:
    return [
        pytest.param(
            name, aux, overrides,
            id=f"{name}-{aux}",
            marks=() if f"{name}/{aux}" in QUICK else pytest.mark.slow,
        )
        for name, aux, overrides in variants()
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "aux", "overrides"), variant_params())
def test_losses_and_gradients_are_those_recorded(name: str, aux: str, overrides: list[str]):
    golden = json.loads(FIXTURE.read_text())[f"{name}/{aux}"]
    rows = computed(overrides)
    assert rows.keys() == golden.keys()
    for loss_name, row in rows.items():
        recorded = torch.tensor(float.fromhex(golden[loss_name]["loss"]), dtype=torch.float32)
        if f"{name}/{aux}" in SUMMED_IN_MMSEG_ORDER:  # the same terms, added in another order
            torch.testing.assert_close(row["loss"], recorded, rtol=2e-7, atol=0)
        else:
            assert torch.equal(row["loss"], recorded), (loss_name, row["loss"].item(), recorded)
        grads = {k: v for k, v in row.items() if k != "loss"}
        assert grads == {k: v for k, v in golden[loss_name].items() if k != "loss"}, loss_name


class TwoPredictions(FCNHead):
    """A head with a second prediction and a loss on each (DANet's shape): its
    :meth:`loss_by_feat` is all that says so; the model brings every logit map to the input size."""

    def forward(self, inputs: list[torch.Tensor]):
        logits = super().forward(inputs)
        return {"out": logits, "second": logits[..., ::2, ::2] * 2} if self.training else logits

    def loss_by_feat(self, outputs, target, pixel_loss):
        return super().loss_by_feat(outputs, target, pixel_loss) + self.loss_of(
            outputs["second"], target, pixel_loss
        )


class FourMaps(torch.nn.Module):
    out_channels = [3] * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[..., ::4, ::4]] * 4


def test_a_head_with_more_outputs_says_their_loss_itself() -> None:
    torch.manual_seed(0)
    head = TwoPredictions([3] * 4, 5, channels=4, num_convs=1, concat_input=False)
    model = EncoderDecoder(FourMaps(), head, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3).train()
    images, target = torch.rand(2, 3, 16, 24) * 255, torch.randint(0, 5, (2, 16, 24))
    outputs = model(images)
    assert outputs.keys() == {"out", "second"} and outputs["second"].shape == (2, 5, 16, 24)
    ce = SegCrossEntropy()
    expected = ce(outputs["out"], target) + ce(outputs["second"], target)
    assert torch.equal(model.loss(outputs, target, ce), expected)


def test_a_run_saved_before_the_heads_owned_their_losses_resumes() -> None:
    """Its config has the loss group's former home and ``loss.aux_weight``, no head loss keys."""
    new = resolved(compose_train("model=fcn"))
    old = copy.deepcopy(new)
    for key in ("loss_weight", "sample_pixels"):
        del old["model"]["aux_head"][key]
    old["loss"] |= {"_target_": "semseg.engine.losses.SegCrossEntropy", "aux_weight": 0.4}
    changes = check_resume_config(old, new, "old.pt")
    assert changes["loss._target_"] == (old["loss"]["_target_"], "semseg.losses.SegCrossEntropy")
    assert changes["model.aux_head.loss_weight"] == (None, 0.4)
    old["model"]["aux_head"]["channels"] = 128  # an architecture change still stops the run
    with pytest.raises(ResumeConfigError, match=r"model\.aux_head\.channels"):
        check_resume_config(old, new, "old.pt")


def record() -> None:
    golden = {}
    for name, aux, overrides in variants():
        rows = computed(overrides)
        golden[f"{name}/{aux}"] = {
            loss: {**row, "loss": float(row["loss"]).hex()} for loss, row in rows.items()
        }
        print(name, aux, {k: round(v["loss"].item(), 5) for k, v in rows.items()})
    FIXTURE.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    record()
