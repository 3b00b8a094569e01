"""Trained heads on disk: safetensors with string metadata that names the backbone they were
trained on, read back strictly (SAN and CLIPSeg; F-ViT keeps its own format, a state and config
for mmdet's model too).

A head file holds the head's tensors (optionally in fp16) and ``format``, ``backbone`` (its
name), ``fingerprint`` (``ClipBackbone.identity``), ``config`` (the head's config as JSON) and
``ovdense_version``. Reading never unpickles anything; a file of another kind, backbone, key set
or shape is refused with one message saying which and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ovdense.backbone.clip import ClipBackbone
from ovdense.errors import OvdenseError
from ovdense.io import write_bytes


def write_head(path: str | Path, head: nn.Module, backbone: ClipBackbone, format: str,
               dtype: torch.dtype | None = None) -> Path:
    """Write ``head`` (which has a ``config.to_json()``) atomically; ``dtype`` (e.g.
    ``torch.float16``) stores the floating tensors in that type, cast back on reading."""
    from safetensors.torch import save

    from ovdense.version import __version__

    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {"format": format, "backbone": backbone.name, "fingerprint": backbone.identity,
                "config": head.config.to_json(), "ovdense_version": __version__}
    return write_bytes(path, save(tensors, metadata=metadata))


def read_head(path: str | Path, backbone: ClipBackbone, format: str, title: str,
              build: Callable[[str], nn.Module], converter: str, writer: str) -> nn.Module:
    """Read a head written by ``write_head`` with ``format`` for ``backbone``.

    Args:
        title: the head's name in messages (``"SAN"``).
        build: the head from its config's JSON (the file's ``config`` entry, ``"{}"`` if none).
        converter: the tool that converts published weights (named for a pickled file).
        writer: the function that writes such heads (named for a safetensors file of another kind).
    Raises:
        OvdenseError: missing, not safetensors, another format or backbone, keys or shapes that
            do not fit.
    """
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise OvdenseError(f"{title} head checkpoint not found: {file}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - anything unreadable is the user's wrong file
        raise OvdenseError(
            f"{file} is not a safetensors {title} head (a pickled .pth or another file?); ovdense never "
            f"unpickles head checkpoints: convert published {title} weights with {converter}"
        ) from e
    if metadata.get("format") != format:
        raise OvdenseError(f"{file} is a safetensors file but not a {title} head (format "
                           f"{metadata.get('format')!r}); write heads with {writer}")
    identity = backbone.identity
    if metadata.get("backbone") != backbone.name or metadata.get("fingerprint") != identity:
        raise OvdenseError(
            f"{file} was trained on backbone {metadata.get('backbone')!r} ({metadata.get('fingerprint')}), "
            f"not on this one, {backbone.name!r} ({identity}); create that backbone or use a head "
            "trained on this one"
        )
    head = build(metadata.get("config", "{}"))
    kind = type(head).__name__
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OvdenseError(f"{file} does not fit {kind}: missing keys {missing[:5]}, unexpected keys "
                           f"{unexpected[:5]}; was it written by another ovdense version?")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise OvdenseError(f"{file} does not fit {kind}: {key} has shape {tuple(tensor.shape)}, the "
                               f"head expects {tuple(expected[key].shape)}")
    head.load_state_dict(state, strict=True)
    return head.to(backbone.device)
