"""Train the project's toy CLIP (v2) on the synthetic world (``ovdense.data.synthetic``).

    python tools/train_toy_clip.py --out runs/toy --seed 0            # the v2 recipe (its defaults)
    python tools/train_toy_clip.py --out runs/toy --minutes 30        # a chunk; then
    python tools/train_toy_clip.py --out runs/toy --resume            # continue where it stopped

The model is a plain open_clip ``CLIP`` (a ViT image tower, a text transformer), so every
method and head reads it like any other CLIP. It is trained in two stages (the measurements
behind each choice go to docs/toy_world.md with the v2 weights):

**Stage 1 — supervised image tower** (``--stage1-steps``). Small ViTs learn these shapes slowly
from a contrastive signal (v1: 1,100 contrastive steps, shape zero-shot 0.63), so the image
tower first learns the world with labels, as LiT does before its contrastive stage (Zhai et
al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022: a pre-trained,
then locked image tower). Every output is compared by cosine with learned prototypes in the
joint space (one per colour–shape pair, shape, colour, and one for the background):

* the class token (after ``ln_post`` and ``proj``) against the 30 pairs, the 5 shapes and the
  6 colours, the targets spread evenly over what the image shows (1–3 objects);
* token labeling (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision
  Transformers", NeurIPS 2021): every patch token (after ``ln_post`` and ``proj``) against
  background + pairs, background + shapes and background + colours, its target the fractions
  of its pixels in each class — the patch tokens then carry what the dense heads read;
* the same token labeling on the value path of the last block (MaskCLIP's dense path, Zhou
  et al., ECCV 2022, ``backbone.dense.maskclip_block``), weight ``--value-weight``: real CLIP's
  value path carries each patch's own content, which is what the training-free heads rely on;
  the toy learns it explicitly. This is where ovdense departs from a plain CLIP recipe.

**Stage 2 — locked-image text tuning** (``--stage2-steps``, LiT). The image tower is frozen and
the text tower learns to name what it sees:

* captions of whole images in a multi-positive InfoNCE (images with identical captions are
  all positives), captions sometimes naming only colours or only shapes
  (``--attribute-drop``);
* hard negatives: each image against the prompts of every shape and every colour;
* region–text: every patch token against the prompts of background + pairs, + shapes and
  + colours, with the same soft targets as the token labeling (the v1 recipe pooled the
  tokens over each object instead; per token is what the dense heads are scored on).

Images are drawn at the native size with 1–3 objects whose pixel size matches the evaluation
scenes' windows; the first ``--single-steps`` draw one object; a fraction ``--black-rate``
of images show their objects on black (a cut-out object is a common query). Every step's data
depends only on ``(seed, step)``, so a resumed run equals an uninterrupted one.

Writes ``OUT/checkpoint.pt`` (resumable, atomic, every 100 steps and at the end),
``OUT/model.safetensors`` (fp16 weights), ``OUT/config.json`` (the open_clip model config with
ovdense's inference defaults) and ``OUT/loss.png`` (the loss curve, stages marked).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovdense.backbone.dense import embed, maskclip_block
from ovdense.data.synthetic import COLOURS, SHAPES, SceneConfig, render_scene
from ovdense.errors import OvdenseError
from ovdense.io import write_bytes, write_json

TOY_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 192, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
# inference defaults that travel with the weights (the config's "ovdense" entry): the training
# captions' wording, windows at the native size over scenes twice that size, where the objects
# have the pixel size they had in training, and the segmentation head the CLI and the demo use
# when none is named: the best training-free head on the v2 weights (docs/toy_world.md)
TOY_DEFAULTS = {"templates": ["a photo of a {}"], "short_side": 128, "window": [64, 32], "method": "sclip"}

PAIRS = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # colour_shape label k + 1 is PAIRS[k]
BACKGROUND_PROMPT = "a photo of a background"
SHAPE_PROMPTS = [f"a photo of a {s}" for s in SHAPES]
COLOUR_PROMPTS = [f"a photo of a {c} object" for c in COLOURS]
PAIR_PROMPTS = [f"a photo of a {p}" for p in PAIRS]


def attribute_caption(scene, rng: np.random.Generator, drop: float) -> str:
    """The scene's caption, or with probability ``drop`` one naming only colours or only shapes."""
    if rng.random() >= drop or not scene.objects:
        return scene.caption
    if rng.random() < 0.5:
        names = [f"{o.colour} object" for o in scene.objects]
    else:
        names = [o.shape for o in scene.objects]
    names = list(dict.fromkeys(names))
    return "a photo of a " + (", a ".join(names[:-1]) + f" and a {names[-1]}" if len(names) > 1 else names[0])


def make_batch(rng: np.random.Generator, size: int, scene_config: SceneConfig, drop: float, black_rate: float,
               single_rate: float = 0.0):
    """``size`` rendered images ``[B, 3, H, W]`` in ``[0, 1]``, their captions, objects and
    ``colour_shape`` label maps ``[B, H, W]``; a fraction ``black_rate`` on a black background, a
    fraction ``single_rate`` with one object."""
    images, captions, objects, labels = [], [], [], []
    single = replace(scene_config, objects=(1, 1))
    for _ in range(size):
        scene = render_scene(rng, single if rng.random() < single_rate else scene_config)
        image = scene.image
        if rng.random() < black_rate:
            image = np.where(scene.instance[..., None] > 0, image, 0).astype(np.uint8)
        images.append(image)
        captions.append(attribute_caption(scene, rng, drop))
        objects.append(scene.objects)
        labels.append(scene.colour_shape)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, captions, objects, torch.from_numpy(np.stack(labels))


def image_targets(scenes_objects) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft targets of whole images: ``[B, 30]`` pairs, ``[B, 5]`` shapes, ``[B, 6]`` colours,
    each uniform over what the image shows."""
    B = len(scenes_objects)
    pair = torch.zeros(B, len(PAIRS))
    shape, colour = torch.zeros(B, len(SHAPES)), torch.zeros(B, len(COLOURS))
    for row, objs in enumerate(scenes_objects):
        for obj in objs:
            pair[row, PAIRS.index(f"{obj.colour} {obj.shape}")] = 1.0
            shape[row, SHAPES.index(obj.shape)] = 1.0
            colour[row, list(COLOURS).index(obj.colour)] = 1.0
    return tuple(t / t.sum(dim=1, keepdim=True).clamp(min=1.0) for t in (pair, shape, colour))


def token_targets(labels: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-labeling targets from a ``colour_shape`` map ``[B, H, W]``: the fraction of each
    patch's pixels in each class, ``[B, hw, 1 + 30]`` (background + pairs), ``[B, hw, 1 + 5]``
    (background + shapes), ``[B, hw, 1 + 6]`` (background + colours)."""
    onehot = F.one_hot(labels, 1 + len(PAIRS)).permute(0, 3, 1, 2).float()  # B, 31, H, W
    pair = F.avg_pool2d(onehot, patch).flatten(2).transpose(1, 2)  # B, hw, 31
    background, pairs = pair[..., :1], pair[..., 1:].unflatten(-1, (len(COLOURS), len(SHAPES)))
    shape = torch.cat([background, pairs.sum(-2)], dim=-1)  # B, hw, 6
    colour = torch.cat([background, pairs.sum(-1)], dim=-1)  # B, hw, 7
    return pair, shape, colour


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets over the last axis, averaged over the rest."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def multi_positive_loss(image_emb, text_emb, captions, logit_scale):
    """Symmetric InfoNCE whose targets spread evenly over all pairs with identical captions."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    index = torch.tensor([ids[c] for c in captions])
    same = (index[:, None] == index[None, :]).float()  # B, B
    targets = same / same.sum(dim=1, keepdim=True)
    logits = logit_scale * image_emb @ text_emb.T  # B, B
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets))


def image_tower(visual, images: torch.Tensor, value_path: bool):
    """The ViT's outputs in the joint space: class token ``[B, D]``, patch tokens ``[B, hw, D]``
    and, with ``value_path``, the patch tokens of MaskCLIP's value-path last block ``[B, hw, D]``
    (``backbone.dense.maskclip_block``: residual and FFN kept, as the official code)."""
    x = embed(visual, images)  # B, 1+hw, W
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    out = visual.ln_post(blocks[-1](x)) @ visual.proj  # B, 1+hw, D
    value = None
    if value_path:
        value = visual.ln_post(maskclip_block(blocks[-1], x, visual.grid_size)[:, 1:]) @ visual.proj
    return out[:, 0], out[:, 1:], value


class Prototypes(torch.nn.Module):
    """Stage 1's classifier: one learned unit vector per class in the joint space and a
    learned temperature (a cosine classifier)."""

    def __init__(self, dim: int, generator: torch.Generator):
        super().__init__()

        def rows(n):
            return torch.nn.Parameter(torch.randn(n, dim, generator=generator) * dim ** -0.5)

        self.background, self.pair = rows(1), rows(len(PAIRS))
        self.shape, self.colour = rows(len(SHAPES)), rows(len(COLOURS))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))

    def logits(self, emb: torch.Tensor, which: str, with_background: bool) -> torch.Tensor:
        rows = getattr(self, which)
        if with_background:
            rows = torch.cat([self.background, rows])
        return self.log_scale.exp().clamp(max=100) * F.normalize(emb, dim=-1) @ F.normalize(rows, dim=-1).T


def dense_loss(tokens: torch.Tensor, targets, classify) -> torch.Tensor:
    """Token labeling over the three vocabularies: ``classify(tokens, which)`` → logits."""
    pair, shape, colour = targets
    return (soft_cross_entropy(classify(tokens, "pair"), pair)
            + soft_cross_entropy(classify(tokens, "shape"), shape)
            + soft_cross_entropy(classify(tokens, "colour"), colour)) / 3


def save_loss_plot(path: Path, losses: list[float], boundary: int | None = None) -> None:
    """A loss curve picture (raw and smoothed, log scale) without matplotlib: drawn with
    OpenCV; a vertical line marks the start of stage 2."""
    import cv2

    H, W, pad = 300, 600, 40
    canvas = np.full((H, W, 3), 255, np.uint8)
    if len(losses) >= 2:
        values = np.log10(np.maximum(np.array(losses), 1e-4))
        k = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        lo, hi = float(values.min()), float(values.max())
        span = max(hi - lo, 1e-6)

        def x_of(i):
            return pad + i / max(len(values) - 1, 1) * (W - 2 * pad)

        def points(v, offset=0):
            xs = x_of(np.arange(len(v)) + offset)
            ys = H - pad - (v - lo) / span * (H - 2 * pad)
            return np.stack([xs, ys], 1).round().astype(np.int32)

        cv2.polylines(canvas, [points(values)], False, (200, 200, 230), 1)
        cv2.polylines(canvas, [points(smooth, k // 2)], False, (40, 40, 200), 2)
        if boundary is not None and 0 < boundary < len(values):
            x = int(round(x_of(boundary)))
            cv2.line(canvas, (x, pad), (x, H - pad), (0, 150, 0), 1)
            cv2.putText(canvas, "stage 2", (x + 3, pad + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 120, 0), 1)
        cv2.putText(canvas, f"{10 ** hi:.2f}", (2, pad), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(canvas, f"{10 ** lo:.3f}", (2, H - pad), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(canvas, f"toy CLIP training loss (log scale), {len(losses)} steps", (pad, 20),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    ok, encoded = cv2.imencode(".png", canvas[:, :, ::-1])
    write_bytes(path, encoded.tobytes())


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt (without it an existing one is an error)")
    parser.add_argument("--minutes", type=float, default=0, help="stop after this wall time (0 = no limit)")
    parser.add_argument("--stage1-steps", type=int, default=6000, help="supervised image-tower steps")
    parser.add_argument("--stage1-batch", type=int, default=64)
    parser.add_argument("--stage1-lr", type=float, default=1e-3)
    parser.add_argument("--value-weight", type=float, default=0.5,
                        help="weight of the token labeling on the value path (MaskCLIP's dense path)")
    parser.add_argument("--stage2-steps", type=int, default=1000, help="locked-image text tuning steps")
    parser.add_argument("--stage2-batch", type=int, default=128)
    parser.add_argument("--stage2-lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps of each stage")
    parser.add_argument("--attribute-drop", type=float, default=0.5)
    parser.add_argument("--region-weight", type=float, default=1.0,
                        help="stage 2: weight of the per-token region–text contrast")
    parser.add_argument("--hard-rate", type=float, default=0.3,
                        help="fraction of batches whose objects all share one colour")
    parser.add_argument("--black-rate", type=float, default=0.1,
                        help="fraction of images whose objects are shown on black")
    parser.add_argument("--radius", type=float, nargs=2, default=(0.17, 0.45),
                        help="object radius range as a fraction of the image side")
    parser.add_argument("--single-steps", type=int, default=500,
                        help="curriculum: the first steps draw one object per image")
    parser.add_argument("--single-rate", type=float, default=0.25,
                        help="after the curriculum, the fraction of images with one object")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)

    import open_clip
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.out / "checkpoint.pt"
    if checkpoint.is_file() and not args.resume:
        raise OvdenseError(f"{checkpoint} exists: pass --resume to continue that run, "
                           "or choose another --out")
    if args.resume and not checkpoint.is_file():
        raise OvdenseError(f"--resume: there is no {checkpoint} to continue")
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "config.json", {**TOY_CONFIG, "ovdense": TOY_DEFAULTS})
    model = open_clip.CLIP(**TOY_CONFIG, init_logit_scale=math.log(50.0))
    prototypes = Prototypes(TOY_CONFIG["embed_dim"], torch.Generator().manual_seed(args.seed))
    tokenizer = open_clip.SimpleTokenizer(context_length=TOY_CONFIG["text_cfg"]["context_length"])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    side = TOY_CONFIG["vision_cfg"]["image_size"]
    patch = TOY_CONFIG["vision_cfg"]["patch_size"]
    scene_config = SceneConfig(size=(side, side), objects=(1, 3), radius=tuple(args.radius), defect_rate=0.0)
    stage1, total = args.stage1_steps, args.stage1_steps + args.stage2_steps
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]

    def make_optimizer(stage: int) -> torch.optim.Optimizer:
        """Stage 1: the image tower and the prototypes; stage 2: the text tower and the
        temperature (the image tower is locked)."""
        if stage == 1:
            params = list(model.visual.parameters()) + list(prototypes.parameters())
            return torch.optim.AdamW(params, lr=args.stage1_lr, weight_decay=0.05, betas=(0.9, 0.999))
        return torch.optim.AdamW(text_params, lr=args.stage2_lr, weight_decay=0.1, betas=(0.9, 0.98))

    step, losses = 0, []
    optimizer = make_optimizer(1)
    if args.resume:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        prototypes.load_state_dict(state["prototypes"])
        step, losses = int(state["step"]), [float(v) for v in state["losses"]]
        if step > stage1:  # at step == stage1 the saved state is stage 1's; the loop switches
            optimizer = make_optimizer(2)
        optimizer.load_state_dict(state["optimizer"])
        print(f"resumed from step {step}", file=sys.stderr)

    def save():
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "prototypes": prototypes.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": step, "losses": torch.tensor(losses)},
                   buffer)
        write_bytes(checkpoint, buffer.getvalue())
        save_loss_plot(args.out / "loss.png", losses, stage1)

    def batch_config(s: int, rng: np.random.Generator) -> SceneConfig:
        """Hard batches share one colour, so only shape tells captions apart."""
        config = scene_config
        if s < args.single_steps:  # curriculum: one large object first
            config = replace(config, objects=(1, 1), radius=(0.3, 0.45))
        if rng.random() < args.hard_rate:
            config = replace(config, colours=(str(rng.choice(list(COLOURS))),))
        return config

    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)

    start = time.time()
    bar = tqdm(total=total, initial=step, desc="train", file=sys.stderr)
    recent: dict[str, list[float]] = {}
    while step < total:
        rng = np.random.default_rng([args.seed, step])  # each step's data depends on (seed, step) only
        stage = 1 if step < stage1 else 2
        if step == stage1:  # entering stage 2: lock the image tower, tune the text tower
            optimizer, recent = make_optimizer(2), {}
        batch = args.stage1_batch if stage == 1 else args.stage2_batch
        images, captions, objects, labels = make_batch(
            rng, batch, batch_config(step, rng), args.attribute_drop, args.black_rate, args.single_rate
        )
        images = (images - mean) / std
        dense_t = token_targets(labels, patch)
        parts: dict[str, torch.Tensor] = {}
        if stage == 1:
            lr = cosine_lr(step, stage1, args.stage1_lr, args.warmup)
            model.visual.train()
            pooled, tokens, value = image_tower(model.visual, images, args.value_weight > 0)
            pair_t, shape_t, colour_t = image_targets(objects)
            parts["image"] = (soft_cross_entropy(prototypes.logits(pooled, "pair", False), pair_t)
                              + soft_cross_entropy(prototypes.logits(pooled, "shape", False), shape_t)
                              + soft_cross_entropy(prototypes.logits(pooled, "colour", False), colour_t)) / 3

            def classify(t, which):
                return prototypes.logits(t, which, True)

            parts["tokens"] = dense_loss(tokens, dense_t, classify)
            if value is not None:
                parts["value"] = args.value_weight * dense_loss(value, dense_t, classify)
        else:
            lr = cosine_lr(step - stage1, args.stage2_steps, args.stage2_lr, args.warmup)
            model.visual.eval()
            with torch.no_grad():
                pooled, tokens, _ = image_tower(model.visual, images, False)
            image_emb = F.normalize(pooled, dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            parts["caption"] = multi_positive_loss(image_emb, encode_prompts(captions), captions, scale)
            vocab = {"background": encode_prompts([BACKGROUND_PROMPT]), "pair": encode_prompts(PAIR_PROMPTS),
                     "shape": encode_prompts(SHAPE_PROMPTS), "colour": encode_prompts(COLOUR_PROMPTS)}
            _, shape_t, colour_t = image_targets(objects)
            parts["attribute"] = (soft_cross_entropy(scale * image_emb @ vocab["shape"].T, shape_t)
                                  + soft_cross_entropy(scale * image_emb @ vocab["colour"].T, colour_t))

            def classify(t, which, vocab=vocab, scale=scale):
                rows = torch.cat([vocab["background"], vocab[which]])
                return scale * F.normalize(t, dim=-1) @ rows.T

            if args.region_weight:
                parts["region"] = args.region_weight * dense_loss(tokens, dense_t, classify)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        for name, value in parts.items():
            recent.setdefault(name, []).append(float(value.detach()))
            recent[name] = recent[name][-20:]
        bar.update(1)
        bar.set_postfix(stage=stage, **{k: f"{np.mean(v):.3f}" for k, v in recent.items()})
        if step % 100 == 0 or step == stage1:
            save()
        if args.minutes and time.time() - start > 60 * args.minutes:
            break
    bar.close()
    save()
    from safetensors.torch import save_file

    half = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    tmp = args.out / ".model.safetensors.tmp"
    save_file(half, str(tmp))
    os.replace(tmp, args.out / "model.safetensors")
    print(f"step {step} of {total} after {(time.time() - start) / 60:.1f} min; "
          f"loss {np.mean(losses[-50:]):.3f}; weights {args.out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OvdenseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
