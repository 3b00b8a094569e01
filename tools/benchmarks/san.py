"""Benchmark SAN on the CPU: a training step of ovdense's head, and inference against mmseg's SAN.

    flock /tmp/ovdense-heavy.lock python tools/benchmarks/san.py [--parts train,infer] [--repeats 3]

* **train** — one training step (forward in training mode, ``SanCriterion`` on both supervised
  side layers, backward, AdamW step) at batch 2, 320² crops, for the toy backbone and for a
  random-weight ViT-B/16 (QuickGELU), each with the official SanConfig (side ViT 240 wide, 8
  blocks, 100 queries); 3 target masks per image, 20 classes. Reported: the median step time
  of ``--repeats`` steps after one warm-up step, and the process's peak resident memory (each
  case runs in its own subprocess, so the figure is that case's, weights included). Without
  ``ovdense.train.criterion`` the step is forward-only (said in the output).
* **infer** — one 640² image (random, normalised), 20 classes, ViT-B/16: mmseg 1.2.2's own SAN
  (``MultimodalEncoderDecoder`` from ``configs/_base_/models/san_vit-b16.py``, whole inference,
  ``encode_decode``) with random weights, and ovdense's ``SanHead`` + ``semantic_scores`` on the
  same weights (``tools/model_converters/san2ovdense.py``); text embeddings are computed once
  before timing in both (mmseg caches them after the first call). Reported: best of
  ``--repeats`` per path, the ratio mmseg / ovdense, and whether the label maps are identical
  (with the semantic scores' max abs difference). Needs a compiled mmcv; skipped with a note
  otherwise.

The load average (``os.getloadavg``) is printed before and after: timings on the shared machine
mean something only beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("person", "sky", "tree", "road", "grass", "building", "car", "dog", "cat", "water", "wall",
         "floor", "ceiling", "table", "chair", "bed", "window", "door", "mountain", "sand")


def _b16_backbone():
    import open_clip

    from ovdense.backbone.clip import ClipBackbone, WeightsSource

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu")
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    return ClipBackbone(model, tokenizer, "ViT-B-16-quickgelu", WeightsSource("random"))


def _backbone(name: str):
    if name == "toy":
        from ovdense import create_backbone

        return create_backbone("toy")
    return _b16_backbone()


def train_case(name: str, repeats: int, size: int = 320, batch: int = 2) -> dict:
    """One training step's time and the process's peak RSS for backbone ``name``."""
    from ovdense.heads.san import SanHead, head_parameters

    torch.manual_seed(0)
    backbone = _backbone(name)
    head = SanHead(backbone).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(len(NAMES), backbone.embed_dim, generator=g), dim=-1)
    images = torch.randn(batch, 3, size, size, generator=g)
    try:
        from ovdense.train.criterion import SanCriterion, SanTarget
    except ImportError:
        criterion = None
    else:
        criterion = SanCriterion(len(NAMES))
        targets = []
        for _ in range(batch):
            masks = torch.zeros(3, size, size)
            for k in range(3):
                y, x = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
                masks[k, y:y + size // 2, x:x + size // 2] = 1
            targets.append(SanTarget(torch.randint(0, len(NAMES), (3,), generator=g), masks))

    def step(iteration: int) -> float:
        start = time.perf_counter()
        outputs = head(backbone, images, text)
        if criterion is None:
            loss = sum(o.mask_logits.float().mean() + o.class_logits.float().mean() for o in outputs)
        else:
            losses = criterion(outputs, targets, generator=torch.Generator().manual_seed(iteration))
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    step(0)  # warm-up
    times = [step(i + 1) for i in range(repeats)]
    return {
        "case": f"train-{name}",
        "step_s": statistics.median(times),
        "steps": [round(t, 3) for t in times],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "head_parameters": head_parameters(head),
        "criterion": "SanCriterion" if criterion is not None else "none (forward-only loss stand-in)",
        "batch": batch,
        "size": size,
        "threads": torch.get_num_threads(),
    }


def build_mmseg_san(names, seed: int = 0, text_layers: int = 12):
    """mmseg 1.2.2's SAN (``configs/_base_/models/san_vit-b16.py``) over ``names`` with seeded
    random weights at the scales of a trained model (timm's 0.02 for the side ViT, CLIP-like
    embeddings, a rescale ``a ≈ 1``), so every activation stays O(1–10) and a float32 comparison
    is meaningful. ``text_layers`` shrinks only the text tower's depth (the tests use 1)."""
    import mmseg
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(Path(mmseg.__file__).parent / ".mim/configs/_base_/models/san_vit-b16.py"))
    m = cfg.model
    m.pretrained = None
    m.data_preprocessor = None
    m.text_encoder.vocabulary = list(names)
    m.text_encoder.dataset_name = None
    m.text_encoder.num_layers = text_layers
    m.decode_head.num_classes = len(names)
    m.decode_head.loss_decode[0].class_weight = [1.0] * len(names) + [0.1]
    torch.manual_seed(seed)
    model = MODELS.build(m)
    # (no init_weights(): mmseg 1.2.2's RecWithAttnbias.init_weights fails without a checkpoint)
    g = torch.Generator().manual_seed(seed + 1)

    def randn(p, std):
        p.copy_(torch.randn(p.shape, generator=g) * std)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(float(np.log(100.0)))
            elif "bias_scaling.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "bias_scaling.bias" in name or "bg_embed" in name:
                randn(p, 0.3)
            elif any(k in name for k in ("query", "pos_embed", "cls_token", "positional_embedding")):
                randn(p, 0.1)
            elif name.endswith("text_projection"):
                randn(p, 512 ** -0.5)
            elif "side_adapter_network.encode_layers" in name and "ln" not in name:
                randn(p, 0.02)
            elif "ln" in name or "norm" in name or ("conv_clips" in name and ".0." in name):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            if "query_mlp.layers.2." in name or "pix_mlp.layers.2." in name:
                p.mul_(0.6)  # mask logits within about ±30, as a trained head's
    return model.eval()


def infer_case(repeats: int, size: int = 640) -> dict:
    try:
        import mmcv.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"case": "infer-b16", "skipped": f"needs a compiled mmcv ({type(e).__name__}: {e})"}
    import open_clip

    from ovdense.backbone.clip import ClipBackbone, WeightsSource
    from ovdense.heads.san import VILD_TEMPLATES, SanConfig, SanHead, semantic_scores

    path = ROOT / "tools" / "model_converters" / "san2ovdense.py"
    spec = importlib.util.spec_from_file_location("san2ovdense", path)
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)

    mm = build_mmseg_san(NAMES)
    head_state, clip_state, config = conv.convert(mm.state_dict(), "mmseg")
    model = open_clip.create_model("ViT-B-16-quickgelu")
    model.load_state_dict(clip_state, strict=True)
    backbone = ClipBackbone(model, open_clip.get_tokenizer("ViT-B-16"), "ViT-B-16-quickgelu",
                            WeightsSource("random"))
    head = SanHead(backbone, SanConfig(**config)).eval()
    head.load_state_dict(head_state, strict=True)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    metas = [dict(img_shape=(size, size), pad_shape=(size, size), ori_shape=(size, size))]
    with torch.inference_mode():
        text = backbone.encode_text(list(NAMES), templates=list(VILD_TEMPLATES), use_cache=False)
        mm.text_encoder()  # fills mmseg's cache

        def ours():
            return semantic_scores(head(backbone, image, text, all_layers=False)[-1], (size, size))

        def theirs():
            return mm.encode_decode(image, metas)

        best = {}
        for label, fn in (("ovdense", ours), ("mmseg", theirs)):
            result = fn()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[label] = (min(times), result)
    s_ours, s_mm = best["ovdense"][1], best["mmseg"][1]
    return {
        "case": "infer-b16",
        "size": size,
        "ovdense_s": best["ovdense"][0],
        "mmseg_s": best["mmseg"][0],
        "ratio_mmseg_over_ovdense": best["mmseg"][0] / best["ovdense"][0],
        "labels_identical": bool(torch.equal(s_ours.argmax(1), s_mm.argmax(1))),
        "scores_max_abs_diff": float((s_ours - s_mm).abs().max()),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="train,infer", help="comma-separated: train, infer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON lines here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a case, in a subprocess
    args = parser.parse_args(argv)
    if args.one is not None:
        result = train_case(args.one[len("train-"):], args.repeats) if args.one.startswith("train-") \
            else infer_case(args.repeats)
        print(json.dumps(result))
        return 0
    cases = []
    parts = args.parts.split(",")
    if "train" in parts:
        cases += ["train-toy", "train-b16"]
    if "infer" in parts:
        cases.append("infer-b16")
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = []
    for case in cases:
        run = subprocess.run([sys.executable, __file__, "--one", case, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            print(f"{case}: failed\n{run.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        result["load_after"] = os.getloadavg()
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)
    if args.out:
        from ovdense.io import write_bytes

        write_bytes(args.out, "".join(json.dumps(r) + "\n" for r in results).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
