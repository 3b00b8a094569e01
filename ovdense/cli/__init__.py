"""The ``ovdense`` command line: argument parsing and printing only; the work is the API's.

    ovdense segment IMAGE... | DIR --classes "cat,dog,grass" [--method clearclip] ...
    ovdense segment IMAGE... | DIR --classes ... --method sam-clip --sam-checkpoint sam_vit_b_01ec64.pth
    ovdense segment IMAGE... | DIR --classes ... --method san [--head-checkpoint san_head.safetensors]
    ovdense detect IMAGE... | DIR --classes "cat,dog" [--model toy] [--head-checkpoint fvit_head.safetensors]
    ovdense methods
    ovdense anomaly IMAGE... | DIR --object bottle [--reference DIR --shots K]
    ovdense anomaly-eval --dataset mvtec|visa --root DIR [--shots K]

Every argument is checked before any model is built; a bad one is one ``ovdense: error:`` line
and exit code 2. Over a folder, an image that cannot be read (missing, corrupt, over
``--max-pixels``) costs one ``ovdense: skipped:`` line and the rest run (exit code 1).
``--skip-existing`` resumes an interrupted run: an image whose outputs are all there is not
computed again (its JSON, written last and atomically, marks it complete).

The heads come from ``ovdense.registry``: ``--method``'s choices, ``ovdense methods`` and the
head each command builds (``create_head``). The package: ``parser.py`` (every flag),
``common.py`` (checks, inputs, resuming, reporting), one module per command family
(``segment.py`` with ``methods``, ``detect.py``, ``anomaly.py`` with ``anomaly-eval``).

No module here imports torch, numpy or open_clip at module level (``ovdense --help`` and
``ovdense methods`` stay fast): each command imports what it uses.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ovdense.cli.anomaly import ANOMALY_OUTPUTS, _command_anomaly, _command_anomaly_eval
from ovdense.cli.common import _pending, _pretrained  # noqa: F401 - the tests' and the demo's
from ovdense.cli.detect import DETECT_OUTPUTS, _command_detect
from ovdense.cli.parser import MAX_PIXELS, _build_parser
from ovdense.cli.segment import _command_methods, _command_segment
from ovdense.errors import OvdenseError, strip_unpickling_advice

__all__ = ["ANOMALY_OUTPUTS", "DETECT_OUTPUTS", "MAX_PIXELS", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = _build_parser().parse_args(argv)
    # torch's note on pickle protocols (met when a non-checkpoint is read as one) advises filing an
    # issue; the file is refused with one line below instead
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    try:
        if args.command == "methods":
            return _command_methods()
        if args.command == "anomaly":
            return _command_anomaly(args)
        if args.command == "anomaly-eval":
            return _command_anomaly_eval(args)
        if args.command == "detect":
            return _command_detect(args)
        return _command_segment(args)
    except OvdenseError as e:
        message = " ".join(strip_unpickling_advice(str(e)).split())
        print(f"ovdense: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ovdense: interrupted", file=sys.stderr)
        return 130
