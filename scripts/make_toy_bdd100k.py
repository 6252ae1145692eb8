"""Write the synthetic street-scene dataset in the BDD100K layout.

python scripts/make_toy_bdd100k.py --root data/toy_bdd100k [--num-train 96 ...]
"""

import argparse

from semseg.data.toy import make_toy_bdd100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/toy_bdd100k", help="output folder")
    parser.add_argument("--num-train", type=int, default=96)
    parser.add_argument("--num-val", type=int, default=24)
    parser.add_argument("--num-test", type=int, default=8)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = make_toy_bdd100k(
        args.root, args.num_train, args.num_val, args.num_test, args.height, args.width, args.seed
    )
    print(f"toy dataset written to {root}")


if __name__ == "__main__":
    main()
