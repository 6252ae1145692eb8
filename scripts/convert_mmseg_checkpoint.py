"""Convert an mmsegmentation / BDD100K model-zoo Semantic FPN (ResNetV1c-50) checkpoint into this
project's checkpoint format (model + config with backbone=resnet50c + class names and palette).

    python scripts/convert_mmseg_checkpoint.py fpn_r50_512x1024_40k_sem_seg_bdd100k.pth \
        checkpoints/fpn_r50c_bdd100k.pt
    python src/evaluate.py checkpoint=checkpoints/fpn_r50c_bdd100k.pt

mmcv / mmengine checkpoints may hold pickled objects (their ``meta``), which are refused unless
``--trust-pickle`` is given for a file from a source you trust.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from semseg.cli import compose_groups, report_user_errors
from semseg.data import dataset_meta
from semseg.models.checkpoint import save_checkpoint, torch_load_weights_only
from semseg.models.mmseg_conversion import MMSEG_CONFIG_GROUPS, mmseg_to_checkpoint


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "input", type=Path, help="mmseg checkpoint (.pth with a 'state_dict' entry)"
    )
    parser.add_argument("output", type=Path, help="checkpoint to write (.pt)")
    parser.add_argument("--num-classes", type=int, default=19, help="expected class count")
    parser.add_argument("--dataset", default="bdd100k", help="dataset config for names/palette")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also load pickled objects (this can run code: only for files you trust)",
    )
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"input checkpoint not found: {args.input}")
    if args.trust_pickle:
        state = torch.load(args.input, map_location="cpu", weights_only=False)
    else:
        hint = "if you trust its source, rerun with --trust-pickle"
        state = torch_load_weights_only(args.input, trust_hint=hint)
    config = compose_groups({**MMSEG_CONFIG_GROUPS, "dataset": args.dataset})
    checkpoint = mmseg_to_checkpoint(
        state,
        source=str(args.input),
        config=config,
        meta=dataset_meta(config["dataset"]),
        num_classes=args.num_classes,
    )
    save_checkpoint(checkpoint, args.output)
    print(f"wrote {args.output} ({len(checkpoint['model'])} tensors, backbone=resnet50c)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
