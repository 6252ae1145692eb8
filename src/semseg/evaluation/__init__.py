"""Evaluation: the official BDD100K metric, inference modes (whole / slide / TTA), prediction files,
ONNX export, and what ``src/evaluate.py`` / ``src/predict.py`` run."""

from semseg.evaluation.export import colorize, export_onnx, overlay, save_prediction
from semseg.evaluation.inference import EvalResult, evaluate_model, predict_logits
from semseg.evaluation.metrics import (
    EvaluationError,
    SegmentationMetric,
    evaluate_mask_folders,
    format_table,
    summarize,
)
from semseg.evaluation.runner import run_evaluate, run_predict

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
    "predict_logits",
    "run_evaluate",
    "run_predict",
    "save_prediction",
    "summarize",
]
