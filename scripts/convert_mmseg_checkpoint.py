"""Convert an mmsegmentation / BDD100K model-zoo Semantic FPN (ResNetV1c-50) checkpoint into this
project's checkpoint format (model + config with backbone=resnet50c + class names and palette).

    python scripts/convert_mmseg_checkpoint.py fpn_r50_512x1024_40k_sem_seg_bdd100k.pth \
        checkpoints/fpn_r50c_bdd100k.pt
    python src/evaluate.py checkpoint=checkpoints/fpn_r50c_bdd100k.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from semseg.engine.checkpoint import CheckpointError, save_checkpoint
from semseg.models.weights import CONF_DIR, mmseg_to_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "input", type=Path, help="mmseg checkpoint (.pth with a 'state_dict' entry)"
    )
    parser.add_argument("output", type=Path, help="checkpoint to write (.pt)")
    parser.add_argument("--num-classes", type=int, default=19, help="expected class count")
    parser.add_argument("--dataset", default="bdd100k", help="dataset config for names/palette")
    parser.add_argument("--conf-dir", type=Path, default=CONF_DIR, help="the project's conf/")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load with weights_only=False (only for files from a source you trust)",
    )
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"input checkpoint not found: {args.input}")
    try:
        state = torch.load(args.input, map_location="cpu", weights_only=not args.trust_pickle)
    except Exception as e:  # mmcv meta can hold objects that weights_only refuses
        print(
            f"error: cannot read {args.input} safely ({type(e).__name__}: {str(e)[:300]}); "
            "if you trust the file, rerun with --trust-pickle",
            file=sys.stderr,
        )
        return 1
    try:
        checkpoint = mmseg_to_checkpoint(
            state,
            source=str(args.input),
            num_classes=args.num_classes,
            dataset=args.dataset,
            conf_dir=args.conf_dir,
        )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_checkpoint(checkpoint, args.output)
    print(f"wrote {args.output} ({len(checkpoint['model'])} tensors, backbone=resnet50c)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
