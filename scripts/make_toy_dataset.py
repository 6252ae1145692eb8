"""Write the synthetic street-scene dataset in a real layout (BDD100K, Cityscapes or plain folders).

python scripts/make_toy_dataset.py --layout bdd100k --root data/toy_bdd100k [--num-train 96 ...]
python scripts/make_toy_dataset.py --layout bdd100k_drivable --root data/toy_bdd100k_drivable
python scripts/make_toy_dataset.py --layout cityscapes --root data/toy_cityscapes
python scripts/make_toy_dataset.py --layout folder --root data/toy_folder
"""

import argparse

from semseg.cli import report_user_errors
from semseg.data.toy import (
    make_toy_bdd100k,
    make_toy_bdd100k_drivable,
    make_toy_cityscapes,
    make_toy_folder,
)

GENERATORS = {
    "bdd100k": make_toy_bdd100k,
    "bdd100k_drivable": make_toy_bdd100k_drivable,
    "cityscapes": make_toy_cityscapes,
    "folder": make_toy_folder,
}


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(GENERATORS), default="bdd100k")
    parser.add_argument("--root", help="output folder (default: data/toy_<layout>)")
    parser.add_argument("--num-train", type=int, default=96)
    parser.add_argument("--num-val", type=int, default=24)
    parser.add_argument("--num-test", type=int, default=8)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = GENERATORS[args.layout](
        args.root or f"data/toy_{args.layout}",
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        height=args.height,
        width=args.width,
        seed=args.seed,
    )
    print(f"toy dataset written to {root}")


if __name__ == "__main__":
    main()
