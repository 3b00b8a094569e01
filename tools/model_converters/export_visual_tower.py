"""Write a CLIP's image tower alone (``visual.*``) from a whole open_clip weights file.

    python tools/model_converters/export_visual_tower.py \\
        work_dirs/clipself_toy_proposals/clipself_backbone.safetensors \\
        ovdense/assets/toy-clipself-visual.safetensors --dtype float16

A refinement that trains only the image tower (CLIPSelf: ``clipself_backbone.safetensors``, the whole
open_clip state with the α-merged tower) leaves the text tower as it was; shipping that tower alone
is what ``create_backbone("toy-clipself")`` puts on the embedded toy CLIP. The input is read as
tensors only (safetensors, or ``torch.load(weights_only=True)``); the output is written atomically
and records the input file's SHA-256 in its metadata. ``--reference FILE`` (default: the embedded toy's
weights) checks that the input's text tower is that file's, so a tower never lands on a text tower it
was not trained beside.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def read_state(path: Path) -> dict:
    """A whole weights file's tensors (``module.`` prefixes dropped), refusing anything else."""
    import torch

    from ovdense.errors import OvdenseError, checkpoint_error_text
    from ovdense.io import read_weights

    try:
        state = read_weights(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's wrong input
        raise OvdenseError(f"{path} is not a readable weights file ({checkpoint_error_text(e)})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OvdenseError(f"{path} holds no state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def export(source: Path, out: Path, dtype: str = "float16", reference: Path | None = None) -> Path:
    """Write ``source``'s ``visual.*`` tensors to ``out`` as ``dtype`` safetensors; with
    ``reference``, first check that every other tensor of ``source`` equals that file's."""
    import torch
    from safetensors.torch import save

    from ovdense.errors import OvdenseError
    from ovdense.io import sha256_file, write_bytes

    if Path(out).resolve() == Path(source).resolve():
        raise OvdenseError(f"{out} is the input; write the tower to another file")
    state = read_state(source)
    visual = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in state.items()
              if k.startswith("visual.")}
    if not visual:
        raise OvdenseError(f"{source} has no visual.* tensors: not an open_clip CLIP's weights")
    if reference is not None:
        other = read_state(reference)
        rest = sorted(k for k in state if not k.startswith("visual."))
        expected = sorted(k for k in other if not k.startswith("visual."))
        if rest != expected:
            raise OvdenseError(f"{source} and {reference} hold different text towers (keys differ)")
        changed = [k for k in rest if not torch.equal(state[k], other[k])]
        if changed:
            raise OvdenseError(f"{source}'s text tower is not {reference}'s ({changed[0]} and "
                               f"{len(changed) - 1} more differ): the tower belongs with another text tower")
    metadata = {"format": "ovdense-visual-tower", "source_sha256": sha256_file(source), "dtype": dtype}
    return write_bytes(out, save(visual, metadata=metadata))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a whole open_clip weights file (.safetensors, or a torch state dict)")
    parser.add_argument("out", help="the tower file to write (.safetensors)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    parser.add_argument("--reference", default="toy",
                        help="a weights file whose text tower the source must share ('toy': the embedded "
                             "toy CLIP's; 'none': no check)")
    args = parser.parse_args(argv)

    from ovdense.backbone.model_config import toy_files
    from ovdense.errors import OvdenseError

    try:
        source = Path(args.source)
        if not source.is_file():
            raise OvdenseError(f"not found: {source}")
        reference = {"toy": lambda: toy_files()[1], "none": lambda: None}.get(
            args.reference.lower(), lambda: Path(args.reference))()
        path = export(source, Path(args.out), args.dtype, reference)
    except OvdenseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
