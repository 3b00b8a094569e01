"""Convert a published SAN checkpoint into an ovdense SAN head and an open_clip CLIP state dict.

Two layouts are read (``torch.load(weights_only=True)`` only; nothing is unpickled beyond
tensors and plain containers):

* **mmseg** — mmsegmentation 1.2.2's ``MultimodalEncoderDecoder`` (``configs/san``):
  ``image_encoder.*`` (CLIP's first blocks as an mmseg ``VisionTransformer``),
  ``text_encoder.*`` (``CLIPTextEncoder`` with the void embedding ``bg_embed``),
  ``decode_head.side_adapter_network.*`` and ``decode_head.rec_with_attnbias.*`` (CLIP's last
  blocks, ``ln_post`` and ``proj`` as a ``Linear``).
* **official** — MendelXu/SAN's detectron2 ``SAN`` (``model_final.pth``, weights under
  ``"model"``): ``clip_visual_extractor.*`` (open_clip ``conv1`` … ``resblocks[:K]``),
  ``clip_rec_head.*`` (``resblocks[K:]`` re-indexed from 0, ``ln_post``, ``proj``),
  ``side_adapter_network.vit_model.*`` (timm ViT), ``side_adapter_network.fusion_layers.layer_i.*``,
  ``side_adapter_network.mask_decoder.*``, ``ov_classifier.*`` (open_clip's text tower and
  ``bg_embed``), ``criterion.empty_weight`` (dropped).

Each conversion returns ``(head_state, clip_state, config)``: the ``SanHead`` state dict, the
open_clip ``CLIP`` state dict (so one file gives both), and the ``SanConfig`` fields the weights
fix. SAN trains a copy of CLIP's position embedding; the original is not in the checkpoint, so
the trained copy goes into both the head and the CLIP state dict (SAN never reads the latter).

Usage::

    python tools/model_converters/san2ovdense.py san_vit_b_16.pth out/ [--layout auto] \\
        [--model ViT-B-16-quickgelu]

writes ``out/clip.safetensors`` (load it with ``create_backbone(MODEL, pretrained=...)``) and
``out/san-head.safetensors`` (``SanSegmenter(backbone, classes, head_checkpoint=...)``) for that
backbone. SAN keeps CLIP frozen but for its position embedding (which the head carries), so
``--backbone ViT-B-16 --pretrained openai`` writes the head for ovdense's OpenAI ViT-B/16 instead,
after checking that the checkpoint's CLIP tensors are that backbone's.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
from pathlib import Path

import torch

LAYOUTS = ("mmseg", "official")

# mmcv BaseTransformerLayer (operation_order norm, self_attn, norm, ffn) → open_clip block
_MMCV_LAYER = {
    "norms.0.": "ln_1.",
    "attentions.0.attn.": "attn.",
    "norms.1.": "ln_2.",
    "ffns.0.layers.0.0.": "mlp.c_fc.",
    "ffns.0.layers.1.": "mlp.c_proj.",
}
# mmseg TransformerEncoderLayer → open_clip block
_MMSEG_VIT_TO_CLIP = {
    "ln1.": "ln_1.",
    "attn.attn.": "attn.",
    "ln2.": "ln_2.",
    "ffn.layers.0.0.": "mlp.c_fc.",
    "ffn.layers.1.": "mlp.c_proj.",
}
# mmseg TransformerEncoderLayer → SanHead side block (timm names)
_MMSEG_VIT_TO_SIDE = {
    "ln1.": "norm1.",
    "attn.attn.in_proj_weight": "attn.qkv.weight",
    "attn.attn.in_proj_bias": "attn.qkv.bias",
    "attn.attn.out_proj.": "attn.proj.",
    "ln2.": "norm2.",
    "ffn.layers.0.0.": "mlp.fc1.",
    "ffn.layers.1.": "mlp.fc2.",
}


class ConversionError(ValueError):
    """The checkpoint is not in the layout asked for (names the first key that does not fit)."""


def _rename(rest: str, table: dict[str, str], where: str) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    raise ConversionError(f"unexpected key {where}{rest}")


def _strip(state: dict) -> dict[str, torch.Tensor]:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def unwrap(checkpoint) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (``state_dict`` for mmengine, ``model`` for detectron2)."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                return _strip(checkpoint[key])
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return _strip(checkpoint)
    raise ConversionError("the checkpoint holds no state dict (expected 'state_dict', 'model' or tensors)")


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("decode_head.side_adapter_network.") for k in state):
        return "mmseg"
    if any(k.startswith("side_adapter_network.") for k in state):
        return "official"
    raise ConversionError("neither an mmseg SAN (decode_head.side_adapter_network.*) nor an official SAN "
                          "(side_adapter_network.*) checkpoint")


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _side_config(head: dict[str, torch.Tensor], trunk_depth: int) -> dict:
    """The SanConfig fields the side network's weights fix."""
    width, _, patch, _ = head["patch_embed.weight"].shape
    grid = math.isqrt(head["pos_embed"].shape[1])
    decoder_layers = _count(head, r"decoder\.query_mlp\.layers\.(\d+)\.")
    return {
        "num_queries": int(head["query_embed"].shape[1]),
        "side_width": int(width),
        "side_depth": _count(head, r"blocks\.(\d+)\."),
        "side_patch": int(patch),
        "side_mlp": int(head["blocks.0.mlp.fc1.weight"].shape[0]),
        "side_image_size": int(grid * patch),
        "decoder_channels": int(head[f"decoder.query_mlp.layers.{decoder_layers - 1}.weight"].shape[0]),
        "decoder_hidden": int(head["decoder.query_mlp.layers.0.weight"].shape[0]),
        "decoder_layers": decoder_layers,
        "rescale_attn_bias": "decoder.bias_scaling.weight" in head,
        "trunk_depth": trunk_depth,
    }


def convert_mmseg(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """mmseg 1.2.2 ``MultimodalEncoderDecoder`` (SAN) → ``(head_state, clip_state, config)``."""
    state = _strip(state)
    head: dict[str, torch.Tensor] = {}
    clip: dict[str, torch.Tensor] = {}
    trunk = _count(state, r"image_encoder\.layers\.(\d+)\.")
    fusions = _count(state, r"decode_head\.side_adapter_network\.conv_clips\.(\d+)\.")
    for key, value in state.items():
        if key.startswith("image_encoder."):
            rest = key[len("image_encoder."):]
            if rest == "cls_token":
                clip["visual.class_embedding"] = value.reshape(-1)
            elif rest == "pos_embed":
                clip["visual.positional_embedding"] = value[0]
                head["clip_pos_embed"] = value[0]
            elif rest == "patch_embed.projection.weight":
                clip["visual.conv1.weight"] = value
            elif rest.startswith("ln_pre."):
                clip["visual." + rest] = value
            elif m := re.match(r"layers\.(\d+)\.(.*)", rest):
                block = _rename(m.group(2), _MMSEG_VIT_TO_CLIP, key[: -len(m.group(2))])
                clip[f"visual.transformer.resblocks.{m.group(1)}.{block}"] = value
            else:
                raise ConversionError(f"unexpected key {key}")
        elif key.startswith("decode_head.rec_with_attnbias."):
            rest = key[len("decode_head.rec_with_attnbias."):]
            if rest == "proj.weight":
                clip["visual.proj"] = value.t().contiguous()  # Linear [D, W] → open_clip [W, D]
            elif rest.startswith("ln_post."):
                clip["visual." + rest] = value
            elif m := re.match(r"layers\.(\d+)\.(.*)", rest):
                block = _rename(m.group(2), _MMCV_LAYER, key[: -len(m.group(2))])
                clip[f"visual.transformer.resblocks.{trunk + int(m.group(1))}.{block}"] = value
            else:
                raise ConversionError(f"unexpected key {key}")
        elif key.startswith("decode_head.side_adapter_network."):
            rest = key[len("decode_head.side_adapter_network."):]
            if rest in ("pos_embed", "query_embed", "query_pos_embed"):
                head[rest] = value
            elif rest.startswith("patch_embed.projection."):
                head["patch_embed." + rest.split(".")[-1]] = value
            elif m := re.match(r"encode_layers\.(\d+)\.(.*)", rest):
                block = _rename(m.group(2), _MMSEG_VIT_TO_SIDE, key[: -len(m.group(2))])
                head[f"blocks.{m.group(1)}.{block}"] = value
            elif m := re.match(r"conv_clips\.(\d+)\.0\.(weight|bias)$", rest):
                head[f"fusions.{m.group(1)}.norm.{m.group(2)}"] = value
            elif m := re.match(r"conv_clips\.(\d+)\.1\.conv\.(weight|bias)$", rest):
                head[f"fusions.{m.group(1)}.proj.{m.group(2)}"] = value
            elif rest.startswith("mask_decoder."):
                head["decoder." + rest[len("mask_decoder."):]] = value
            else:
                raise ConversionError(f"unexpected key {key}")
        elif key.startswith("text_encoder."):
            rest = key[len("text_encoder."):]
            if rest == "bg_embed":
                head["void_embed"] = value
            elif rest in ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"):
                clip[rest] = value
            elif rest.startswith("ln_final."):
                clip[rest] = value
            elif m := re.match(r"transformer\.(\d+)\.(.*)", rest):
                block = _rename(m.group(2), _MMCV_LAYER, key[: -len(m.group(2))])
                clip[f"transformer.resblocks.{m.group(1)}.{block}"] = value
            else:
                raise ConversionError(f"unexpected key {key}")
        elif key.startswith("data_preprocessor."):
            continue  # mean and std; ovdense takes them from the backbone
        else:
            raise ConversionError(f"unexpected key {key}")
    config = _side_config(head, trunk)
    config["side_targets"] = list(range(fusions))
    return head, clip, config


def convert_official(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """MendelXu/SAN detectron2 ``SAN`` (``model_final.pth``) → ``(head_state, clip_state, config)``."""
    state = _strip(state)
    head: dict[str, torch.Tensor] = {}
    clip: dict[str, torch.Tensor] = {}
    trunk = _count(state, r"clip_visual_extractor\.resblocks\.(\d+)\.")
    targets = sorted({int(m.group(1)) for k in state
                      if (m := re.match(r"side_adapter_network\.fusion_layers\.layer_(\d+)\.", k))})
    fusion_index = {t: i for i, t in enumerate(targets)}
    for key, value in state.items():
        if key.startswith("clip_visual_extractor."):
            rest = key[len("clip_visual_extractor."):]
            if rest == "positional_embedding":
                clip["visual.positional_embedding"] = value
                head["clip_pos_embed"] = value
            elif rest in ("class_embedding", "conv1.weight") or rest.startswith(("ln_pre.", "resblocks.")):
                clip["visual." + rest.replace("resblocks.", "transformer.resblocks.")] = value
            else:
                raise ConversionError(f"unexpected key {key}")
        elif key.startswith("clip_rec_head."):
            rest = key[len("clip_rec_head."):]
            if rest == "proj" or rest.startswith("ln_post."):
                clip["visual." + rest] = value
            elif m := re.match(r"resblocks\.(\d+)\.(.*)", rest):
                clip[f"visual.transformer.resblocks.{trunk + int(m.group(1))}.{m.group(2)}"] = value
            else:
                raise ConversionError(f"unexpected key {key}")
        elif key.startswith("side_adapter_network."):
            rest = key[len("side_adapter_network."):]
            if rest in ("query_embed", "query_pos_embed"):
                head[rest] = value
            elif rest == "vit_model.pos_embed":
                head["pos_embed"] = value
            elif rest.startswith("vit_model.patch_embed.proj."):
                head["patch_embed." + rest.split(".")[-1]] = value
            elif m := re.match(r"vit_model\.blocks\.(\d+)\.(.*)", rest):
                head[f"blocks.{m.group(1)}.{m.group(2)}"] = value
            elif m := re.match(r"fusion_layers\.layer_(\d+)\.input_proj\.([01])\.(weight|bias)$", rest):
                part = "norm" if m.group(2) == "0" else "proj"
                head[f"fusions.{fusion_index[int(m.group(1))]}.{part}.{m.group(3)}"] = value
            elif rest.startswith("mask_decoder."):
                head["decoder." + rest[len("mask_decoder."):]] = value
            else:
                raise ConversionError(f"unexpected key {key}")
        elif key.startswith("ov_classifier."):
            rest = key[len("ov_classifier."):]
            if rest == "bg_embed":
                head["void_embed"] = value
            elif rest == "attn_mask":
                continue  # the causal mask, a buffer open_clip rebuilds
            elif rest in ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"):
                clip[rest] = value
            elif rest.startswith(("ln_final.", "transformer.resblocks.")):
                clip[rest] = value
            else:
                raise ConversionError(f"unexpected key {key}")
        elif key == "criterion.empty_weight":
            continue  # the loss's class weights
        elif key in ("pixel_mean", "pixel_std"):
            continue
        else:
            raise ConversionError(f"unexpected key {key}")
    config = _side_config(head, trunk)
    config["side_targets"] = targets
    return head, clip, config


CONVERTERS = {"mmseg": convert_mmseg, "official": convert_official}


def convert(state: dict[str, torch.Tensor], layout: str = "auto") -> tuple[dict, dict, dict]:
    layout = detect_layout(state) if layout == "auto" else layout
    return CONVERTERS[layout](state)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` (``weights_only=True``) or ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap(load_file(str(path)))
    return unwrap(torch.load(path, map_location="cpu", weights_only=True))


def write(
    head: dict,
    clip: dict,
    config: dict,
    out_dir: str | Path,
    model: str,
    side_heads: int = 6,
    backbone=None,
) -> tuple[Path, Path]:
    """Write ``clip.safetensors`` and ``san-head.safetensors``.

    The head is written for ``backbone`` when one is given (e.g. ``ViT-B-16`` with the ``openai``
    tag, which SAN trained on, frozen), after checking that every CLIP tensor of the checkpoint
    but the position embedding (SAN's copy is in the head) equals the backbone's; otherwise for
    ``model`` on the written CLIP file. Either way the head passes a strict load into a SanHead.

    Raises:
        ConversionError: the backbone's CLIP weights are not the checkpoint's.
    """
    from safetensors.torch import save

    from ovdense import create_backbone
    from ovdense.heads.san import SanConfig, SanHead, save_head
    from ovdense.io import write_bytes

    out = Path(out_dir)
    clip_path = write_bytes(out / "clip.safetensors", save({k: v.contiguous() for k, v in clip.items()}))
    if backbone is None:
        backbone = create_backbone(model, pretrained=str(clip_path))
    else:
        own = backbone.model.state_dict()
        for key, value in clip.items():
            if key == "visual.positional_embedding":
                continue
            if key not in own or own[key].shape != value.shape or not torch.allclose(
                own[key].float().cpu(), value.float(), rtol=0, atol=1e-6
            ):
                raise ConversionError(
                    f"the checkpoint's CLIP is not backbone {backbone.name!r} ({backbone.fingerprint}): "
                    f"{key} differs; use the written {clip_path} as the backbone's weights instead"
                )
    san = SanHead(backbone, SanConfig(**{**config, "side_heads": side_heads,
                                         "side_targets": tuple(config["side_targets"])}))
    san.load_state_dict(head, strict=True)
    return clip_path, save_head(out / "san-head.safetensors", san, backbone)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="SAN checkpoint (.pth or .safetensors)")
    parser.add_argument("out_dir", help="folder for clip.safetensors and san-head.safetensors")
    parser.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto")
    parser.add_argument("--model", default=None,
                        help="open_clip model name of the CLIP (default: ViT-B-16-quickgelu or "
                             "ViT-L-14-336-quickgelu by the weights' width)")
    parser.add_argument("--side-heads", type=int, default=6, help="side ViT heads (not in the weights)")
    parser.add_argument("--backbone", default=None,
                        help="write the head for this ovdense backbone (e.g. ViT-B-16, with --pretrained "
                             "openai) after checking its CLIP weights are the checkpoint's; default: "
                             "--model on the written clip.safetensors")
    parser.add_argument("--pretrained", default=None, help="the --backbone's weights (tag or file)")
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
    except (pickle.UnpicklingError, RuntimeError) as e:
        print(f"error: {args.checkpoint} holds more than tensors and plain containers, so "
              f"torch.load(weights_only=True) refuses it ({str(e).splitlines()[0][:200]}). If you trust "
              "the file, keep only its weights first: torch.save({'model': torch.load(PATH, "
              "weights_only=False)['model']}, 'weights.pth')", file=sys.stderr)
        return 1
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        head, clip, config = convert(state, args.layout)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = args.model or ("ViT-L-14-336-quickgelu" if clip["visual.conv1.weight"].shape[0] == 1024
                           else "ViT-B-16-quickgelu")
    try:
        backbone = None
        if args.backbone is not None:
            from ovdense import OvdenseError, create_backbone

            try:
                backbone = create_backbone(args.backbone, pretrained=args.pretrained)
            except OvdenseError as e:
                raise ConversionError(str(e)) from e
        clip_path, head_path = write(head, clip, config, args.out_dir, model, args.side_heads, backbone)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    target = f"backbone {backbone.name}" if backbone is not None else f"open_clip {model} on {clip_path}"
    print(f"wrote {clip_path} and {head_path} for {target} "
          f"({sum(v.numel() for v in head.values()) / 1e6:.2f} M head parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
