"""The official BDD100K sem_seg metric (bdd100k toolkit, ``bdd100k/eval/seg.py``).

One confusion matrix of size (K+1)x(K+1) over the whole split: rows are ground truth, columns are
predictions, the extra index K is "ignored". Ground-truth ignore pixels (255, or any value >= K) are
dropped; a predicted value >= K lands in column K, i.e. it is a miss for the true class. The toolkit
reduces the matrix as follows (values here are fractions; the toolkit prints 100x):

- IoU_c = TP / (TP + FP + FN) over the full (K+1)-column matrix, undefined -> 0;
- mIoU = mean IoU over the classes that occur in the ground truth (absent classes left out);
- pixel accuracy = trace / number of counted ground-truth pixels;
- fIoU = sum_c IoU_c * (ground-truth pixels of c / all counted pixels).

Drivable area (``bdd100k.eval.run -t drivable``) has no extra index: its last class (background) is
the toolkit's "ignored" one. Ground-truth background (and 255) is left out of the histogram,
predictions of background (or any value >= 2) land in its column, and IoU, mIoU, pixel accuracy and
fIoU are those of direct and alternative. A dataset names that class (``toolkit_ignored_class``);
the same (K+1)x(K+1) matrix over all K classes then gives the toolkit's figures (folded as the
toolkit's histogram) and mmseg's K-class mIoU, which scores background too (``mmseg_mIoU``,
``mmseg_IoU/<class>``; mmseg's ``IoUMetric``: classes that occur in neither ground truth nor
prediction are left out of the mean).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semseg.errors import UserError

IGNORE_INDEX = 255
# PIL modes whose pixel values are class ids (a palette PNG stores indices).
_SINGLE_CHANNEL_MODES = ("L", "P")


class EvaluationError(UserError):
    """A prediction or ground-truth file/folder cannot be evaluated (the message names it)."""


class SegmentationMetric:
    """Accumulates the (K+1)x(K+1) confusion matrix; summed across DDP ranks on :meth:`compute`.

    Wraps torchmetrics' ``MulticlassConfusionMatrix`` (state reduced with ``dist_reduce_fx="sum"``),
    adding the toolkit's "ignored" column. ``sync_on_compute=False`` keeps it process-local.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, sync_on_compute: bool = True
    ) -> None:
        if not 0 < num_classes <= 255:
            raise ValueError(f"num_classes must be in 1..255, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # Imported here: torchmetrics loads ~2.5 s of modules (torchvision, torch._dynamo, sympy)
        # that a training run needs only at its first evaluation, and `--help` never.
        from torchmetrics.classification import MulticlassConfusionMatrix

        # validate_args=False: inputs are sanitised in update(); validation would cost a torch.unique.
        self.confmat = MulticlassConfusionMatrix(
            num_classes + 1,
            ignore_index=ignore_index,
            validate_args=False,
            sync_on_compute=sync_on_compute,
        )

    def to(self, device: str | torch.device) -> SegmentationMetric:
        self.confmat = self.confmat.to(device)
        return self

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predicted class ids ``pred`` (NxHxW) against ground truth ``target`` (NxHxW)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(target.shape)}"
            )
        device = self.confmat.confmat.device
        pred = pred.to(device=device, dtype=torch.long)
        target = target.to(device=device, dtype=torch.long)
        k = self.num_classes
        # Out-of-range predictions (e.g. 255) are the toolkit's "ignored" class: a miss.
        pred = pred.clamp(min=0, max=k)
        # Ground truth outside 0..K-1 is not counted (the toolkit keeps only gt < K).
        target = torch.where((target >= 0) & (target < k), target, self.ignore_index)
        self.confmat.update(pred, target)

    def compute(self) -> torch.Tensor:
        """The (K+1)x(K+1) int64 matrix (rows: ground truth, columns: prediction), all ranks summed."""
        return self.confmat.compute()

    def reset(self) -> None:
        self.confmat.reset()


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return names


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (the toolkit sets undefined values to 0)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _toolkit_scores(hist: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """The toolkit's reduction of its (K+1)x(K+1) histogram, "ignored" last, for classes ``names``."""
    k = hist.shape[0] - 1
    tp = np.diag(hist)
    # IoU over the full matrix (FP includes predictions on any GT row), then drop "ignored".
    iou = _safe_div(tp, hist.sum(0) + hist.sum(1) - tp)[:k]
    gt_pixels = hist[:k].sum(1)
    total = gt_pixels.sum()
    present = gt_pixels > 0
    metrics = {
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_acc": float(tp[:k].sum() / total) if total else 0.0,
        "fIoU": float((iou * gt_pixels / total).sum()) if total else 0.0,
    }
    metrics.update({f"IoU/{name}": float(v) for name, v in zip(names, iou)})
    return metrics


def ignored_class_index(class_names: Sequence[str], ignored_class: str) -> int:
    """The index of the toolkit's "ignored" class ``ignored_class``: it must be the last class, as
    the toolkit's drivable metric has it."""
    names = list(class_names)
    if ignored_class not in names or names.index(ignored_class) != len(names) - 1:
        raise EvaluationError(
            f"dataset.toolkit_ignored_class={ignored_class!r} must be the last of the dataset's "
            f"classes {names} (the toolkit treats its last class as ignored), or null"
        )
    return len(names) - 1


def toolkit_histogram(confmat: np.ndarray) -> np.ndarray:
    """The toolkit's KxK histogram from a (K+1)x(K+1) matrix whose last class K-1 is "ignored":
    its ground-truth row left out (``fast_hist`` keeps gt < K-1), predictions of it or beyond
    (>= K-1) in its column."""
    k = confmat.shape[0] - 1
    hist = np.zeros((k, k), dtype=confmat.dtype)
    hist[: k - 1, : k - 1] = confmat[: k - 1, : k - 1]
    hist[: k - 1, k - 1] = confmat[: k - 1, k - 1 :].sum(1)
    return hist


def mmseg_scores(confmat: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """mmseg's ``IoUMetric`` over all K classes of a (K+1)x(K+1) matrix: IoU = intersection /
    union per class, mIoU the mean over classes with a non-empty union."""
    k = confmat.shape[0] - 1
    intersect = np.diag(confmat)[:k]
    union = confmat[:k].sum(1) + confmat[:k, :k].sum(0) - intersect
    iou = _safe_div(intersect, union)
    seen = union > 0
    metrics = {"mmseg_mIoU": float(iou[seen].mean()) if seen.any() else 0.0}
    metrics.update({f"mmseg_IoU/{name}": float(v) for name, v in zip(names, iou)})
    return metrics


def summarize(
    confmat: torch.Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
    ignored_class: str | None = None,
) -> dict[str, float]:
    """Reduce a (K+1)x(K+1) confusion matrix like the toolkit: ``mIoU``, ``pixel_acc``, ``fIoU``,
    ``IoU/<class name>``, all fractions. An empty matrix gives zeros (the toolkit would give NaN).

    With ``ignored_class`` (a class name: drivable area's background) the toolkit's figures are
    those of the other classes, and mmseg's ``mmseg_mIoU`` / ``mmseg_IoU/<class>`` of all come
    beside them."""
    hist = confmat.detach().cpu().numpy() if isinstance(confmat, torch.Tensor) else confmat
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1] or hist.shape[0] < 2:
        raise ValueError(f"expected a (K+1)x(K+1) confusion matrix, got shape {hist.shape}")
    names = _class_names(hist.shape[0] - 1, class_names)
    if ignored_class is None:
        return _toolkit_scores(hist, names)
    ignored = ignored_class_index(names, ignored_class)
    metrics = _toolkit_scores(toolkit_histogram(hist), names[:ignored])
    metrics.update(mmseg_scores(hist, names))
    return metrics


def read_mask(path: Path, what: str) -> np.ndarray:
    """A single-channel 8-bit PNG as an HxW uint8 array, or an :class:`EvaluationError`."""
    try:
        with Image.open(path) as img:
            if img.mode not in _SINGLE_CHANNEL_MODES:
                raise EvaluationError(
                    f"{what} {path} is not a single-channel 8-bit mask (PIL mode {img.mode!r}, "
                    f"expected 'L'): write class ids 0..K-1 as a 1-channel uint8 PNG, not a colour map"
                )
            return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    except OSError as e:
        raise EvaluationError(f"cannot read {what} {path}: {e}") from e


def _png_files(folder: Path, what: str, key: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(
            f"{what} folder not found: {folder} (set {key}=<folder of PNG masks>)"
        )
    files = {p.name: p for p in sorted(folder.glob("*.png"))}
    if not files:
        raise EvaluationError(f"{what} folder {folder} contains no .png files ({key})")
    return files


def evaluate_mask_folders(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    ignore_index: int = IGNORE_INDEX,
    ignored_class: str | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Score a folder of predicted PNG masks against a folder of ground-truth PNG masks.

    Files are paired by name; a ground truth without a prediction counts as all misses (the
    toolkit's rule); predictions without a ground truth are ignored. Returns (metrics, confmat);
    ``ignored_class`` as in :func:`summarize`.
    """
    gt_files = _png_files(Path(gt_dir), "ground-truth", "gt_dir")
    pred_files = _png_files(Path(pred_dir), "prediction", "pred_dir")
    metric = SegmentationMetric(num_classes, ignore_index, sync_on_compute=False)
    for name, gt_path in gt_files.items():
        gt = read_mask(gt_path, "ground truth")
        if name in pred_files:
            pred = read_mask(pred_files[name], "prediction")
            if pred.shape != gt.shape:
                raise EvaluationError(
                    f"prediction {pred_files[name]} has size {pred.shape[1]}x{pred.shape[0]} (WxH) "
                    f"but its ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}: "
                    f"predict at the label resolution"
                )
        else:
            pred = np.full_like(gt, num_classes)  # "ignored" everywhere: every pixel a miss
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    confmat = metric.compute().numpy()
    return summarize(confmat, class_names, ignored_class), confmat


def format_table(metrics: dict[str, float], class_names: Sequence[str]) -> str:
    """Per-class IoU and the summary, in percentages (as the toolkit prints them); with mmseg's
    figures (drivable area) in a column of their own."""
    width = max([len(n) for n in class_names] + [9])
    mmseg = "mmseg_mIoU" in metrics
    header = f"{'class':<{width}}  IoU (%)" + ("  mmseg IoU (%)" if mmseg else "")
    rule = "-" * len(header)

    def cell(key: str) -> str:
        return f"{100 * metrics[key]:7.2f}" if key in metrics else f"{'-':>7}"

    def row(name: str, key: str, mmseg_key: str) -> str:
        return f"{name:<{width}}  {cell(key)}" + (f"  {cell(mmseg_key):>14}" if mmseg else "")

    lines = [header, rule]
    lines += [row(name, f"IoU/{name}", f"mmseg_IoU/{name}") for name in class_names]
    lines.append(rule)
    lines.append(row("mIoU", "mIoU", "mmseg_mIoU"))
    for key in ("pixel_acc", "fIoU"):
        lines.append(f"{key:<{width}}  {cell(key)}")
    return "\n".join(lines)
