"""Check a dataset in the BDD100K layout: python scripts/check_dataset.py <root> [--splits ...]."""

import sys

from semseg.data.checker import main

if __name__ == "__main__":
    sys.exit(main())
