"""How well can SAN's recognition path name the toy world's objects, given perfect masks?

    python tools/analysis/san_toy_ceiling.py --data synthetic_san [--scenes 40] [--trunk 1 2 3 4 5]

SAN names a region by running [SOS] copies of the trunk's class token through CLIP's last blocks
with an attention bias that confines each to its mask (``heads.san.build_attn_mask``, the
official ``_build_attn_biases``). Here each ground-truth object of the held-out scenes (the
``--san-toy`` ADE20K-layout validation split) gets a perfect bias — 0 on the CLIP cells its mask
covers (more than half), the official −100 elsewhere — and the resulting embedding is classified
among the 30 colour–shape pairs by cosine with their text embeddings. Printed per trunk depth (CLIP
blocks before recognition; SAN's toy config uses 4 of 6, B/16's official 9 of 12): the share of
object pixels whose pair is right, and whose colour is right. The trained head's masks and
attention biases can only be as good as these, so this is the ceiling of SAN's object-pixel
accuracy on the toy backbone (up to what learned soft biases and the trained position embedding
add).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("synthetic_san"))
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--trunk", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from PIL import Image

    import ovdense
    from ovdense.backbone.runner import embed, run_blocks
    from ovdense.data.synthetic import SHAPES, colour_shape_classes
    from ovdense.heads.san import build_attn_mask

    root = args.data / "data" / "ade" / "ADEChallengeData2016"
    images = sorted((root / "images" / "validation").glob("*"))[: args.scenes]
    if not images:
        print(f"error: no scenes under {root}: run tools/data/make_synthetic_benchmarks.py --san-toy "
              f"--out {args.data}", file=sys.stderr)
        return 2
    backbone = ovdense.create_backbone("toy")
    visual = backbone.model.visual
    depth, heads = len(visual.transformer.resblocks), visual.transformer.resblocks[0].attn.num_heads
    names = colour_shape_classes()  # background first
    text = backbone.encode_text(names[1:], backbone.defaults["templates"])  # 30, D
    text = F.normalize(text.float(), dim=-1)
    p = backbone.patch_size
    for trunk in args.trunk:
        if not 1 <= trunk < depth:
            print(f"error: --trunk {trunk} outside [1, {depth - 1}]", file=sys.stderr)
            return 2
        right = colour = total = 0
        for path in images:
            rgb = np.array(Image.open(path).convert("RGB"))
            truth = np.array(Image.open(root / "annotations" / "validation" / (path.stem + ".png")))
            objects = [k for k in np.unique(truth) if 0 < k < 255]
            if not objects:
                continue
            with torch.no_grad():
                x = backbone.to_tensor(rgb)  # 1, 3, H, W
                h, w = x.shape[-2] // p, x.shape[-1] // p
                tokens, _ = run_blocks(visual, embed(visual, x, resize="size"), 0, trunk)  # 1, 1+hw, W
                masks = np.stack([truth == k for k in objects])  # Q, H, W
                cover = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[None], (h, w))  # 1, Q, h, w
                cells = cover > 0.5
                bias = torch.where(cells, 0.0, -100.0)[:, None]  # 1, 1, Q, h, w
                Q = len(objects)
                attn = build_attn_mask(bias, (h, w), heads)  # heads, Q+1+hw, Q+1+hw
                z = torch.cat([tokens[:, :1].expand(1, Q, -1), tokens], dim=1)  # 1, Q+1+hw, W
                z, _ = run_blocks(visual, z, trunk, depth, attn_mask=attn)
                embedding = F.normalize((visual.ln_post(z[0, :Q]) @ visual.proj).float(), dim=-1)  # Q, D
                guess = (embedding @ text.T).argmax(dim=-1).numpy() + 1  # Q, labels of names
            for q, k in enumerate(objects):
                n = int(masks[q].sum())
                total += n
                right += n * int(guess[q] == k)
                colour += n * int((guess[q] - 1) // len(SHAPES) == (k - 1) // len(SHAPES))
        print(f"trunk {trunk} of {depth}: object pixels named right {100 * right / total:.1f} %, "
              f"colour right {100 * colour / total:.1f} % ({len(images)} scenes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
