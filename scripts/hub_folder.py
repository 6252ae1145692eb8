"""Turn a checkpoint of this project (e.g. one made by scripts/convert_mmseg_checkpoint.py) into a
Hugging Face Hub model folder: model.safetensors, config.yaml and a model card.

    python scripts/convert_mmseg_checkpoint.py fpn_r50_512x1024_40k_sem_seg_bdd100k.pth fpn_r50.pt
    python scripts/hub_folder.py fpn_r50.pt hub/fpn-r50-bdd100k \\
        --source https://.../fpn_r50_512x1024_40k_sem_seg_bdd100k.pth \\
        --reported-miou-val 59.24 --reported-miou-test 52.89
    hf upload <org>/fpn-r50-bdd100k hub/fpn-r50-bdd100k

Reported scores are percentages as the model zoo prints them; the card marks them as reported by
the zoo, not measured here. ``--scores <run>/eval_val.json`` (from src/evaluate.py) adds the
measured one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semseg.cli import report_user_errors

ZOO = "the BDD100K model zoo (SysCV/bdd100k-models)"
ZOO_URL = "https://github.com/SysCV/bdd100k-models/tree/main/sem_seg"


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    from semseg.apps.card import Score
    from semseg.apps.hub_folder import measured_score, write_hub_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint (.pt), model folder or hf://<org>/<name>")
    parser.add_argument("output", type=Path, help="the folder to write")
    parser.add_argument(
        "--source", help="where the weights came from (default: the converted file)"
    )
    parser.add_argument("--reported-miou-val", type=float, help="val mIoU the source reported (%%)")
    parser.add_argument("--reported-miou-test", type=float, help="test mIoU it reported (%%)")
    parser.add_argument("--reported-by", default=ZOO, help=f"who reported them (default: {ZOO})")
    parser.add_argument("--reported-url", default=ZOO_URL, help="where they are published")
    parser.add_argument("--scores", type=Path, help="eval_<split>.json of src/evaluate.py")
    parser.add_argument("--dataset", help="dataset name on the card (default: the config's)")
    parser.add_argument(
        "--license", default="apache-2.0", help="license id (the zoo's: Apache-2.0)"
    )
    parser.add_argument("--repo-id", help="<org>/<name> it will be uploaded to (for the card)")
    parser.add_argument("--name", help="model-index name (default: method-backbone-dataset)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    reported = [
        Score(
            split,
            value / 100,
            f"reported by {args.reported_by}, not measured here",
            args.reported_url,
        )
        for split, value in (("val", args.reported_miou_val), ("test", args.reported_miou_test))
        if value is not None
    ]
    out = write_hub_folder(
        args.checkpoint,
        args.output,
        reported=reported,
        measured=[measured_score(args.scores)] if args.scores else [],
        origin=args.source,
        dataset=args.dataset,
        license=args.license,
        repo_id=args.repo_id,
        name=args.name,
        overwrite=args.overwrite,
    )
    print(f"wrote {out} (upload: hf upload {args.repo_id or '<org>/<name>'} {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
