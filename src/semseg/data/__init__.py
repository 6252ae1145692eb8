"""Datasets (one interface, a class per folder layout), augmentation recipe, loaders, toy data, checker."""

from semseg.data.base import DatasetError, SegmentationDataset, read_rgb
from semseg.data.bdd100k import BDD100KDataset
from semseg.data.build import build_dataset, check_dataset_config, dataset_meta, eval_scale
from semseg.data.checker import class_pixel_counts
from semseg.data.cityscapes import CityscapesDataset
from semseg.data.folder import FolderDataset, ImageFolder
from semseg.data.loader import build_eval_loader, build_train_loader
from semseg.data.toy import (
    ensure_toy_dataset,
    make_toy_bdd100k,
    make_toy_bdd100k_drivable,
    make_toy_cityscapes,
    make_toy_dataset,
    make_toy_folder,
)
from semseg.data.transforms import build_eval_transform, build_train_transform

__all__ = [
    "BDD100KDataset",
    "CityscapesDataset",
    "DatasetError",
    "FolderDataset",
    "ImageFolder",
    "SegmentationDataset",
    "build_dataset",
    "build_eval_loader",
    "build_eval_transform",
    "build_train_loader",
    "build_train_transform",
    "check_dataset_config",
    "class_pixel_counts",
    "dataset_meta",
    "ensure_toy_dataset",
    "eval_scale",
    "make_toy_bdd100k",
    "make_toy_bdd100k_drivable",
    "make_toy_cityscapes",
    "make_toy_dataset",
    "make_toy_folder",
    "read_rgb",
]
