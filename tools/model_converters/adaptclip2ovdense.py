"""Convert an official AdaptCLIP checkpoint (gaobb/AdaptCLIP ``epoch_15.pth``, as published on Hugging
Face csgaobb/AdaptCLIP) into an ovdense AdaptCLIP head file.

The official file (written by ``train.py``'s ``torch.save``, read by ``test.py``) is
``{"textual_learner": {...}, "visual_learner": {...}, "pq_learner": {...}}``, the three adapters' state
dicts; it is read with ``torch.load(weights_only=True)`` (nothing but tensors and plain containers is
unpickled). The keys map as::

    textual_learner.ctx_pos [1, 1, n_ctx, w]          → ctx_normal [n_ctx, w]
    textual_learner.ctx_neg                           → ctx_anomalous
    visual_learner.global_adapter.fc.*                → visual_global.fc.*
    visual_learner.local_adater.fc.*                  → visual_local.fc.*      (the official spelling)
    pq_learner.sharebn.{i}.*                          → prompt_query.norms.{i}.*
    pq_learner.local_adapter.{i}.*   (i = 0 … taps-1) → prompt_query.local_head.*
    pq_learner.global_adapter.{i}.*                   → prompt_query.global_head.*

The official ``PQAdapter`` repeats one module in its ``ModuleList``s, so every copy ``i`` must hold the
same tensors (checked). The textual adapter's buffers (``token_prefix_*``, ``token_suffix_*``,
``tokenized_prompts_*``: the prompt's frozen token embeddings) are not kept: ovdense rebuilds them from
the backbone. The context length, bottleneck and prompt–query width are read from the weights; the
input size, the taps, ``pq_context`` and σ are not in them (flags; the defaults are the published
scripts': 518, 6/12/18/24, on, 4). Every key and shape is checked.

    python tools/model_converters/adaptclip2ovdense.py epoch_15.pth weights/adaptclip \\
        --backbone ViT-L-14-336 --pretrained openai                  # or --pretrained /path/to/weights

writes ``OUT/adaptclip-head.safetensors`` atomically (``AdaptClip(backbone, head_checkpoint=...)``, CLI
``--head-checkpoint``), for that backbone only.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

HEAD_FILE = "adaptclip-head.safetensors"
PARTS = ("textual_learner", "visual_learner", "pq_learner")
TEXT_BUFFERS = ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg",
                "tokenized_prompts_pos", "tokenized_prompts_neg")


class ConversionError(Exception):
    """The file is not an official AdaptCLIP checkpoint, or does not fit the backbone."""


def load_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The three adapters' state dicts of an official checkpoint.

    Raises:
        ConversionError: not a dict of the three state dicts of tensors.
        pickle.UnpicklingError, RuntimeError: ``torch.load(weights_only=True)`` refused the file.
    """
    from ovdense.io import read_weights

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    checkpoint = read_weights(path)
    if not isinstance(checkpoint, dict) or any(not isinstance(checkpoint.get(p), dict) for p in PARTS):
        have = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(f"not an official AdaptCLIP checkpoint: it holds {have}, expected the state "
                              f"dicts {', '.join(PARTS)}")
    for part in PARTS:
        if not all(isinstance(v, torch.Tensor) for v in checkpoint[part].values()):
            raise ConversionError(f"{part} is not a state dict of tensors")
    return {part: dict(checkpoint[part]) for part in PARTS}


def map_state(checkpoint: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
    """The ovdense head's state dict and the config fields the weights fix (``n_ctx``, ``reduction``,
    ``pq_mid_dim``, the number of taps).

    Raises:
        ConversionError: a missing or unexpected key, or copies of the shared modules that differ.
    """
    text, visual, pq = (checkpoint[p] for p in PARTS)
    state: dict[str, torch.Tensor] = {}
    for official, own in (("ctx_pos", "ctx_normal"), ("ctx_neg", "ctx_anomalous")):
        if official not in text:
            raise ConversionError(f"textual_learner lacks {official}")
        ctx = text[official]
        state[own] = ctx.reshape(ctx.shape[-2], ctx.shape[-1]).float()
    unexpected = sorted(set(text) - {"ctx_pos", "ctx_neg", *TEXT_BUFFERS})
    if unexpected:
        raise ConversionError(f"textual_learner has unexpected keys {unexpected[:5]}")
    for official, own in (("global_adapter.fc.", "visual_global.fc."),
                          ("local_adater.fc.", "visual_local.fc.")):
        keys = [k for k in visual if k.startswith(official)]
        if not keys:
            raise ConversionError(f"visual_learner lacks {official}*")
        state.update({own + k[len(official):]: visual[k] for k in keys})
    unexpected = sorted(k for k in visual if not k.startswith(("global_adapter.fc.", "local_adater.fc.")))
    if unexpected:
        raise ConversionError(f"visual_learner has unexpected keys {unexpected[:5]}")
    taps = sorted({int(k.split(".")[1]) for k in pq if k.startswith("sharebn.")})
    if not taps or taps != list(range(len(taps))):
        raise ConversionError(f"pq_learner's sharebn has entries {taps}, expected 0 … n-1")
    for k in pq:
        if k.startswith("sharebn."):
            state["prompt_query.norms." + k[len("sharebn."):]] = pq[k]
    for official, own in (("local_adapter", "local_head"), ("global_adapter", "global_head")):
        first = {k[len(f"{official}.0."):]: v for k, v in pq.items() if k.startswith(f"{official}.0.")}
        if not first:
            raise ConversionError(f"pq_learner lacks {official}.0.*")
        for i in taps[1:]:
            copy = {k[len(f"{official}.{i}."):]: v for k, v in pq.items() if k.startswith(f"{official}.{i}.")}
            if copy.keys() != first.keys() or any(not torch.equal(copy[k], first[k]) for k in first):
                raise ConversionError(f"pq_learner.{official}.{i} differs from {official}.0: the official "
                                      "PQAdapter shares one module over its taps")
        state.update({f"prompt_query.{own}.{k}": v for k, v in first.items()})
    unexpected = sorted(k for k in pq if not k.startswith(("sharebn.", "local_adapter.", "global_adapter.")))
    if unexpected:
        raise ConversionError(f"pq_learner has unexpected keys {unexpected[:5]}")
    try:
        dim = state["visual_global.fc.0.weight"].shape[1]
        fields = {"n_ctx": int(state["ctx_normal"].shape[0]),
                  "reduction": int(dim // state["visual_global.fc.0.weight"].shape[0]),
                  "pq_mid_dim": int(state["prompt_query.local_head.0.weight"].shape[0])}
    except KeyError as e:
        raise ConversionError(f"not the official adapter layout: {e} is missing") from e
    return state, {"fields": fields, "taps": len(taps)}


def convert(checkpoint: str | Path, out_dir: str | Path, backbone, image_size: int = 518,
            taps: tuple[int, ...] = (), pq_context: bool = True, sigma: float = 4.0) -> Path:
    """Read ``checkpoint``, check it against ``backbone`` and write ``OUT/adaptclip-head.safetensors``
    (atomically: a failed conversion leaves an existing file as it was).

    Raises:
        ConversionError: the file is not an official checkpoint or does not fit the backbone.
    """
    from ovdense.anomaly.adaptclip import AdaptClipConfig, AdaptClipHead, save_head
    from ovdense.errors import OvdenseError

    state, found = map_state(load_checkpoint(checkpoint))
    config = AdaptClipConfig(image_size=image_size, taps=tuple(taps), pq_context=pq_context, sigma=sigma,
                             **found["fields"])
    try:
        head = AdaptClipHead(backbone, config)
    except OvdenseError as e:
        raise ConversionError(str(e)) from e
    if len(head.taps) != found["taps"]:
        raise ConversionError(f"the checkpoint has {found['taps']} prompt-query taps, the head reads "
                              f"{len(head.taps)} ({list(head.taps)}): pass --taps")
    expected = head.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"the adapters do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConversionError(f"{key} has shape {tuple(tensor.shape)}, the head for {backbone.name} "
                                  f"expects {tuple(expected[key].shape)}: were the adapters trained on "
                                  "another backbone?")
    head.load_state_dict(state, strict=True)
    return save_head(Path(out_dir) / HEAD_FILE, head, backbone)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the official epoch_15.pth")
    parser.add_argument("out_dir", help=f"folder for {HEAD_FILE}")
    parser.add_argument("--backbone", default="ViT-L-14-336",
                        help="the ovdense backbone the adapters were trained on (default: ViT-L-14-336, "
                        "the official)")
    parser.add_argument("--pretrained", default="openai", help="the --backbone's weights: a tag or a file")
    parser.add_argument("--image-size", type=int, default=518,
                        help="the input side (default 518, the official)")
    parser.add_argument("--taps", type=int, nargs="+", default=[],
                        help="1-indexed tapped blocks (default: the depth's quarters, 6 12 18 24 on ViT-L)")
    parser.add_argument("--no-pq-context", action="store_true",
                        help="the adapters were trained without --pq_context (|q - p| only)")
    parser.add_argument("--sigma", type=float, default=4.0, help="the map's Gaussian σ in pixels (default 4)")
    args = parser.parse_args(argv)
    from ovdense.errors import OvdenseError

    try:
        from ovdense import create_backbone

        backbone = create_backbone(args.backbone, pretrained=args.pretrained)
        path = convert(args.checkpoint, args.out_dir, backbone, args.image_size, tuple(args.taps),
                       not args.no_pq_context, args.sigma)
    except (pickle.UnpicklingError, RuntimeError, ValueError) as e:
        from ovdense.errors import checkpoint_error_text

        print(f"error: {args.checkpoint} is not a weights file torch.load(weights_only=True) or safetensors "
              f"reads ({checkpoint_error_text(e)}); give the official epoch_15.pth", file=sys.stderr)
        return 2
    except (ConversionError, OvdenseError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
