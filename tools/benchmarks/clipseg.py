"""CLIPSeg on one image with N prompts: ovdense against transformers on the same weights.

    python tools/benchmarks/clipseg.py --prompts 1 10 50 [--repeats 3] [--threads 2] [--out FILE]

transformers' ``CLIPSegForImageSegmentation`` takes one image per prompt, so a user with one
image and N phrases repeats the image N times and the frozen ViT-B/16 runs N times; ovdense runs
it once and the decoder N times (batched after the FiLM). Both sides get the same random
ViT-B/16 weights (every parameter redrawn, converted by ``tools/model_converters/clipseg2ovdense.py``),
one 352 × 352 image and the same N phrases; each timed call encodes the phrases and predicts the
N logit maps (fp32, CPU, best of ``--repeats`` after one warm-up; ``measuring.measure``). Printed:
seconds per call, the ratio, and the largest logit difference. ``--train-step`` also times one
training step of the toy config (``configs/clipseg/clipseg_toy_synthetic.py``: batch 32 at 128 px):
drawing the prompted samples, and the model's step (loss, backward, AdamW).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _sibling(name: str):
    """A module of tools/ by path (``"benchmarks/measuring"``)."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location("ovdense_tool_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


measure = _sibling("benchmarks/measuring").measure
PHRASES = ["a red circle", "the sky", "a dog on the left", "two cats", "a blue car", "grass", "a person",
           "the table", "a window", "a tree"]


def build(seed: int = 0):
    """``(transformers model, backbone, head)`` on the same random ViT-B/16 weights."""
    import transformers

    import ovdense
    from ovdense.heads.clipseg import ClipSegConfig, ClipSegHead

    config = transformers.CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=512, reduce_dim=64, extract_layers=[3, 6, 9], decoder_num_attention_heads=4,
        decoder_intermediate_size=2048, conditional_layer=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    hf = transformers.CLIPSegForImageSegmentation(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif not name.endswith("logit_scale"):
                p.copy_(0.02 * noise if p.dim() == 1 or not name.startswith("decoder.")
                        else noise / p[0].numel() ** 0.5)
    head_state, clip_state = _sibling("model_converters/clipseg2ovdense").convert(hf.state_dict())
    backbone = ovdense.create_backbone("ViT-B-16-quickgelu", pretrained=None)
    backbone.model.load_state_dict(clip_state, strict=True)
    head = ClipSegHead(backbone, ClipSegConfig()).eval()
    head.load_state_dict(head_state, strict=True)
    return hf, backbone, head


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--train-step", action="store_true", help="also time one toy training step")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import numpy as np

    from ovdense.heads.clipseg import ClipSegSegmenter

    hf, backbone, head = build()
    rgb = (np.random.default_rng(0).random((352, 352, 3)) * 255).astype(np.uint8)
    segmenter = ClipSegSegmenter(backbone, ["x"], head=head, bg_threshold=None)
    pixels = segmenter.head.normalise(backbone, torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)
    rows = []
    print(f"{'prompts':>8} {'ovdense s':>10} {'transformers s':>15} {'ratio':>7} {'max |Δ| logits':>15}")
    for n in args.prompts:
        words = [PHRASES[i % len(PHRASES)] + ("" if i < len(PHRASES) else f" {i}") for i in range(n)]

        def ours(words=words):
            with torch.inference_mode():
                return segmenter.prompt_logits(rgb, segmenter.text_prompts(words))

        def theirs(n=n, words=words):
            with torch.inference_mode():
                images = pixels.expand(n, -1, -1, -1)  # the image once per prompt
                return hf(input_ids=backbone.tokenizer(words), pixel_values=images).logits

        ours_s, _, a = measure(ours, torch.device("cpu"), args.repeats)
        theirs_s, _, b = measure(theirs, torch.device("cpu"), args.repeats)
        diff = float((a - b.reshape(a.shape)).abs().max())
        rows.append(dict(prompts=n, ovdense_s=ours_s, transformers_s=theirs_s, ratio=theirs_s / ours_s,
                         max_abs_diff=diff))
        ratio = theirs_s / ours_s
        print(f"{n:>8} {ours_s:>10.3f} {theirs_s:>15.3f} {ratio:>6.2f}x {diff:>15.2e}", flush=True)
    report = {"threads": torch.get_num_threads(), "rows": rows}
    if args.train_step:
        report["train_step"] = timing = train_step(args.repeats)
        print(f"toy training step (batch 32, 128 px): drawing the samples {timing['data_s']:.3f} s, "
              f"the model's step {timing['step_s']:.3f} s")
    if args.out is not None:
        from ovdense.io import write_json

        write_json(args.out, report)
    return 0


def train_step(repeats: int) -> dict[str, float]:
    """One training step of the toy config (best of ``repeats``) on a 64-scene toy world written
    to a temporary folder: ``data_s``, drawing 32 prompted samples through the config's
    ``ClipSegPromptDataset`` (pipelines, prompts, visual-prompt samples) and collating them;
    ``step_s``, the model's part (preprocessing, prompt vectors, loss, backward, AdamW)."""
    import tempfile

    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS

    init_default_scope("mmseg")
    with tempfile.TemporaryDirectory() as tmp:
        world = _sibling("data/make_synthetic_benchmarks").write_san_toy(Path(tmp), num_train=64, num_val=1,
                                                                         seed=0, size=128)
        cfg = Config.fromfile(str(ROOT / "configs" / "clipseg" / "clipseg_toy_synthetic.py"))
        cfg.merge_from_dict({"train_dataloader.dataset.dataset.data_root": str(world["train"])})
        model = MODELS.build(cfg.model)
        dataset = DATASETS.build(cfg.train_dataloader.dataset)
        optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
        batch = {}

        def draw():
            batch["data"] = pseudo_collate([dataset[(i, i, 0)] for i in range(32)])

        def step():
            data = model.data_preprocessor(batch["data"], training=True)
            loss = model.loss(data["inputs"], data["data_samples"])["loss_bce"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        data_s, _, _ = measure(draw, torch.device("cpu"), repeats)
        step_s, _, _ = measure(step, torch.device("cpu"), repeats)
    return {"data_s": data_s, "step_s": step_s}


if __name__ == "__main__":
    sys.exit(main())
