"""Inference modes, the evaluation loop and the prediction files, with tiny stand-in models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from semseg.errors import ConfigError
from semseg.evaluation.export import colorize, overlay, save_prediction
from semseg.evaluation.inference import evaluate_model, inference_kwargs, predict_logits
from semseg.evaluation.metrics import SegmentationMetric, evaluate_mask_folders, summarize

K = 5
NAMES = [f"c{i}" for i in range(K)]
PALETTE = [[10 * i, 20 * i, 30 * i + 5] for i in range(K)]


def conv_model(kernel: int = 3, symmetric: bool = False, seed: int = 0) -> nn.Module:
    """A one-layer conv "segmenter"; ``symmetric`` mirrors the kernel so it commutes with flips."""
    torch.manual_seed(seed)
    model = nn.Conv2d(3, K, kernel, padding=kernel // 2).eval()
    if symmetric:
        with torch.no_grad():
            model.weight.copy_((model.weight + model.weight.flip(-1)) / 2)
    return model


class Oracle(nn.Module):
    """Predicts the class id stored in the red channel (for exact, known metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # a parameter, so train/eval state is visible

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0].round().long().clamp(0, K - 1)
        return F.one_hot(ids, K).permute(0, 3, 1, 2).float() * self.scale


def test_whole_equals_slide_on_one_window() -> None:
    model, x = conv_model(), torch.rand(2, 3, 32, 48) * 255
    with torch.no_grad():
        whole = predict_logits(model, x, mode="whole")
        slide = predict_logits(model, x, mode="slide", crop_size=(32, 48), stride=(21, 32))
    assert whole.shape == (2, K, 32, 48)
    torch.testing.assert_close(slide, whole)


def test_slide_windows_cover_and_average() -> None:
    # A pointwise model predicts the same in every window: overlaps must average back to it,
    # with windows clamped at the borders of a size the stride does not divide.
    model, x = conv_model(kernel=1), torch.rand(1, 3, 37, 53) * 255
    with torch.no_grad():
        whole = predict_logits(model, x)
        slide = predict_logits(model, x, mode="slide", crop_size=(16, 20), stride=(10, 13))
        small = predict_logits(model, x, mode="slide", crop_size=(64, 64), stride=(32, 32))
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(small, whole)  # a window larger than the image: one crop


def test_flip_tta_on_symmetric_input() -> None:
    half = torch.rand(1, 3, 16, 12) * 255
    x = torch.cat([half, half.flip(-1)], dim=-1)  # horizontally symmetric
    with torch.no_grad():
        # a flip-equivariant model: the flipped view adds nothing
        model = conv_model(symmetric=True)
        plain = predict_logits(model, x).softmax(1)
        tta = predict_logits(model, x, flip=True).softmax(1)
        torch.testing.assert_close(tta, plain)
        # any model: the TTA result on a symmetric input is itself symmetric
        tta = predict_logits(conv_model(seed=1), x, flip=True)
    torch.testing.assert_close(tta, tta.flip(-1))


def test_multiscale_tta_returns_input_size_log_probabilities() -> None:
    x = torch.rand(2, 3, 24, 40) * 255
    with torch.no_grad():
        out = predict_logits(conv_model(), x, scales=(0.5, 1.0, 1.5), flip=True, num_classes=K)
    assert out.shape == (2, K, 24, 40)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 24, 40))


def test_bad_inference_config() -> None:
    with pytest.raises(ConfigError, match=r"inference\.mode"):
        predict_logits(conv_model(), torch.zeros(1, 3, 8, 8), mode="tiles")
    with pytest.raises(ValueError, match="predicts 5 classes"):
        predict_logits(conv_model(), torch.zeros(1, 3, 8, 8), num_classes=19)
    kwargs = inference_kwargs({"mode": "slide", "crop_size": [8, 8], "precision": "auto"})
    assert kwargs == {"mode": "slide", "crop_size": (8, 8)}


def make_batches(rng: np.random.Generator, n: int = 3, h: int = 12, w: int = 16) -> list[dict]:
    """Batches whose red channel is a noisy copy of the mask (so Oracle makes some mistakes)."""
    batches = []
    for b in range(n):
        mask = rng.integers(0, K - 1, size=(2, h, w)).astype(np.uint8)  # class K-1 absent
        mask[:, :3, :4] = 255
        ids = np.where(rng.random(mask.shape) < 0.7, mask, rng.integers(0, K, mask.shape))
        image = np.repeat(ids[:, None].astype(np.uint8), 3, axis=1)
        batches.append(
            {
                "image": torch.from_numpy(image),
                "mask": torch.from_numpy(mask),
                "name": [f"img{b}_{i}" for i in range(2)],
            }
        )
    return batches


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluate_model_is_the_official_metric(precision: str) -> None:
    batches = make_batches(np.random.default_rng(0))
    model = Oracle().train()
    result = evaluate_model(
        model, batches, K, 255, NAMES, "cpu", {"mode": "whole"}, precision, num_examples=3
    )
    assert model.training  # mode restored
    reference = SegmentationMetric(K)
    for batch in batches:
        reference.update(batch["image"][:, 0].clamp(max=K - 1), batch["mask"])
    np.testing.assert_array_equal(result.confmat, reference.compute().numpy())
    assert result.metrics == summarize(reference.compute(), NAMES)
    assert 0 < result.metrics["mIoU"] < 1
    assert [e["name"] for e in result.examples] == ["img0_0", "img0_1", "img1_0"]
    example = result.examples[0]
    assert example["image"].shape == (12, 16, 3) and example["image"].dtype == np.uint8
    assert example["pred"].shape == (12, 16) and example["pred"].dtype == np.uint8
    np.testing.assert_array_equal(example["gt"], batches[0]["mask"][0].numpy())


def test_evaluate_model_channels_last_and_unlabelled_split() -> None:
    model = conv_model().to(memory_format=torch.channels_last)
    batches = make_batches(np.random.default_rng(1), n=1)
    result = evaluate_model(model, batches, K, 255, NAMES, "cpu", None)
    assert result.confmat.sum() == (batches[0]["mask"] != 255).sum()
    with pytest.raises(ConfigError, match="no labels"):
        evaluate_model(
            model, [{"image": batches[0]["image"], "name": ["a", "b"]}], K, 255, NAMES, "cpu"
        )


def test_colorize_and_overlay() -> None:
    mask = np.array([[0, 1], [4, 255]], dtype=np.uint8)
    colours = colorize(mask, PALETTE)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert colours[1, 0].tolist() == PALETTE[4] and colours[1, 1].tolist() == [0, 0, 0]
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    blended = overlay(image, mask, PALETTE, alpha=0.5)
    assert blended[0, 1].tolist() == [105, 110, 118]  # (200 + palette) / 2, rounded
    assert blended[1, 1].tolist() == [200, 200, 200]  # ignored: image only


def test_saved_predictions_and_folder_evaluation(tmp_path: Path) -> None:
    batches = make_batches(np.random.default_rng(2))
    result = evaluate_model(Oracle(), batches, K, 255, NAMES, "cpu", {}, num_examples=6)
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for example in result.examples:
        paths = save_prediction(
            tmp_path / "out", example["name"], example["pred"], PALETTE, example["image"], True
        )
        assert sorted(paths) == ["colormap", "mask", "overlay"]
        Image.fromarray(example["gt"]).save(gt_dir / f"{example['name']}.png")
    names = sorted(e["name"] for e in result.examples)
    assert sorted(p.stem for p in (tmp_path / "out" / "masks").glob("*.png")) == names
    for sub, ext, mode in [
        ("masks", "png", "L"),
        ("colormaps", "png", "RGB"),
        ("overlays", "jpg", "RGB"),
    ]:
        with Image.open(tmp_path / "out" / sub / f"img0_0.{ext}") as img:
            assert (img.mode, img.size) == (mode, (16, 12))
    mask = np.array(Image.open(tmp_path / "out" / "masks" / "img0_0.png"))
    np.testing.assert_array_equal(mask, result.examples[0]["pred"])
    assert mask.max() < K
    # the saved masks, scored as folders, give exactly the in-process numbers
    metrics, confmat = evaluate_mask_folders(gt_dir, tmp_path / "out" / "masks", K, NAMES)
    np.testing.assert_array_equal(confmat, result.confmat)
    assert metrics == result.metrics
