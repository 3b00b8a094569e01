"""Convert published CLIPSeg weights into an ovdense CLIPSeg head (and, where the file has it, an
open_clip CLIP state dict).

Two layouts are read (``torch.load(weights_only=True)`` or safetensors; nothing is unpickled):

* **transformers** — ``CLIPSegForImageSegmentation`` (``CIDAS/clipseg-rd64-refined``,
  ``-rd64``, ``-rd16``: ``model.safetensors`` or ``pytorch_model.bin``): ``clip.vision_model.*``,
  ``clip.text_model.*``, ``clip.visual_projection``, ``clip.text_projection``,
  ``clip.logit_scale`` (the whole CLIP, written as an open_clip ``ViT-B-16-quickgelu`` state
  dict) and ``decoder.*`` (the head: ``film_mul``, ``film_add``, ``reduces.i``, ``layers.i`` with
  ``q/k/v_proj``, ``out_proj``, ``layer_norm1/2``, ``mlp.fc1/2``, ``transposed_convolution``).
* **official** — timojl/clipseg's decoder-only files (``weights/rd64-uni.pth``,
  ``rd64-uni-refined.pth``, ``rd16-uni.pth``): ``film_mul``, ``film_add``, ``reduces.i``,
  ``blocks.i`` (``nn.TransformerEncoderLayer``: ``self_attn.in_proj_*``, ``linear1/2``,
  ``norm1/2``) and ``trans_conv``; the unused ``reduce`` layer is dropped. Their CLIP is
  OpenAI's ViT-B/16: ``--backbone ViT-B-16 --pretrained openai``.

Usage::

    python tools/model_converters/clipseg2ovdense.py model.safetensors out/           # transformers
    python tools/model_converters/clipseg2ovdense.py rd64-uni-refined.pth out/ \\
        --backbone ViT-B-16 --pretrained openai                                       # official

writes ``out/clipseg-head.safetensors`` (``ClipSegSegmenter(backbone, classes,
head_checkpoint=...)``) and, for transformers files, ``out/clip.safetensors`` (load it with
``create_backbone("ViT-B-16-quickgelu", pretrained=...)``), the head written for that backbone.
The decoder's shape (reduce dim, heads, FFN, the refined head) is read from the weights.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

LAYOUTS = ("transformers", "official")


class ConversionError(Exception):
    """The file is not a CLIPSeg checkpoint this converter knows."""


def unwrap(checkpoint) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (plain, or under ``state_dict`` / ``model``)."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}
    raise ConversionError("the checkpoint holds no state dict of tensors")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or a ``.pth``/``.bin`` file (``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap(load_file(str(path)))
    return unwrap(torch.load(path, map_location="cpu", weights_only=True))


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("decoder.") for k in state):
        return "transformers"
    if "film_mul.weight" in state and any(k.startswith("blocks.") for k in state):
        return "official"
    raise ConversionError("neither a transformers CLIPSeg (decoder.*) nor an official CLIPSeg decoder "
                          "(film_mul, blocks.*) checkpoint")


def _qkv(state: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``q/k/v_proj`` of a transformers attention → ``in_proj_weight``, ``in_proj_bias``."""
    weight = torch.cat([state[f"{prefix}{n}_proj.weight"] for n in "qkv"])
    bias = torch.cat([state[f"{prefix}{n}_proj.bias"] for n in "qkv"])
    return weight, bias


def _tower(state: dict, src: str, dst: str, layers: int) -> dict[str, torch.Tensor]:
    """A transformers CLIP encoder (``src`` + ``encoder.layers.i``) → open_clip resblocks."""
    out = {}
    for i in range(layers):
        s, d = f"{src}encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
        out[d + "attn.in_proj_weight"], out[d + "attn.in_proj_bias"] = _qkv(state, s + "self_attn.")
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                     ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{d}{b}.weight"], out[f"{d}{b}.bias"] = state[f"{s}{a}.weight"], state[f"{s}{a}.bias"]
    return out


def _count(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def convert_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP of a transformers CLIPSeg file as an open_clip ``CLIP`` state dict."""
    v, t = "clip.vision_model.", "clip.text_model."
    out = {
        "visual.class_embedding": state[v + "embeddings.class_embedding"],
        "visual.conv1.weight": state[v + "embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state[v + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state[v + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": state[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": state[v + "post_layernorm.weight"],
        "visual.ln_post.bias": state[v + "post_layernorm.bias"],
        "visual.proj": state["clip.visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": state[t + "embeddings.token_embedding.weight"],
        "positional_embedding": state[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": state[t + "final_layer_norm.weight"],
        "ln_final.bias": state[t + "final_layer_norm.bias"],
        "text_projection": state["clip.text_projection.weight"].T.contiguous(),
        "logit_scale": state["clip.logit_scale"].reshape(()),
    }
    out.update(_tower(state, v, "visual.", _count(state, v + "encoder.layers.")))
    out.update(_tower(state, t, "", _count(state, t + "encoder.layers.")))
    return out


def _head_config(head: dict[str, torch.Tensor], heads: int) -> dict:
    """The ``ClipSegConfig`` fields the decoder's weights fix."""
    refined = "trans_conv.0.weight" in head
    return {
        "reduce_dim": int(head["film_mul.weight"].shape[0]),
        "mlp": int(head["blocks.0.linear1.weight"].shape[0]),
        "heads": heads,
        "refined": refined,
    }


def convert_transformers(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(head_state, clip_state)`` of a transformers ``CLIPSegForImageSegmentation`` file."""
    d = "decoder."
    head = {}
    for name in ("film_mul", "film_add"):
        head[f"{name}.weight"], head[f"{name}.bias"] = state[f"{d}{name}.weight"], state[f"{d}{name}.bias"]
    for i in range(_count(state, d + "reduces.")):
        head[f"reduces.{i}.weight"], head[f"reduces.{i}.bias"] = state[f"{d}reduces.{i}.weight"], \
            state[f"{d}reduces.{i}.bias"]
    for i in range(_count(state, d + "layers.")):
        s, b = f"{d}layers.{i}.", f"blocks.{i}."
        weight, bias = _qkv(state, s + "self_attn.")
        head[b + "self_attn.in_proj_weight"], head[b + "self_attn.in_proj_bias"] = weight, bias
        for a, o in (("self_attn.out_proj", "self_attn.out_proj"), ("layer_norm1", "norm1"),
                     ("layer_norm2", "norm2"), ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2")):
            head[f"{b}{o}.weight"], head[f"{b}{o}.bias"] = state[f"{s}{a}.weight"], state[f"{s}{a}.bias"]
    for key, value in state.items():
        if key.startswith(d + "transposed_convolution."):
            head["trans_conv." + key[len(d + "transposed_convolution."):]] = value
    return head, convert_clip(state)


def convert_official(state: dict[str, torch.Tensor]) -> tuple[dict, None]:
    """``(head_state, None)`` of an official decoder-only file (its CLIP is OpenAI's ViT-B/16)."""
    head = {}
    for key, value in state.items():
        if key.startswith(("film_mul.", "film_add.", "reduces.", "blocks.", "trans_conv.")):
            head[key] = value
        elif key.startswith("reduce.") or key.startswith("clip_model.") or key.startswith("model."):
            continue  # the unused reduce layer; CLIP itself (files saved with it)
        else:
            raise ConversionError(f"unexpected key in an official CLIPSeg decoder: {key}")
    if any(k.startswith("extra_blocks.") for k in state) or "reduce_cond.weight" in state:
        raise ConversionError("extra_blocks / reduce_cond variants of CLIPDensePredT are not supported")
    return head, None


def convert(state: dict[str, torch.Tensor], layout: str = "auto") -> tuple[dict, dict | None]:
    layout = detect_layout(state) if layout == "auto" else layout
    return (convert_transformers if layout == "transformers" else convert_official)(state)


def write(head: dict, clip: dict | None, out_dir: str | Path, model: str = "ViT-B-16-quickgelu",
          backbone=None, heads: int = 4, taps: tuple[int, ...] = (3, 6, 9)) -> tuple[Path | None, Path]:
    """Write ``clip.safetensors`` (when the file had a CLIP) and ``clipseg-head.safetensors``.

    The head is written for ``backbone`` when one is given (after checking that the file's CLIP,
    if it has one, is that backbone's), otherwise for ``model`` on the written CLIP file.

    Raises:
        ConversionError: no backbone for a decoder-only file, or a backbone whose CLIP differs.
    """
    from safetensors.torch import save

    from ovdense import create_backbone
    from ovdense.heads.clipseg import ClipSegConfig, ClipSegHead, save_head
    from ovdense.io import write_bytes

    out = Path(out_dir)
    clip_path = None
    if clip is not None:
        clip_path = write_bytes(out / "clip.safetensors", save({k: v.contiguous() for k, v in clip.items()}))
    if backbone is None:
        if clip_path is None:
            raise ConversionError("an official decoder-only file needs its CLIP: --backbone ViT-B-16 "
                                  "--pretrained openai (or a local OpenAI ViT-B/16 file)")
        backbone = create_backbone(model, pretrained=str(clip_path))
    elif clip is not None:
        own = backbone.model.state_dict()
        for key, value in clip.items():
            if key not in own or own[key].shape != value.shape or not torch.allclose(
                    own[key].float().cpu(), value.float(), rtol=0, atol=1e-6):
                raise ConversionError(f"the file's CLIP is not backbone {backbone.name!r}: {key} differs; "
                                      f"use the written {clip_path} as the backbone's weights instead")
    config = ClipSegConfig(taps=tuple(taps), **_head_config(head, heads))
    module = ClipSegHead(backbone, config)
    module.load_state_dict(head, strict=True)
    return clip_path, save_head(out / "clipseg-head.safetensors", module, backbone)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="CLIPSeg weights (.safetensors, .bin or .pth)")
    parser.add_argument("out_dir", help="folder for clipseg-head.safetensors (and clip.safetensors)")
    parser.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto")
    parser.add_argument("--model", default="ViT-B-16-quickgelu",
                        help="open_clip name of a transformers file's CLIP")
    parser.add_argument("--heads", type=int, default=4, help="decoder attention heads (not in the weights)")
    parser.add_argument("--backbone", default=None,
                        help="write the head for this ovdense backbone (ViT-B-16 with --pretrained "
                             "openai for the official files)")
    parser.add_argument("--pretrained", default=None, help="the --backbone's weights (tag or file)")
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
        head, clip = convert(state, args.layout)
    except (pickle.UnpicklingError, RuntimeError) as e:
        print(f"error: {args.checkpoint} holds more than tensors, so torch.load(weights_only=True) refuses "
              f"it ({str(e).splitlines()[0][:200]})", file=sys.stderr)
        return 1
    except (ConversionError, OSError, KeyError) as e:
        print(f"error: {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    from ovdense import OvdenseError, create_backbone

    try:
        backbone = create_backbone(args.backbone, pretrained=args.pretrained) if args.backbone else None
        clip_path, head_path = write(head, clip, args.out_dir, args.model, backbone, args.heads)
    except (ConversionError, OvdenseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if clip_path is not None:
        print(f"wrote {clip_path} (open_clip {args.model})")
    print(f"wrote {head_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
