"""One tower block on CPU: open_clip's ``nn.MultiheadAttention`` path against ``dense.run_block``
(``F.scaled_dot_product_attention``), per block, at the token counts of 224², 448² and 1024² inputs.

    python tools/benchmarks/attention.py [--model ViT-B-16] [--repeats 5]

Random weights; the same block and tokens for both, timed alternately, best of ``--repeats``;
the largest difference of the outputs is printed with each row.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ovdense import create_backbone
from ovdense.backbone.dense import run_block


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    backbone = create_backbone(args.model, pretrained=None)
    block = backbone.model.visual.transformer.resblocks[0]
    p = backbone.patch_size
    print(f"{args.model}, {torch.get_num_threads()} threads; one block, best of {args.repeats}")
    with torch.inference_mode():
        for size in args.sizes:
            for batch in args.batch:
                x = torch.randn(batch, 1 + (size // p) ** 2, backbone.width)
                block(x), run_block(block, x)  # warm-up
                mha, sdpa = float("inf"), float("inf")
                for _ in range(args.repeats):  # alternate, so that a slow spell hits both
                    mha = min(mha, timed(block, x))
                    sdpa = min(sdpa, timed(run_block, block, x))
                diff = float((block(x) - run_block(block, x)).abs().max())
                print(f"{size}² batch {batch} ({x.shape[1]} tokens): MultiheadAttention {mha * 1e3:.1f} ms, "
                      f"SDPA {sdpa * 1e3:.1f} ms, {mha / sdpa:.2f}×; max |Δ| {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
