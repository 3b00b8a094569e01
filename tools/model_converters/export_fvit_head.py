"""Write an F-ViT head file (what ``Detector`` and ``ovdense detect`` load) from a training checkpoint.

    python tools/model_converters/export_fvit_head.py configs/ovdet/fvlm_toy_synthetic.py \\
        work_dirs/fvlm_toy_synthetic/iter_900.pth ovdense/assets/fvit-toy-head.safetensors --dtype float16

Training writes ``WORK_DIR/fvit_head.safetensors`` itself at its end (``ExportFViTHeadHook``); this
tool makes one from any intermediate checkpoint, or from a run whose end did not come. The model is
built from the config (the backbone as the config names it, ``--cfg-options`` to point it at local
weights), the checkpoint read with ``torch.load(weights_only=True)`` (``AtomicCheckpointHook`` writes
checkpoints that load so; nothing is unpickled), and only the head's tensors — no backbone — are
written as safetensors, tied to the backbone (``ovdense.mm.detection.export_head``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint", help="an mmengine checkpoint of the whole detector (iter_N.pth)")
    parser.add_argument("out", help="the head file to write (.safetensors)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries")
    args = parser.parse_args(argv)

    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from ovdense.errors import OvdenseError

    try:
        for path in (args.config, args.checkpoint):
            if not Path(path).is_file():
                raise OvdenseError(f"not found: {path}")
        try:
            checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a pickle with code, or not a checkpoint at all
            raise OvdenseError(f"{args.checkpoint} does not load with weights_only=True "
                               f"({type(e).__name__}); give a checkpoint written by tools/train.py") from e
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise OvdenseError(f"{args.checkpoint} holds no state_dict")
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        from mmdet.registry import MODELS

        import ovdense.mm.detection as fvit_mm

        init_default_scope("mmdet")
        model = MODELS.build(cfg.model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise OvdenseError(f"{args.checkpoint} does not fit {args.config}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        path = fvit_mm.export_head(model, args.out, dtype=getattr(torch, args.dtype))
    except OvdenseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
