"""Convert the official CLIP-DINOiser checkpoint (wysoczanska/clip_dinoiser ``checkpoints/last.pt``)
into an ovdense CLIP-DINOiser head file.

The official file (written by ``train.py:31-37, 89-92``; read by ``main_eval.py:42-44`` with
``strict=False``) is ``{'epoch': int, 'model_state_dict': {...}}`` holding the two trained
convolutions and nothing of CLIP::

    obj_proj.weight     [256, 768, 3, 3]   obj_proj.bias     [256]
    bkg_decoder.weight  [1, 768, 1, 1]     bkg_decoder.bias  [1]

It is read with ``torch.load(weights_only=True)`` (``ovdense.io.read_checkpoint``; nothing is
unpickled but tensors and plain containers); a bare state dict of those four keys, or a
``.safetensors`` file of them, is read too. Every key and shape is checked (the official
``strict=False`` load would ignore a misspelt key); the projection width and kernel are read from
the weights, the tap block (``feats_idx``, −3) is not in them (``--tap``).

The head is written for a backbone: the official one is open_clip ``ViT-B-16`` with the
``laion2b_s34b_b88k`` weights (``configs/maskclip.yaml``), the default here::

    python tools/model_converters/clipdinoiser2ovdense.py checkpoints/last.pt weights/clipdinoiser
    python tools/model_converters/clipdinoiser2ovdense.py last.pt out/ --backbone ViT-B-16 \\
        --pretrained /path/to/open_clip_pytorch_model.bin                      # offline: the file

writes ``OUT/clipdinoiser-head.safetensors`` atomically (``ClipDinoiserSegmenter(backbone, classes,
head_checkpoint=...)``, CLI ``--head-checkpoint``), for that backbone only.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

HEAD_FILE = "clipdinoiser-head.safetensors"
KEYS = ("obj_proj.weight", "obj_proj.bias", "bkg_decoder.weight", "bkg_decoder.bias")


class ConversionError(Exception):
    """The file is not an official CLIP-DINOiser checkpoint, or does not fit the backbone."""


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The four trained tensors of an official ``last.pt`` (or a bare state dict, or safetensors).

    Raises:
        ConversionError: not a dict of tensors, or not exactly the four keys.
        pickle.UnpicklingError, RuntimeError: ``torch.load(weights_only=True)`` refused the file.
    """
    from ovdense.io import read_weights

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    checkpoint = read_weights(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_state_dict"), dict):
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ConversionError("the file holds no state dict of tensors (the official last.pt has "
                              "'model_state_dict' with obj_proj.* and bkg_decoder.*)")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}
    missing = [k for k in KEYS if k not in state]
    unexpected = sorted(k for k in state if k not in KEYS)
    if missing or unexpected:
        raise ConversionError(f"not an official CLIP-DINOiser checkpoint: missing keys {missing}, unexpected "
                              f"keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''} (expected "
                              f"{', '.join(KEYS)})")
    return {k: state[k].float() for k in KEYS}


def check_shapes(state: dict[str, torch.Tensor], width: int | None = None) -> dict:
    """The ``ClipDinoiserConfig`` fields the weights fix (``proj_dim``, ``kernel``), after checking
    the shapes fit together and, given ``width``, a backbone of that token width.

    Raises:
        ConversionError: a shape that is not the official layout, or another width.
    """
    weight = state["obj_proj.weight"]
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ConversionError(f"obj_proj.weight has shape {tuple(weight.shape)}, not [P, W, k, k] with an "
                              "odd k (the official [256, 768, 3, 3])")
    proj_dim, in_width, kernel = int(weight.shape[0]), int(weight.shape[1]), int(weight.shape[2])
    expected = {"obj_proj.bias": (proj_dim,), "bkg_decoder.weight": (1, in_width, 1, 1),
                "bkg_decoder.bias": (1,)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{key} has shape {tuple(state[key].shape)}, expected {shape} beside "
                                  f"obj_proj.weight {tuple(weight.shape)}")
    if width is not None and in_width != width:
        raise ConversionError(f"the convolutions read {in_width}-wide tokens, but the backbone's width is "
                              f"{width}: the official head is for ViT-B-16 (768); pass the backbone it was "
                              "trained on")
    return {"proj_dim": proj_dim, "kernel": kernel}


def convert(checkpoint: str | Path, out_dir: str | Path, backbone, tap: int = -3) -> Path:
    """Read ``checkpoint``, check it against ``backbone`` and write ``OUT/clipdinoiser-head.safetensors``
    (atomically: a failed conversion leaves an existing file as it was).

    Raises:
        ConversionError: the file is not an official checkpoint or does not fit the backbone.
    """
    return write(load_checkpoint(checkpoint), out_dir, backbone, tap)


def write(state: dict[str, torch.Tensor], out_dir: str | Path, backbone, tap: int = -3) -> Path:
    """``convert`` for the four tensors already read (``load_checkpoint``)."""
    from ovdense.errors import OvdenseError
    from ovdense.heads.clipdinoiser import ClipDinoiserConfig, ClipDinoiserHead, save_head

    fields = check_shapes(state, backbone.width)
    try:
        head = ClipDinoiserHead(backbone, ClipDinoiserConfig(tap=tap, **fields))
    except OvdenseError as e:
        raise ConversionError(str(e)) from e
    head.load_state_dict(state, strict=True)
    return save_head(Path(out_dir) / HEAD_FILE, head, backbone)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the official checkpoints/last.pt (or its four tensors)")
    parser.add_argument("out_dir", help=f"folder for {HEAD_FILE}")
    parser.add_argument("--backbone", default="ViT-B-16",
                        help="the ovdense backbone the head was trained on (default: ViT-B-16, the official)")
    parser.add_argument("--pretrained", default="laion2b_s34b_b88k",
                        help="the --backbone's weights: a tag or a file (default: laion2b_s34b_b88k, the "
                             "official)")
    parser.add_argument("--tap", type=int, default=-3,
                        help="the block whose ln_2 output the convolutions read (feats_idx; default -3)")
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError) as e:
        from ovdense.errors import checkpoint_error_text

        print(f"error: {args.checkpoint} is not a weights file torch.load(weights_only=True) or safetensors "
              f"reads ({checkpoint_error_text(e)}); give the official checkpoints/last.pt", file=sys.stderr)
        return 1
    except ConversionError as e:
        print(f"error: {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    from ovdense import OvdenseError, create_backbone

    try:
        check_shapes(state)  # before the backbone is built: a broken file fails at once
        backbone = create_backbone(args.backbone, pretrained=args.pretrained)
        path = write(state, args.out_dir, backbone, args.tap)
    except ConversionError as e:
        print(f"error: {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    except OvdenseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} (CLIP-DINOiser head for {args.backbone} {args.pretrained})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
