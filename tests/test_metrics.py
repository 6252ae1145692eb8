"""The official BDD100K sem_seg metric: numpy definition, toolkit conformance, folders, DDP sum."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from semseg.evaluation.metrics import (
    EvaluationError,
    SegmentationMetric,
    evaluate_mask_folders,
    format_table,
    summarize,
)

# The BDD100K toolkit's own cases (BSD-3, notice beside them) and the scores its tests expect.
CONFORMANCE = Path(__file__).resolve().parent / "fixtures/conformance/bdd100k_sem_seg_eval"
TOOLKIT_CASES = json.loads((CONFORMANCE / "expected.json").read_text())["cases"]
K = 7
NAMES = [f"class {i}" for i in range(K)]


def random_pair(rng: np.random.Generator, shape=(3, 24, 32)) -> tuple[np.ndarray, np.ndarray]:
    """GT without classes 3 and 6, with 255 blocks; predictions with out-of-range values."""
    gt = rng.choice([0, 1, 2, 4, 5], size=shape).astype(np.uint8)
    gt[:, :5, :7] = 255
    gt[:, -3:, 10:20] = 255
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, K, size=shape)).astype(np.uint8)
    pred[rng.random(shape) < 0.05] = 255  # counts as a miss
    pred[rng.random(shape) < 0.02] = K + 3  # so does any id >= K
    return gt, pred


def definition(gt: np.ndarray, pred: np.ndarray, k: int) -> dict[str, float]:
    """The toolkit's definition written out per class, without a confusion matrix."""
    valid = gt < k
    g, p = gt[valid].astype(int), pred[valid].astype(int)
    ious, freqs, present = [], [], []
    for c in range(k):
        tp = np.sum((g == c) & (p == c))
        fp = np.sum((g != c) & (p == c))
        fn = np.sum((g == c) & (p != c))
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else 0.0)
        freqs.append(np.sum(g == c) / g.size)
        present.append(np.any(g == c))
    out = {
        "mIoU": float(np.mean(np.array(ious)[present])),
        "pixel_acc": float(np.mean(g == p)),
        "fIoU": float(np.dot(ious, freqs)),
    }
    out.update({f"IoU/{NAMES[c]}": ious[c] for c in range(k)})
    return out


def test_metric_matches_numpy_definition() -> None:
    rng = np.random.default_rng(0)
    gt, pred = random_pair(rng)
    metric = SegmentationMetric(K, ignore_index=255)
    for i in range(len(gt)):  # one matrix summed over batches
        metric.update(torch.from_numpy(pred[i : i + 1]), torch.from_numpy(gt[i : i + 1]))
    confmat = metric.compute()
    assert confmat.shape == (K + 1, K + 1)
    assert confmat[K].sum() == 0  # no ground-truth row for "ignored"
    got, want = summarize(confmat, NAMES), definition(gt, pred, K)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # absent classes have IoU 0 (unless predicted-only, still 0) and are left out of the mean
    assert got["IoU/class 3"] == 0.0 and got["IoU/class 6"] == 0.0
    assert got["mIoU"] > np.mean([got[f"IoU/{n}"] for n in NAMES])
    metric.reset()
    metric.update(torch.zeros(1, 0, 0), torch.zeros(1, 0, 0))
    assert metric.compute().sum() == 0


def test_summarize_edge_cases() -> None:
    assert summarize(np.zeros((K + 1, K + 1)), NAMES)["mIoU"] == 0.0
    with pytest.raises(ValueError, match="class names"):
        summarize(np.zeros((4, 4)), NAMES)
    with pytest.raises(ValueError, match="shape"):
        SegmentationMetric(K).update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))


def test_format_table_prints_percentages() -> None:
    metrics = {"mIoU": 0.5925, "pixel_acc": 0.9, "fIoU": 0.8}
    metrics.update({f"IoU/{n}": 0.25 for n in NAMES})
    table = format_table(metrics, NAMES)
    assert "59.25" in table and "25.00" in table and "class 6" in table


@pytest.mark.parametrize("case", TOOLKIT_CASES, ids=[c["gt"] for c in TOOLKIT_CASES])
def test_conformance_with_toolkit(case: dict) -> None:
    metrics, _ = evaluate_mask_folders(
        CONFORMANCE / case["gt"], CONFORMANCE / case["pred"], num_classes=19
    )
    for key in ("mIoU", "pixel_acc", "fIoU"):
        assert 100 * metrics[key] == pytest.approx(case[key], abs=1e-9), key


def _write(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)
    return folder / name


def test_folder_evaluation_equals_in_process(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gt, pred = random_pair(rng, shape=(4, 20, 30))
    metric = SegmentationMetric(K)
    for i in range(len(gt)):
        _write(tmp_path / "gt", f"im{i}.png", gt[i])
        if i == 3:  # no prediction file: all misses
            metric.update(torch.full((1, 20, 30), K), torch.from_numpy(gt[i : i + 1]))
            continue
        _write(tmp_path / "pred", f"im{i}.png", pred[i])
        metric.update(torch.from_numpy(pred[i : i + 1]), torch.from_numpy(gt[i : i + 1]))
    _write(tmp_path / "pred", "extra.png", pred[0])  # no ground truth: not counted
    metrics, confmat = evaluate_mask_folders(tmp_path / "gt", tmp_path / "pred", K, NAMES)
    np.testing.assert_array_equal(confmat, metric.compute().numpy())
    assert metrics == summarize(metric.compute(), NAMES)


def test_folder_errors_name_the_file(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    _write(gt_dir, "a.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_mask_folders(gt_dir, tmp_path / "missing", K)
    pred_dir.mkdir()
    with pytest.raises(EvaluationError, match=rf"{re.escape(str(pred_dir))}.*no \.png"):
        evaluate_mask_folders(gt_dir, pred_dir, K)
    bad = _write(pred_dir, "a.png", np.zeros((10, 13), np.uint8))
    with pytest.raises(EvaluationError, match=rf"{re.escape(str(bad))}.*size 13x10"):
        evaluate_mask_folders(gt_dir, pred_dir, K)
    bad = _write(pred_dir, "a.png", np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(EvaluationError, match=rf"{re.escape(str(bad))}.*single-channel"):
        evaluate_mask_folders(gt_dir, pred_dir, K)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # Forked from the test process: one intra-op thread, as in DataLoader's forked workers, because
    # the parent's OpenMP pool does not survive a fork and a parallel kernel would wait for it.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gt, pred = random_pair(np.random.default_rng(2), shape=(3, 16, 16))
        metric = SegmentationMetric(K)
        # rank 0 updates with images 0 and 2, rank 1 with image 1
        for i in range(rank, len(gt), world):
            metric.update(torch.from_numpy(pred[i : i + 1]), torch.from_numpy(gt[i : i + 1]))
        np.save(Path(out_dir) / f"rank{rank}.npy", metric.compute().numpy())
    finally:
        dist.destroy_process_group()


def test_confmat_is_summed_across_gloo_ranks(tmp_path: Path) -> None:
    SegmentationMetric(K)  # torchmetrics imported here once, not in each rank
    args = (2, str(tmp_path / "init"), str(tmp_path))
    # fork, not spawn: a spawned rank spends seconds importing torch and torchmetrics again
    context = mp.start_processes(_ddp_worker, args=args, nprocs=2, join=False, start_method="fork")
    for _ in range(12):  # a hang guard of 2 minutes, not a benchmark
        if context.join(timeout=10):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the gloo ranks did not finish within 2 minutes")
    gt, pred = random_pair(np.random.default_rng(2), shape=(3, 16, 16))
    single = SegmentationMetric(K)
    single.update(torch.from_numpy(pred), torch.from_numpy(gt))
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), single.compute())
