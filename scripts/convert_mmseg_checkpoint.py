"""Convert an mmsegmentation checkpoint (the BDD100K model zoo's mmseg 0.x files, or mmseg 1.x
ones) into this project's checkpoint format: model + config + class names and palette.

The architecture is recognised from the file's keys and printed: Semantic FPN (model=semantic_fpn,
semantic_fpn_gn, semantic_fpn_gn_dcn), FCN, PSPNet, DeepLabV3, DeepLabV3+ (model=fcn, pspnet, deeplabv3, deeplabv3plus;
dilated backbone=resnet50c_d8 / resnet101c_d8), UPerNet (model=upernet, backbone=resnet50c) and
PointRend (model=pointrend, backbone=resnet50c), on ResNetV1c-50/101; UPerNet on ConvNeXt-T/S/B (mmcls 0.x ``mmcls.ConvNeXt`` as in the zoo, or
mmpretrain 1.x; backbone=convnext_tiny|small|base, told apart by their shapes). Anything else is
refused with one line; nothing is written then.

    python scripts/convert_mmseg_checkpoint.py pspnet_r50-d8_512x1024_40k_sem_seg_bdd100k.pth \
        checkpoints/pspnet_r50-d8_bdd100k.pt
    python src/evaluate.py checkpoint=checkpoints/pspnet_r50-d8_bdd100k.pt

The converted checkpoint records the row's test recipe (``model.align_corners``, ``inference.*``
mode, windows, stride and precision, ``dataset.test_pipeline.scale``), which src/evaluate.py and
src/predict.py follow by default: read from the config the file carries (mmseg 0.x
``meta['config']``, 1.x ``meta['cfg']``; as text, never run), else from the zoo's file name
(``..._769x769_...``: 769x769 windows at stride 513, 1281x721, align_corners; ``..._fp16_...``:
fp16), else the 512x1024 recipe (whole image at 1280x720, fp32); it is printed
(semseg.models.mmseg_recipe).

The dataset comes from the file as well: the zoo's dataset config (bdd100k, bdd100k_drivable) with
the class names of its ``meta`` (0.x ``CLASSES``, 1.x ``dataset_meta``; the palette is kept), else
with its class count (19: bdd100k; 3: bdd100k_drivable, a drivable-area model). The converted file
records it, so src/evaluate.py and src/predict.py use its classes, metric and submission format
with no flags; ``--dataset`` names another, ``--num-classes`` checks the count.

Config overrides of the converted model follow the paths, e.g. ``inference.stride=[384,384]`` or
``model.aux_head=null`` (leave the auxiliary head's weights out: inference never uses them; kept
by default, for fine-tuning). They come after the recipe's and the overrides the file implies,
which are printed (ConvNeXt from mmcls 0.x, i.e. a file without mmengine's ``meta``:
``+backbone.downsample_norm_eps=1e-5``, as mmcls 0.x built it). mmcv / mmengine checkpoints may
hold pickled objects (their ``meta``), which are refused unless ``--trust-pickle`` is given for a
file from a source you trust.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from semseg.checkpoints.file import save_checkpoint, torch_load_weights_only
from semseg.cli import compose_groups, report_user_errors
from semseg.data import dataset_meta
from semseg.errors import UserError
from semseg.models.base import AUX_HEAD
from semseg.models.mmseg_conversion import (
    mmseg_num_classes,
    mmseg_to_checkpoint,
    recognise_mmseg,
)
from semseg.models.mmseg_recipe import (
    DEFAULT_HINT,
    DEFAULT_SOURCE,
    ZOO_DATASETS,
    mmseg_recipe,
    recipe_summary,
    zoo_dataset,
)


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "input", type=Path, help="mmseg checkpoint (.pth with a 'state_dict' entry)"
    )
    parser.add_argument("output", type=Path, help="checkpoint to write (.pt)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides of the converted model, e.g. model.align_corners=true",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="expected class count (default: any)"
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset config it was trained on (default: the zoo's with the file's class names, "
        f"else with its class count: {', '.join(ZOO_DATASETS)})",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also load pickled objects (this can run code: only for files you trust)",
    )
    args = parser.parse_args(argv)
    if not args.input.is_file():
        raise UserError(f"input checkpoint not found: {args.input}")
    if args.trust_pickle:
        state = torch.load(args.input, map_location="cpu", weights_only=False)
    else:
        hint = "if you trust its source, rerun with --trust-pickle"
        state = torch_load_weights_only(args.input, trust_hint=hint)
    arch = recognise_mmseg(state)
    recipe = mmseg_recipe(state, args.input.name)
    dataset, dataset_source = args.dataset, "--dataset"
    if dataset is None:
        candidates = {
            name: compose_groups({"dataset": name})["dataset"]["class_names"]
            for name in ZOO_DATASETS
        }
        found = zoo_dataset(recipe, mmseg_num_classes(state), candidates)
        if found is None:
            raise UserError(
                f"{args.input} has {mmseg_num_classes(state)} classes, which no zoo dataset "
                f"({', '.join(ZOO_DATASETS)}) has: give the one it was trained on, --dataset NAME"
            )
        dataset, dataset_source = found
    overrides = [*arch.overrides, *recipe.overrides(), *args.overrides]
    groups = arch.config_groups
    config = compose_groups({**groups, "dataset": dataset, "inference": "whole"}, overrides)
    meta = dataset_meta(config["dataset"])
    if recipe.class_names and list(recipe.class_names) != list(meta["class_names"]):
        raise UserError(
            f"{args.input} predicts the classes {list(recipe.class_names)}, not those of "
            f"dataset {dataset} ({dataset_source}): pick the dataset config it was trained on, "
            "--dataset NAME"
        )
    if recipe.palette and len(recipe.palette) == len(meta["class_names"]):
        meta["palette"] = [list(colour) for colour in recipe.palette]
    precision = str(config["inference"]["precision"])
    checkpoint = mmseg_to_checkpoint(
        state,
        source=str(args.input),
        config=config,
        meta=meta,
        num_classes=args.num_classes,
        precision=None if precision == "auto" else precision,
    )
    save_checkpoint(checkpoint, args.output)
    kept = config["model"].get(AUX_HEAD) is not None
    aux = f", auxiliary head {'kept' if kept else 'left out'}" if arch.has_aux else ""
    implied = f"; overrides the file implies: {' '.join(arch.overrides)}" if arch.overrides else ""
    print(
        f"recognised {arch.describe()}: built model={groups['model']} "
        f"backbone={groups['backbone']}{aux}; wrote {args.output} "
        f"({len(checkpoint['model'])} tensors){implied}"
    )
    print(f"dataset={dataset} (from {dataset_source}): classes {meta['class_names']}")
    print(f"test recipe from {recipe.source}: {recipe_summary(config, precision)}")
    if recipe.source == DEFAULT_SOURCE:
        print(DEFAULT_HINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
