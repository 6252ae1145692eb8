"""Evaluation: the official BDD100K metric, inference modes (whole / slide / TTA), the one
prediction loop, prediction files and ONNX export. The applications built on them (evaluate,
predict, the model-zoo folder) are :mod:`semseg.apps`."""

from semseg.evaluation.export import (
    colorize,
    export_onnx,
    overlay,
    save_image,
    save_prediction,
)
from semseg.evaluation.inference import (
    EvalResult,
    evaluate_model,
    predict_batches,
    predict_logits,
)
from semseg.evaluation.metrics import (
    EvaluationError,
    SegmentationMetric,
    evaluate_mask_folders,
    format_table,
    summarize,
)

__all__ = [
    "EvalResult",
    "EvaluationError",
    "SegmentationMetric",
    "colorize",
    "evaluate_mask_folders",
    "evaluate_model",
    "export_onnx",
    "format_table",
    "overlay",
    "predict_batches",
    "predict_logits",
    "save_image",
    "save_prediction",
    "summarize",
]
