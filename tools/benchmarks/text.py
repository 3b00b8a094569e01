"""Benchmark text encoding: ovdense's ``encode_prompts`` (the shortest context per batch of
prompts sorted by length) against open_clip's ``encode_text`` (all 77 positions), in prompts
per second, on ViT-B/16 with random weights.

    python tools/benchmarks/text.py [--sizes 5 150 847] [--open-clip-max 2560] [--ovdense-max N]

A size ``C`` is ``C`` class names × the 80 ImageNet templates: the issue's 5 street classes,
ADE20K-150's and ADE20K-847's first names (``configs/_base_/classnames``). open_clip's pass
on all 67,760 prompts of ADE-847 takes about an hour on a 2-core CPU, so each side can be timed
on a random sample of at most ``--open-clip-max`` / ``--ovdense-max`` prompts and its rate
extrapolated; the output says where it was. The sample keeps the vocabulary's mix of prompt
lengths (ovdense still sorts and batches within it). Both sides batch 256 prompts. The largest
difference between the two sides' normalised embeddings, over the prompts both encoded, is
printed beside the rates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ovdense.backbone.prompts import resolve_templates
from ovdense.backbone.text import encode_prompts

ROOT = Path(__file__).resolve().parents[2]
STREET = ["sky", "building", "tree", "person", "car"]
CLASS_FILES = {150: "ade150.txt", 847: "ade847.txt"}


def class_names(size: int) -> list[str]:
    if size == len(STREET):
        return list(STREET)
    if size in CLASS_FILES:
        lines = (ROOT / "configs/_base_/classnames" / CLASS_FILES[size]).read_text().splitlines()
        return [line.split(",")[0].strip() for line in lines if line.strip()]
    return [f"class {i}" for i in range(size)]


def sample(count: int, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of all ``count`` prompts, or of a random ``limit`` of them (sorted)."""
    if limit is None or limit >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 150, 847])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--open-clip-max", type=int, default=2560,
                        help="time open_clip on at most this many prompts (0: all)")
    parser.add_argument("--ovdense-max", type=int, default=0,
                        help="time ovdense on at most this many (0: all)")
    parser.add_argument("--progress", action="store_true", help="show encode_prompts' progress bars")
    args = parser.parse_args(argv)

    import open_clip

    from ovdense.backbone import text

    if not args.progress:
        text.PROGRESS_ABOVE = 1 << 62  # the bars would interleave with the table

    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    templates = resolve_templates("imagenet80")
    print(f"{args.model}, random weights, {torch.get_num_threads()} threads, batches of {args.batch_size}")
    print(f"{'prompts':>14} {'ovdense /s':>11} {'open_clip /s':>13} {'ratio':>7} {'max |diff|':>11}  "
          "timed on")
    for size in args.sizes:
        prompts = [t.format(n) for n in class_names(size) for t in templates]  # C*T
        ours_index = sample(len(prompts), args.ovdense_max or None, 1)
        theirs_index = sample(len(prompts), args.open_clip_max or None, 2)
        with torch.no_grad():
            start = time.perf_counter()
            ours = encode_prompts(model, tokenizer, [prompts[i] for i in ours_index], args.batch_size)
            ours_rate = len(ours_index) / (time.perf_counter() - start)
            theirs = []
            start = time.perf_counter()
            for b in range(0, len(theirs_index), args.batch_size):
                tokens = tokenizer([prompts[i] for i in theirs_index[b:b + args.batch_size]])
                theirs.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
            theirs_rate = len(theirs_index) / (time.perf_counter() - start)
        # the prompts both sides encoded
        position = {int(i): k for k, i in enumerate(ours_index)}
        shared = [(k, position[int(i)]) for k, i in enumerate(theirs_index) if int(i) in position]
        diff = float("nan")
        if shared:
            a, b = (torch.tensor(v) for v in zip(*shared))
            diff = float((torch.cat(theirs)[a] - ours[b]).abs().max())
        sampled = len(ours_index) < len(prompts) or len(theirs_index) < len(prompts)
        note = (f"ovdense {'all' if len(ours_index) == len(prompts) else len(ours_index)}, "
                f"open_clip {'all' if len(theirs_index) == len(prompts) else len(theirs_index)}"
                + (" (a random sample: rates extrapolated to all)" if sampled else ""))
        print(f"{size:>5}×{len(templates)}={len(prompts):<6} {ours_rate:>11.1f} {theirs_rate:>13.1f} "
              f"{ours_rate / theirs_rate:>6.1f}× {diff:>11.1e}  {note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
