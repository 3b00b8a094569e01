"""CLIPSelf training step time and peak memory (``ovdense/train/clipself.py``, the method ``tools/train.py``
runs through ``OvdenseCLIPSelf``).

    python tools/benchmarks/clipself.py                        # the toy at 128 px and B/16 at 1024 px
    python tools/benchmarks/clipself.py --cases toy --repeats 5 --out bench_clipself.json

Each case: a batch of images at the student's size with 20 grid cells each (the official
``--max-boxes``) and their teacher crops at the tower's native size, random pixels, random weights
(the time does not depend on them); one step = the teacher's crops, the student's dense pass, the
RoIAlign, the loss, backward and an AdamW step over the blocks. Best of ``--repeats`` after one warm-up
(``measuring.measure``: wall time, the process's peak resident memory above the start). ``toy``: the
toy CLIP, batch 8 at 128 px (the toy config's); ``b16``: ViT-B/16, batch 2 (the official per-GPU
batch) at 1024 px. Print the load average with the figures: ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import measure  # noqa: E402  (tools/benchmarks/measuring.py)

CASES = {"toy": dict(model="toy", pretrained=None, size=128, batch=8),
         "b16": dict(model="ViT-B-16", pretrained=None, size=1024, batch=2)}


def step_fn(case: dict, device: torch.device):
    """A closure running one CLIPSelf training step on a fixed random batch."""
    from ovdense import create_backbone
    from ovdense.train import clipself as cs

    backbone = create_backbone(case["model"], pretrained=case["pretrained"], device=device)
    method = cs.CLIPSelf(backbone.model.visual, case["model"]).train()
    optimizer = torch.optim.AdamW(cs.parameter_groups(method.student, 0.1), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    crop = backbone.native_size[0]
    images = torch.randn(case["batch"], 3, case["size"], case["size"], generator=g).to(device)
    boxes = [cs.grid_boxes(4, 5)[:20] for _ in range(case["batch"])]
    crops = torch.randn(20 * case["batch"], 3, crop, crop, generator=g).to(device)

    def step():
        loss = method(images, boxes, crops)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = dict(device=args.device, threads=torch.get_num_threads(), load_average=os.getloadavg(), cases={})
    for name in args.cases:
        case = CASES[name]
        seconds, peak, _ = measure(step_fn(case, device), device, args.repeats)
        report["cases"][name] = dict(**case, seconds_per_step=seconds, peak_memory_mib=peak / 2**20)
        print(f"{name}: {case['model']} batch {case['batch']} at {case['size']} px: {seconds:.2f} s a step, "
              f"peak {peak / 2**20:.0f} MiB above the start")
    report["load_average_end"] = os.getloadavg()
    if args.out is not None:
        from ovdense.io import write_json

        write_json(args.out, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
