"""Time F-ViT (ovdense.mm.detection) on this machine: inference per image (frozen backbone vs head)
and training steps at toy size.

    python tools/benchmarks/detect.py                          # B/16 random weights at 640 px + toy training
    python tools/benchmarks/detect.py --images 5 --train-steps 20 --out bench_detect.json

* Inference: ``--config`` (default the OV-COCO B/16 config, weights random unless
  ``--pretrained``: the time does not depend on them, and no download is needed), one
  ``--size`` × ``--size`` image per round: the backbone is ``frozen_features`` (the frozen
  tower, taps and dense CLIP map), each head the rest of its ``predict`` (pyramid, FPN, RPN,
  RoI heads, ensemble, NMS) on those same features — the mm model's (mmdet) and ``PlainFViT``'s
  (``Detector``'s). Medians over ``--images`` rounds after one warm-up. Also the FLOPs of each part,
  the machine's peak rate (``peak_rate``), the head's floor (its FLOPs at that rate) and, with
  ``--profile``, the head's time outside convolutions and matmuls (NMS, norms, RoIAlign, copies).
* Training: ``--train-config`` (default the toy config) on rendered synthetic scenes (base pairs
  labelled), batch ``--batch``; median time of ``loss + backward + AdamW step`` over
  ``--train-steps`` after two warm-ups, and the process's peak resident memory (CPU) or peak
  allocated CUDA memory.
Wall times depend on the machine's load; ``cpu_seconds_*`` (the process's CPU time, all threads)
much less so — report both, with the load average printed at the start.
Run it under the shared lock for figures you report: ``flock /tmp/ovdense-heavy.lock python ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def build(config: str, device: str, **model_overrides):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import ovdense.mm.detection  # noqa: F401 - registers the modules

    init_default_scope("mmdet")
    cfg = Config.fromfile(config, import_custom_modules=False)
    for key, value in model_overrides.items():
        cfg.model[key] = value
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.to(device), cfg


def synthetic_batch(classes: list[str], batch: int, size: int, seed: int = 0) -> dict:
    """Rendered scenes as mmdet's preprocessor input (BGR uint8, gt boxes/labels/masks of ``classes``)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    from ovdense.data import rle
    from ovdense.data.synthetic import SceneConfig, render_scene

    inputs, samples = [], []
    for index in range(batch):
        scene = render_scene(np.random.default_rng([seed, index]), SceneConfig(size=(size, size)))
        boxes, labels, masks = [], [], []
        for k, obj in enumerate(scene.objects, start=1):
            name = f"{obj.colour} {obj.shape}"
            if name in classes:
                mask = scene.instance == k
                x, y, w, h = rle.bbox(mask)
                boxes.append([x, y, x + w, y + h])
                labels.append(classes.index(name))
                masks.append(mask)
        shape = (size, size)
        sample = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape,
                                             scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), labels=torch.tensor(labels),
            masks=BitmapMasks(np.array(masks, np.uint8).reshape(-1, size, size), size, size))
        inputs.append(torch.from_numpy(np.ascontiguousarray(scene.image[:, :, ::-1])).permute(2, 0, 1))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_inference(args) -> dict:
    """Per image: the frozen backbone (``frozen_features`` with the dense CLIP map), then on those very
    features the rest of the mm model's ``predict`` (mmdet: pyramid, FPN, RPN, RoI heads, ensemble,
    NMS) and of ``PlainFViT.predict`` (what ``Detector`` runs), alternately; medians."""
    import copy

    from mmdet.structures import DetDataSample

    from ovdense.heads import fvit

    clip = dict(name=args.model, pretrained=args.pretrained)
    model, _ = build(args.config, args.device, clip=clip)
    model.eval()
    plain = fvit.PlainFViT(model.clip, copy.deepcopy(model.head_config)).to(args.device).eval()
    plain.load_state_dict(model.state_dict())
    model._use_vocabulary(model.test_classes)
    text, seen = model.roi_head.bbox_head.text, model.roi_head.bbox_head.seen
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, args.size, args.size), dtype=np.uint8))
    shape = (args.size, args.size)
    meta = dict(img_shape=shape, ori_shape=shape, scale_factor=(1.0, 1.0))
    sample = DetDataSample(metainfo=meta)
    inputs = model.data_preprocessor(dict(inputs=[image], data_samples=[sample]), training=False)["inputs"]
    real = fvit.frozen_features
    times: dict[str, list[float]] = {"backbone": [], "mm_head": [], "plain_head": []}
    cpu = []
    with torch.no_grad():
        for i in range(args.images + 1):  # the first round warms up
            sync(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            frozen = real(model.clip, inputs, model.indices, model.method, with_clip_map=True)
            sync(args.device)
            marks = [time.perf_counter()]
            fvit.frozen_features = lambda *a, **k: frozen  # noqa: B023 - the heads reuse this round's
            try:
                model.predict(inputs, [sample.clone()])
                sync(args.device)
                marks.append(time.perf_counter())
                plain.predict(inputs, [meta], text, seen)
                sync(args.device)
                marks.append(time.perf_counter())
            finally:
                fvit.frozen_features = real
            if i:
                times["backbone"].append(marks[0] - start)
                times["mm_head"].append(marks[1] - marks[0])
                times["plain_head"].append(marks[2] - marks[1])
                cpu.append(time.process_time() - cpu_start)
    out = {k + "_seconds": statistics.median(v) for k, v in times.items()}
    # the arithmetic of each part (torch's FLOP counter: matmuls, convolutions, attention), and the
    # rate each part reaches: a head with more FLOPs than the tower is slower at equal efficiency
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            frozen = real(model.clip, inputs, model.indices, model.method, with_clip_map=True)
        out["backbone_gflop"] = counter.get_total_flops() / 1e9
        fvit.frozen_features = lambda *a, **k: frozen
        try:
            counter = FlopCounterMode(display=False)
            with counter:
                plain.predict(inputs, [meta], text, seen)
            out["plain_head_gflop"] = counter.get_total_flops() / 1e9
        finally:
            fvit.frozen_features = real
    out["backbone_gflop_per_s"] = out["backbone_gflop"] / out["backbone_seconds"]
    out["plain_head_gflop_per_s"] = out["plain_head_gflop"] / out["plain_head_seconds"]
    # the machine's best rate, and the head's time if all its arithmetic ran at it: the floor no
    # rewrite of the same computation goes under
    out["peak_gflop_per_s"] = peak_rate(args.device)
    out["plain_head_floor_seconds"] = out["plain_head_gflop"] / out["peak_gflop_per_s"]
    if args.profile:  # the head's time outside its arithmetic: what the floor leaves out
        from torch.profiler import profile

        fvit.frozen_features = lambda *a, **k: frozen
        try:
            with torch.no_grad(), profile() as prof:
                plain.predict(inputs, [meta], text, seen)
        finally:
            fvit.frozen_features = real
        events = prof.key_averages()
        arithmetic = {"mkldnn_convolution", "_convolution", "convolution", "addmm", "mm", "bmm", "linear"}
        other = sum(e.self_cpu_time_total for e in events if e.key.split("::")[-1] not in arithmetic) / 1e6
        out["plain_head_profiled_seconds"] = sum(e.self_cpu_time_total for e in events) / 1e6
        out["plain_head_other_seconds"] = other
        rest = sorted((e for e in events if e.key.split("::")[-1] not in arithmetic),
                      key=lambda e: -e.self_cpu_time_total)
        out["plain_head_other_top"] = {e.key: round(e.self_cpu_time_total / 1e6, 4) for e in rest[:6]}
    return dict(model=args.model, size=args.size, images=args.images, **out,
                plain_head_over_backbone=out["plain_head_seconds"] / out["backbone_seconds"],
                mm_head_over_backbone=out["mm_head_seconds"] / out["backbone_seconds"],
                cpu_seconds_per_round=statistics.median(cpu))


def peak_rate(device: str, rounds: int = 5) -> float:
    """GFLOP/s of the fastest of two dense kernels on ``device``, best of ``rounds``: a 2048² fp32
    matmul and the box head's own convolution (1000 RoIs, 256 → 256 channels, 3×3 on 7×7)."""
    import torch.nn.functional as F

    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    x, w = torch.randn(1000, 256, 7, 7, device=device), torch.randn(256, 256, 3, 3, device=device)
    kernels = [(lambda: a @ b, 2 * 2048 ** 3),
               (lambda: F.conv2d(x, w, padding=1), 2 * 1000 * 49 * 256 * 256 * 9)]
    best = 0.0
    with torch.no_grad():
        for run, flop in kernels:
            run()
            for _ in range(rounds):
                sync(device)
                start = time.perf_counter()
                run()
                sync(device)
                best = max(best, flop / (time.perf_counter() - start) / 1e9)
    return best


def bench_training(args) -> dict:
    model, cfg = build(args.train_config, args.device)
    batch = synthetic_batch(list(model.classes), args.batch, args.train_size)
    data = model.data_preprocessor(batch, training=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    model.train()
    times, cpu_times = [], []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.train_steps + 2):
        sync(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses = model.loss(data["inputs"], data["data_samples"])
        total, _ = model.parse_losses(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        sync(args.device)
        if step >= 2:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(config=args.train_config, batch=args.batch, size=args.train_size, steps=args.train_steps,
                seconds_per_step=statistics.median(times), cpu_seconds_per_step=statistics.median(cpu_times),
                peak_memory_mib=peak,
                memory_kind="cuda max allocated" if args.device.startswith("cuda") else "process peak RSS")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/ovdet/fvit_vitb16_ovcoco.py"))
    parser.add_argument("--model", default="ViT-B-16", help="clip.name for the inference config")
    parser.add_argument("--pretrained", default=None, help="clip.pretrained (default: random weights)")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--train-config", default=str(ROOT / "configs/ovdet/fvlm_toy_synthetic.py"))
    parser.add_argument("--train-steps", type=int, default=10, help="0 skips the training benchmark")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one plain-head round: its time outside convolutions and matmuls")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.train_steps < 0 or args.batch < 1:
        parser.error("--images and --batch must be positive, --train-steps non-negative")
    report = dict(device=args.device, threads=torch.get_num_threads(), load_average=os.getloadavg())
    if not args.skip_inference:
        report["inference"] = bench_inference(args)
        print(json.dumps(report["inference"]))
    if args.train_steps:
        report["training"] = bench_training(args)
        print(json.dumps(report["training"]))
    if args.out is not None:
        from ovdense.io import write_json

        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
