"""Write a synthetic dataset in a real dataset's on-disk layout (see ``ovdense.data.layouts``).

    python tools/data/make_synthetic_dataset.py --layout ade20k --out data/synthetic --num 20 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ovdense.data.layouts import LAYOUTS, write_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the dataset")
    parser.add_argument("--num", type=int, default=20,
                        help="images per split (per category and state for mvtec/visa)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.num <= 0:
        parser.error("--num must be positive")
    top = write_dataset(args.layout, args.out, args.num, args.seed, args.size)
    print(f"wrote the {args.layout} layout to {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
