"""BDD100K data: dataset, augmentation recipe, loaders, toy generator, checker."""

from semseg.data.bdd100k import BDD100KDataset, DatasetError, build_dataset
from semseg.data.loader import build_eval_loader, build_train_loader
from semseg.data.toy import ensure_toy_dataset, make_toy_bdd100k
from semseg.data.transforms import build_eval_transform, build_train_transform

__all__ = [
    "BDD100KDataset",
    "DatasetError",
    "build_dataset",
    "build_eval_loader",
    "build_eval_transform",
    "build_train_loader",
    "build_train_transform",
    "ensure_toy_dataset",
    "make_toy_bdd100k",
]
