"""Train the project's toy CLIP on the synthetic world (``ovdense.data.synthetic``).

    python tools/train_toy_clip.py --out runs/toy --seed 0        # the shipped recipe

Contrastive (CLIP) training on generated image–caption pairs, seeded and reproducible on CPU.
The recipe, chosen by measurement (see the README's model card):

* images are drawn at the model's native size with 1–3 objects whose pixel size matches the
  evaluation scenes, so sliding windows at the native size see objects at the trained scale;
* captions name each object by colour and shape, and with probability ``attribute_drop`` say
  only the colours or only the shapes (``"a photo of a circle and a star"``), so the image
  embedding must carry each attribute on its own;
* several images in a batch can share one caption (30 colour–shape pairs): the loss treats every
  image with the same caption as a positive (a multi-positive InfoNCE), not as a negative;
* region–text contrast: the final patch tokens (after ``ln_post`` and the projection) pooled
  over each object's mask and over the background are contrasted with the prompts of all
  region classes (``"a photo of a red circle"``, …, ``"a photo of a background"``) — without
  it the class token learns the world (zero-shot 0.98) but the patch tokens do not (colour at
  patch level 0.2–0.3, chance 0.17), and the training-free heads have nothing to read;
* hard negatives: each image is also contrasted with the prompts of every shape
  (``"a photo of a circle"``, …) and every colour (``"a photo of a red object"``), the ones it
  shows being the positives — without these, colour and texture are learned and shape stays at
  chance (measured: shape zero-shot 0.20 after 700 steps).

Writes ``OUT/checkpoint.pt`` (resumable, atomic), ``OUT/model.safetensors`` (fp16 weights),
``OUT/config.json`` (the open_clip model config) and ``OUT/loss.png`` (the loss curve).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovdense.data.synthetic import COLOURS, SHAPES, SceneConfig, render_scene
from ovdense.io import write_bytes, write_json
from ovdense.kernels.pooling import mask_pool

TOY_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 192, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
# inference defaults that travel with the weights (the config's "ovdense" entry): the training
# captions' wording, and windows at the native size over scenes twice that size, where the
# objects have the pixel size they had in training
TOY_DEFAULTS = {"templates": ["a photo of a {}"], "short_side": 128, "window": [64, 32]}


def attribute_caption(scene, rng: np.random.Generator, drop: float) -> str:
    """The scene's caption, or with probability ``drop`` one naming only colours or only shapes."""
    if rng.random() >= drop or not scene.objects:
        return scene.caption
    if rng.random() < 0.5:
        names = [f"{o.colour} object" for o in scene.objects]
    else:
        names = [o.shape for o in scene.objects]
    names = list(dict.fromkeys(names))
    text = "a photo of a " + (", a ".join(names[:-1]) + f" and a {names[-1]}" if len(names) > 1 else names[0])
    return text


def make_batch(rng: np.random.Generator, size: int, scene_config: SceneConfig, drop: float):
    """``size`` rendered images ``[B, 3, H, W]`` in ``[0, 1]``, their captions, objects and
    instance maps ``[B, H, W]``."""
    images, captions, objects, instances = [], [], [], []
    for _ in range(size):
        scene = render_scene(rng, scene_config)
        images.append(scene.image)
        captions.append(attribute_caption(scene, rng, drop))
        objects.append(scene.objects)
        instances.append(scene.instance)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, captions, objects, torch.from_numpy(np.stack(instances))


def multi_positive_loss(image_emb, text_emb, captions, logit_scale):
    """Symmetric InfoNCE whose targets spread evenly over all pairs with identical captions."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    index = torch.tensor([ids[c] for c in captions])
    same = (index[:, None] == index[None, :]).float()  # B, B
    targets = same / same.sum(dim=1, keepdim=True)
    logits = logit_scale * image_emb @ text_emb.T  # B, B
    return 0.5 * (torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean())


def attribute_targets(scenes_objects, names: list[str], key) -> torch.Tensor:
    """``[B, len(names)]`` soft targets: uniform over the attribute values each image shows."""
    targets = torch.zeros(len(scenes_objects), len(names))
    for row, objects in enumerate(scenes_objects):
        for obj in objects:
            targets[row, names.index(key(obj))] = 1.0
    return targets / targets.sum(dim=1, keepdim=True).clamp(min=1.0)


def region_targets(objects, instances: torch.Tensor, max_objects: int):
    """Region masks ``[B, 1 + max_objects, H, W]`` (background first, then each object) and
    their class indices into ``region_prompts``: 0 background, ``1 + colour · 5 + shape``;
    -1 where there is no such object."""
    B = instances.shape[0]
    masks = torch.stack([instances == k for k in range(max_objects + 1)], dim=1)  # B, 1+M, H, W
    classes = torch.full((B, max_objects + 1), -1, dtype=torch.long)
    classes[:, 0] = 0
    for b, objs in enumerate(objects):
        for k, obj in enumerate(objs, start=1):
            classes[b, k] = 1 + list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)
    return masks, classes


def save_loss_plot(path: Path, losses: list[float]) -> None:
    """A loss curve picture (raw and smoothed) without matplotlib: drawn with OpenCV."""
    import cv2

    H, W, pad = 300, 600, 40
    canvas = np.full((H, W, 3), 255, np.uint8)
    if len(losses) >= 2:
        values = np.array(losses)
        k = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        lo, hi = float(values.min()), float(values.max())
        span = max(hi - lo, 1e-6)

        def points(v, offset=0):
            xs = pad + (np.arange(len(v)) + offset) / max(len(values) - 1, 1) * (W - 2 * pad)
            ys = H - pad - (v - lo) / span * (H - 2 * pad)
            return np.stack([xs, ys], 1).round().astype(np.int32)

        cv2.polylines(canvas, [points(values)], False, (200, 200, 230), 1)
        cv2.polylines(canvas, [points(smooth, k // 2)], False, (40, 40, 200), 2)
        cv2.putText(canvas, f"{hi:.2f}", (2, pad), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(canvas, f"{lo:.2f}", (2, H - pad), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(canvas, f"toy CLIP training loss, {len(losses)} steps", (pad, 20),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    ok, encoded = cv2.imencode(".png", canvas[:, :, ::-1])
    write_bytes(path, encoded.tobytes())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--minutes", type=float, default=0, help="stop after this wall time (0 = no limit)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--attribute-drop", type=float, default=0.5)
    parser.add_argument("--attribute-weight", type=float, default=1.0,
                        help="weight of the contrast against all shape and colour prompts")
    parser.add_argument("--region-weight", type=float, default=1.0,
                        help="weight of the region–text contrast (patch tokens pooled per object)")
    parser.add_argument("--shape-first", type=int, default=0,
                        help="curriculum: the first steps train only the shape contrast")
    parser.add_argument("--hard-rate", type=float, default=0.5,
                        help="fraction of batches whose objects all share one colour")
    parser.add_argument("--radius", type=float, nargs=2, default=(0.17, 0.4),
                        help="object radius range as a fraction of the image side")
    parser.add_argument("--single-steps", type=int, default=400,
                        help="curriculum: the first steps draw one object per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)

    import open_clip
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "config.json", {**TOY_CONFIG, "ovdense": TOY_DEFAULTS})
    # a warm start of the temperature (50, not CLIP's 14.3): at 14.3 the near-identical
    # untrained shape-word embeddings give the image tower almost no shape gradient
    model = open_clip.CLIP(**TOY_CONFIG, init_logit_scale=math.log(50.0))
    tokenizer = open_clip.SimpleTokenizer(context_length=TOY_CONFIG["text_cfg"]["context_length"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    side = TOY_CONFIG["vision_cfg"]["image_size"]
    scene_config = SceneConfig(size=(side, side), objects=(1, 3), radius=tuple(args.radius), defect_rate=0.0)

    def batch_config(s: int, rng: np.random.Generator) -> SceneConfig:
        """Hard batches share one colour, so only shape tells captions apart."""
        config = scene_config
        if s < args.single_steps:  # curriculum: one large object first
            config = replace(config, objects=(1, 1), radius=(0.3, 0.45))
        if rng.random() < args.hard_rate:
            config = replace(config, colours=(str(rng.choice(list(COLOURS))),))
        return config

    step, losses, shape_losses, region_losses = 0, [], [], []
    checkpoint = args.out / "checkpoint.pt"
    if checkpoint.is_file():  # resume
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = int(state["step"]), [float(v) for v in state["losses"]]
        print(f"resumed from step {step}", file=sys.stderr)

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        progress = min(1.0, (s - args.warmup) / max(1, args.steps - args.warmup))
        return 0.5 * args.lr * (1 + math.cos(math.pi * progress))

    def save():
        import io

        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "losses": torch.tensor(losses)}, buffer)
        write_bytes(checkpoint, buffer.getvalue())
        save_loss_plot(args.out / "loss.png", losses)

    region_prompts = ["a photo of a background"] + [f"a photo of a {c} {s}" for c in COLOURS for s in SHAPES]
    model.visual.output_tokens = True
    attribute_prompts = [f"a photo of a {s}" for s in SHAPES] + [f"a photo of a {c} object" for c in COLOURS]
    start = time.time()
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", file=sys.stderr)
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])  # each step's data depends on (seed, step) only
        images, captions, objects, instances = make_batch(
            rng, args.batch, batch_config(step, rng), args.attribute_drop
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        shape_t = attribute_targets(objects, list(SHAPES), lambda o: o.shape)
        colour_t = attribute_targets(objects, list(COLOURS), lambda o: o.colour)
        pooled, tokens = model.visual((images - mean) / std)  # B, D; B, hw, W (after ln_post)
        image_emb = F.normalize(pooled, dim=-1)
        text_emb = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = multi_positive_loss(image_emb, text_emb, captions, scale)
        shape_loss = torch.zeros(())
        if args.attribute_weight or step < args.shape_first:
            prompts = F.normalize(model.encode_text(tokenizer(attribute_prompts)), dim=-1)  # 11, D
            logits = scale * image_emb @ prompts.T  # B, 11
            n = len(SHAPES)
            shape_loss = torch.sum(-shape_t * F.log_softmax(logits[:, :n], 1), 1).mean()
            colour_loss = torch.sum(-colour_t * F.log_softmax(logits[:, n:], 1), 1).mean()
            loss = loss + args.attribute_weight * (shape_loss + colour_loss)
            if step < args.shape_first:  # curriculum: shapes alone first (colour is the shortcut)
                loss = shape_loss
        if args.region_weight and step >= args.shape_first:
            # region–text contrast: the patch tokens pooled over each object (and the
            # background) against the prompts of all 31 region classes
            g = side // TOY_CONFIG["vision_cfg"]["patch_size"]
            patches = (tokens @ model.visual.proj).transpose(1, 2).reshape(len(images), -1, g, g)
            masks, classes = region_targets(objects, instances, 3)
            regions, valid = mask_pool(patches, masks)  # B, R, D
            valid = valid & (classes >= 0)  # not in place: torch.where in mask_pool saved it
            region_text = F.normalize(model.encode_text(tokenizer(region_prompts)), dim=-1)  # 31, D
            logits = scale * F.normalize(regions[valid], dim=-1) @ region_text.T
            region_loss = F.cross_entropy(logits, classes[valid])
            loss = loss + args.region_weight * region_loss
            region_losses.append(float(region_loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        shape_losses.append(float(shape_loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", shape=f"{np.mean(shape_losses[-20:]):.3f}",
                        region=f"{np.mean(region_losses[-20:]) if region_losses else 0:.3f}")
        if step % 100 == 0:
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
    print(f"{step} steps in {(time.time() - start) / 60:.1f} min; "
          f"final loss {np.mean(losses[-50:]):.3f}; weights {args.out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
