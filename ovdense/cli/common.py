"""What every ``ovdense`` command shares: reading classes and templates, checking numbers,
folders and devices before any model is built, listing inputs, resuming (``--skip-existing``),
reading images one by one and reporting."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ovdense.backbone.model_config import TOY_NAMES
from ovdense.errors import OvdenseError


def _parse_cli_classes(text: str) -> list[list[str]]:
    classes = [[w.strip() for w in item.split("|") if w.strip()] for item in text.split(",")]
    classes = [c for c in classes if c]
    if not classes:
        raise OvdenseError("the class list is empty: give at least one class, e.g. --classes cat,dog")
    return classes


TEMPLATE_SETS = ("imagenet80", "single", "vild", "car")


def _read_text_file(path: Path, what: str, option: str) -> str:
    """The UTF-8 text of a file the user named, or one ``OvdenseError`` line that says why not."""
    if path.is_dir():
        raise OvdenseError(f"{option} {path} is a folder; give a text file")
    if not path.is_file():
        raise OvdenseError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OvdenseError(f"{option} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    except OSError as e:
        raise OvdenseError(f"cannot read {option} {path}: {e.strerror or e}") from e


def _read_templates(value: str | None):
    """``--templates``: a set's name, one template with ``{}``, or a file of them (one a line),
    each checked here (exactly one ``{}``), before any model is built."""
    if value is None:
        return None
    path = Path(value)
    if value in TEMPLATE_SETS:
        return value
    if not path.suffix and not path.exists():
        if value.count("{}") != 1:
            raise OvdenseError(f"--templates {value!r}: use {' or '.join(TEMPLATE_SETS)}, a file of "
                               "templates, or one template with exactly one '{}' for the class name")
        return value
    lines = [line.strip() for line in _read_text_file(path, "template file", "--templates").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise OvdenseError(f"template file {path} has no templates")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1:
            raise OvdenseError(f"template file {path}: template {number} {template[:60]!r} has "
                               f"{template.count('{}')} '{{}}'; each needs exactly one, where the class goes")
    return templates


def _read_classes(args: argparse.Namespace):
    from ovdense.backbone.prompts import Vocabulary

    if args.classes is not None:
        return Vocabulary.parse(_parse_cli_classes(args.classes))
    _read_text_file(args.classes_file, "class file", "--classes-file")  # one message for every failure
    return Vocabulary.from_file(args.classes_file)


def _check_out(out: Path) -> None:
    """``--out`` must be (or become) a writable folder: created here, before any model is built."""
    if out.exists() and not out.is_dir():
        raise OvdenseError(f"--out {out} is a file; give a folder for the outputs")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OvdenseError(f"--out {out}: {parent} is a file, so the folder cannot be made there")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OvdenseError(f"cannot create the output folder {out}: {e.strerror or e}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise OvdenseError(f"the output folder {out} is not writable")


def _check_range(args: argparse.Namespace, name: str, low: float, high: float = math.inf,
                 low_open: bool = False) -> None:
    value = getattr(args, name, None)
    if value is None:
        return
    flag = "--" + name.replace("_", "-")
    if isinstance(value, float) and not math.isfinite(value):
        raise OvdenseError(f"{flag} must be a finite number, got {value}")
    below = value <= low if low_open else value < low
    if below or value > high:
        left = "(" if low_open else "["
        right = "]" if high != math.inf else ")"
        raise OvdenseError(f"{flag} must lie in {left}{low:g}, {high:g}{right}, got {value:g}")


def _check_device(device: str) -> None:
    """A device that exists here (imports torch: called after the cheap checks)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise OvdenseError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from e
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise OvdenseError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise OvdenseError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise OvdenseError(f"--device {device!r}: ovdense runs on cpu or cuda")


def _list_inputs(inputs: Sequence[str]) -> list[Path]:
    from ovdense.io import list_images

    images = list_images(inputs)
    if not images:
        raise OvdenseError(f"no images found in {' '.join(map(str, inputs))}")
    stems = [p.stem for p in images]
    seen: set[str] = set()
    for stem in stems:
        if stem in seen:
            raise OvdenseError(f"several inputs share the name {stem!r}; their outputs would clash")
        seen.add(stem)
    return images


def _complete(out: Path, stem: str, suffixes: Sequence[str], key: str | None = None) -> bool:
    """Whether an image's outputs are all in ``out``: the last suffix names its JSON, written
    last (atomically), which must parse (and hold ``key`` at its top, where given: ``segment``
    and ``detect`` both write ``<stem>.json``); the others must exist and be non-empty."""
    *others, marker = suffixes
    try:
        report = json.loads((out / f"{stem}{marker}").read_text(encoding="utf-8"))
        if key is not None and not (isinstance(report, dict) and key in report):
            return False
        return all((out / f"{stem}{s}").stat().st_size > 0 for s in others)
    except (OSError, ValueError):
        return False


def _check_no_overwrite(out: Path, images: list[Path], suffixes: Sequence[str]) -> None:
    """Refuse a run whose outputs (``<stem><suffix>`` in ``out``) would replace one of its inputs."""
    inputs = {p.resolve() for p in images}
    for path in images:
        for suffix in suffixes:
            if (out / f"{path.stem}{suffix}").resolve() in inputs:
                raise OvdenseError(f"output {out / (path.stem + suffix)} would overwrite an input")


def _pending(args: argparse.Namespace, images: list[Path], suffixes: Sequence[str],
             key: str | None = None) -> tuple[list[Path], int]:
    """The images still to compute and how many ``--skip-existing`` skips (no image is read)."""
    if not args.skip_existing:
        return images, 0
    todo = [p for p in images if not _complete(args.out, p.stem, suffixes, key)]
    for path in todo:  # temporary files an interrupted run left (ovdense.io.write_bytes names them so)
        for suffix in suffixes:
            for stale in args.out.glob(glob.escape(f".{path.stem}{suffix}.") + "*.tmp"):
                stale.unlink(missing_ok=True)
    return todo, len(images) - len(todo)


def _readable_images(images: Sequence[Path], desc: str, failed: list[Path], max_pixels: int | None):
    """Yield ``(path, rgb)`` for each image that loads, with a progress bar; an unreadable one
    (missing, corrupt, over ``max_pixels``) is reported by name, appended to ``failed`` and
    skipped, so the others still run."""
    from tqdm import tqdm

    from ovdense.io import load_image

    for path in tqdm(images, desc=desc, unit="image", file=sys.stderr):
        try:
            rgb = load_image(path, max_pixels=max_pixels)
        except OvdenseError as e:
            tqdm.write(f"ovdense: skipped: {e}", file=sys.stderr)
            failed.append(path)
            continue
        yield path, rgb


def _report(out: Path, total: int, failed: list[Path], what: str, files: str, skipped: int = 0) -> int:
    """Print where results went, how many were already there and how many images failed; the
    exit code (1 if any failed)."""
    done = total - len(failed) - skipped
    print(f"ovdense: wrote {done} {what}{'s' if done != 1 else ''} to {out}/{files}")
    if skipped:
        print(f"ovdense: skipped {skipped} of {total} images whose outputs exist (--skip-existing)")
    if failed:
        print(f"ovdense: {len(failed)} of {total} images failed", file=sys.stderr)
    return 1 if failed else 0


def _pretrained(model: str, value: str | None) -> str | None:
    """The CLI's weights rule: 'none' is random; no value means the model's usual weights."""
    if value is not None:
        return None if value.lower() == "none" else value
    if model in TOY_NAMES or model.endswith(".json"):
        return None
    return "laion400m_e31" if model == "ViT-B-16-plus-240" else "openai"


