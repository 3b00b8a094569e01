"""Run the training-free configs and write the README's benchmark table (ViT-B/16, mIoU %).

    python tools/benchmarks/table.py --out benchmark.md
    python tools/benchmarks/table.py --methods sclip naclip --datasets voc21 ade150 \\
        --cfg-options model.backbone.pretrained=/path/to/ViT-B-16.bin --data-root-prefix /data

Each cell is ``this implementation / published``. A config runs only when its dataset folder
exists and its weights load; otherwise the cell says ``needs weights/data`` and the exact
command to measure it is listed under the table — nothing is estimated. Published numbers are
those of the official repositories' result tables, each with its source; a method without a
published number for a dataset shows ``—``. Measured results are kept in ``--results`` (JSON)
so the table can be rewritten without running again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "training_free"

METHODS = ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "cliptrase", "itaclip")
DATASETS = {  # config name → column title, in the papers' order
    "voc21": "VOC21",
    "context60": "PC60",
    "coco_object": "Object",
    "voc20": "VOC20",
    "context59": "PC59",
    "coco_stuff": "Stuff",
    "cityscapes": "City",
    "ade150": "ADE",
}

# The official repositories' result tables, with the commit they were read at. Each repository
# states that these are what its default setup (the configs ovdense's follow) gives.
SOURCES = {
    "sclip": "wangf3014/SCLIP README.md, 'Results' table (commit b56bd30)",
    "naclip": "sinahmr/NACLIP README.md, 'Results' table, PAMR on (commit 0cac3a6)",
    "itaclip": "m-arda-aydn/ITACLIP README.md, results table (commit 521a33c)",
    "cliptrase": "leaves162/CLIPtrase README.md, results table, resolution 224, mIoU row (commit 2b7de61)",
}
PUBLISHED = {
    "sclip": {"voc21": 59.63, "context60": 31.74, "coco_object": 33.52, "voc20": 81.54,
              "context59": 34.46, "coco_stuff": 22.77, "cityscapes": 32.34, "ade150": 16.45},
    "naclip": {"voc21": 64.07, "context60": 34.99, "coco_object": 36.19, "voc20": 83.03,
               "context59": 38.35, "coco_stuff": 25.69, "cityscapes": 38.27, "ade150": 19.05},
    "itaclip": {"voc21": 67.9, "context60": 37.5, "coco_object": 37.7, "coco_stuff": 27.0,
                "cityscapes": 40.2},
    "cliptrase": {"voc21": 50.88, "context60": 29.87, "coco_object": 43.56, "voc20": 80.95,
                  "context59": 33.83, "coco_stuff": 22.84, "ade150": 16.35},
}
NEEDS = "needs weights/data"


def config_path(method: str, dataset: str) -> Path:
    return CONFIGS / f"{method}_vit-b16_{dataset}.py"


def command(method: str, dataset: str, cfg_options: list[str]) -> str:
    options = f" --cfg-options {' '.join(cfg_options)}" if cfg_options else ""
    return f"python tools/test.py {config_path(method, dataset).relative_to(ROOT)}{options}"


def data_root(config: Path, cfg_options: list[str], prefix: str | None) -> Path:
    from mmengine.config import Config, DictAction

    cfg = Config.fromfile(str(config))
    if cfg_options:
        parser = argparse.ArgumentParser()
        parser.add_argument("--o", nargs="+", action=DictAction)
        cfg.merge_from_dict(parser.parse_args(["--o", *cfg_options]).o)
    root = Path(cfg.test_dataloader.dataset.data_root)
    return Path(prefix) / root if prefix and not root.is_absolute() else root


def test_tool():
    """``tools/test.py`` as a module (its ``evaluate(argv)`` runs one config)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ovdense_tools_test", ROOT / "tools" / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(method: str, dataset: str, cfg_options: list[str], prefix: str | None,
            work_dir: Path, classnames_dir: Path | None = None) -> tuple[float | None, str]:
    """``(mIoU, "")`` if the config ran, else ``(None, why not)``."""
    from ovdense.errors import OvdenseError

    config = config_path(method, dataset)
    options = list(cfg_options)
    if classnames_dir is not None:
        names = classnames_dir / f"{dataset}.txt"
        options.append(f"model.classnames={names.resolve()}")
    root = data_root(config, options, prefix)
    if not root.is_dir():
        return None, f"no dataset at {root}"
    if prefix:
        options.append(f"test_dataloader.dataset.data_root={root}")
    argv = [str(config), "--work-dir", str(work_dir / config.stem)]
    if options:
        argv += ["--cfg-options", *options]
    try:
        metrics = test_tool().evaluate(argv)
    except (OvdenseError, FileNotFoundError) as e:
        return None, str(e).splitlines()[0]
    return round(float(metrics["mIoU"]), 2), ""


def is_missing_input(why: str) -> bool:
    """Whether a run failed for want of a dataset or weights (rather than a real error)."""
    return why.startswith("no dataset at") or any(
        word in why.lower() for word in ("pretrained", "weights", "checkpoint", "download", "offline"))


CAPTION = "Cells: this implementation / published (mIoU %, ViT-B/16, OpenAI weights). Sources:"


def table(results: dict, commands: dict, failures: dict | None = None, caption: str = CAPTION,
          published: bool = True) -> str:
    header = "| method | " + " | ".join(DATASETS.values()) + " |"
    lines = [header, "|---" * (len(DATASETS) + 1) + "|"]
    marks = {name: f"[{i}]" for i, name in enumerate(SOURCES, start=1)}
    for method in METHODS:
        cells = []
        for dataset in DATASETS:
            ours = results.get(method, {}).get(dataset)
            failed = (failures or {}).get((method, dataset))
            left = f"{ours:.2f}" if ours is not None else ("failed" if failed else NEEDS)
            theirs = PUBLISHED.get(method, {}).get(dataset)
            right = f"{theirs:.2f} {marks[method]}" if theirs is not None else "—"
            cells.append(f"{left} / {right}" if published else left)
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(caption)
    if published:
        lines.extend(f"{mark} {SOURCES[name]}" for name, mark in marks.items())
    if failures:
        lines.append("")
        lines.append("Cells marked 'failed' (the error each run gave):")
        lines.append("")
        grouped: dict[tuple[str, str], list[str]] = {}
        for (method, dataset), why in failures.items():
            grouped.setdefault((method, why), []).append(DATASETS[dataset])
        lines.extend(f"- `{method}` × {', '.join(names)}: {why}" for (method, why), names in grouped.items())
    commands = {key: value for key, value in commands.items() if key not in (failures or {})}
    if commands:
        lines.append("")
        lines.append(f"Commands for the cells marked '{NEEDS}' (with the weights and the dataset in place):")
        lines.append("")
        lines.append("```bash")
        lines.extend(commands[key] for key in sorted(commands))
        lines.append("```")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--cfg-options", nargs="+", default=[], help="passed to every tools/test.py run")
    parser.add_argument("--data-root-prefix", help="folder the configs' data/... roots are under")
    parser.add_argument("--classnames-dir", type=Path,
                        help="class files <dataset>.txt that replace the configs' (synthetic data)")
    parser.add_argument("--results", type=Path, default=Path("work_dirs/benchmark/results.json"))
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/benchmark"))
    parser.add_argument("--no-run", action="store_true", help="only rewrite the table from --results")
    parser.add_argument("--out", type=Path, help="write the table here (default: print it)")
    args = parser.parse_args(argv)

    from ovdense.io import write_bytes

    # {method: {dataset: mIoU}}, and under "failed" {"method/dataset": the error of its last run}
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    failed = results.setdefault("failed", {})
    commands = {}
    for method in METHODS:
        for dataset in DATASETS:
            wanted = method in args.methods and dataset in args.datasets
            if wanted and not args.no_run:
                miou, why = measure(method, dataset, args.cfg_options, args.data_root_prefix,
                                    args.work_dir, args.classnames_dir)
                failed.pop(f"{method}/{dataset}", None)
                if miou is not None:
                    results.setdefault(method, {})[dataset] = miou
                elif is_missing_input(why):
                    print(f"{method} × {dataset}: {NEEDS} ({why})", file=sys.stderr)
                else:
                    failed[f"{method}/{dataset}"] = why
                    print(f"{method} × {dataset}: failed ({why})", file=sys.stderr)
                write_bytes(args.results, json.dumps(results, indent=1).encode())
            if results.get(method, {}).get(dataset) is None:
                commands[(method, dataset)] = command(method, dataset, args.cfg_options)
    failures = {tuple(key.split("/")): why for key, why in failed.items()}
    caption, published = CAPTION, args.classnames_dir is None
    if not published:  # other data and vocabularies: the published numbers do not apply
        caption = (f"mIoU % on the data under {args.data_root_prefix} with the class files of "
                   f"{args.classnames_dir}, --cfg-options {' '.join(args.cfg_options) or '(none)'}.")
    text = table(results, commands, failures, caption, published)
    if args.out:
        write_bytes(args.out, text.encode())
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
