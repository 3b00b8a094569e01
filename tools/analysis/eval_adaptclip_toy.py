"""AdaptCLIP in the toy world beside WinCLIP / WinCLIP+ (issue 30): adapters trained on one domain of
(shape, texture) categories, scored on the other domain's categories, which they never saw, and on a
defect kind left out of training.

    python tools/analysis/eval_adaptclip_toy.py --out toy_anomaly            # data, 9 trainings, the tables
    python tools/analysis/eval_adaptclip_toy.py --out toy_anomaly --data-only

Data (``ovdense.data.layouts.write_toy_anomaly``, MVTec AD layout): the 25 categories ``<shape>_<texture>``
split into domain A (13) and B (12) (``toy_anomaly_categories``); per domain a training set
(``train-A``/``train-B``: ``--num-train`` normal training images, ``--num-test`` normal and ``--num-test``
of each defect kind — scratched, holed, stained — in its test split, which AdaptCLIP trains on, as the
published protocol trains on a dataset's test split) and a held-out evaluation set of new scenes
(``eval-A``/``eval-B``, another seed).

Trainings (``tools/train.py configs/adaptclip/adaptclip_toy_domain-a.py``, 15 epochs at batch 8, per seed):
``A`` (train-A), ``B`` (train-B) and ``A-stained`` (train-A without the stained images). A run already
finished (its head file exists) is not repeated; an interrupted one resumes.

Scores (``ovdense.eval.anomaly``, per category then averaged over categories, as the papers): image AUROC /
AP, pixel AUROC / AP, AUPRO (exact, to FPR 0.3), at 0, 1, 2, 4 shots (the references: a seeded draw of the
category's normal training images, the same for every method at a seed), mean ± std over the seeds:

* unseen categories: head A on eval-B and head B on eval-A (both directions pooled per seed: the mean of
  the two), WinCLIP / WinCLIP+ on the same images;
* seen vs unseen category × seen vs unseen defect: head ``A-stained`` on eval-A and eval-B, the anomalous
  images restricted to the seen defects (scratched, holed) or to the unseen one (stained).

Writes ``OUT/results.json``, ``OUT/table.md``, ``OUT/table.png`` and ``OUT/overlays.png`` (unseen
categories: image, mask, AdaptCLIP's zero-shot map, WinCLIP's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "adaptclip" / "adaptclip_toy_domain-a.py"
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")
SHOTS = (0, 1, 2, 4)
HELD_OUT = "stained"
EPOCHS = 15
BATCH = 8


def write_data(out: Path, num_train: int, num_test: int, seed: int) -> None:
    from ovdense.data.layouts import toy_anomaly_categories, write_toy_anomaly

    for domain in ("A", "B"):
        for name, data_seed in ((f"train-{domain}", seed), (f"eval-{domain}", seed + 1000)):
            if not (out / name).is_dir():
                write_toy_anomaly(out / name, toy_anomaly_categories(domain), num_train, num_test, data_seed)


def train(out: Path, setup: str, seed: int) -> Path:
    """Train (or finish training) one head; its file."""
    from ovdense.data.anomaly_datasets import iter_mvtec, mvtec_categories

    domain = setup[0]
    root = out / f"train-{domain}"
    exclude = [HELD_OUT] if setup.endswith(HELD_OUT) else []
    images = sum(1 for c in mvtec_categories(root) for s in iter_mvtec(root, c, "test")
                 if s.defect not in exclude)
    iterations = EPOCHS * -(-images // BATCH)
    work = out / "runs" / f"{setup}_seed{seed}"
    head = work / "adaptclip_head.safetensors"
    if head.is_file():
        return head
    command = [sys.executable, str(ROOT / "tools" / "train.py"), str(CONFIG), "--work-dir", str(work),
               "--cfg-options", f"randomness.seed={seed}", f"train_dataloader.dataset.root={root}",
               f"train_dataloader.dataset.exclude_defects=[{','.join(exclude)}]",
               f"train_cfg.max_iters={iterations}"]
    if (work / "last_checkpoint").is_file():
        command.append("--resume")
    print(f"training {setup} seed {seed}: {iterations} iterations on {images} images", file=sys.stderr)
    subprocess.run(command, check=True, cwd=ROOT)
    return head


_CACHE: dict = {}


def predictions(backbone, method: str, root: Path, shots: int, seed: int,
                head_file: Path | None) -> list[dict]:
    """Per test image: category, defect, label, score, map, mask (remembered: WinCLIP's do not depend on
    the head file)."""
    key = (method, str(root), shots, seed, str(head_file) if method == "adaptclip" else None)
    if key not in _CACHE:
        _CACHE[key] = _predictions(backbone, method, root, shots, seed, head_file)
    return _CACHE[key]


def _predictions(backbone, method: str, root: Path, shots: int, seed: int,
                 head_file: Path | None) -> list[dict]:
    from ovdense.anomaly.evaluate import object_name, reference_images
    from ovdense.data.anomaly_datasets import iter_mvtec, load_mask, mvtec_categories
    from ovdense.io import load_image

    rows = []
    adaptclip = None
    if method == "adaptclip":  # one head for every category: its prompts do not name the object
        from ovdense.anomaly.adaptclip import AdaptClip

        adaptclip = AdaptClip(backbone, head_checkpoint=head_file)
    for category in mvtec_categories(root):
        if adaptclip is not None:
            head = adaptclip
            head.object_name, head.memory, head.reference_size = object_name(category), None, None
        else:
            from ovdense.anomaly.winclip import WinClip

            head = WinClip(backbone, object_name(category))
        if shots:
            references = reference_images("mvtec", root, category, shots, seed)
            head.set_references([load_image(p) for p in references])
        samples = list(iter_mvtec(root, category, "test"))
        for start in range(0, len(samples), 16):
            chunk = samples[start:start + 16]
            for sample, result in zip(chunk, head.predict([load_image(s.image) for s in chunk])):
                rows.append(dict(category=category, defect=sample.defect, label=sample.label,
                                 score=result.score, map=result.map,
                                 mask=load_mask(sample, result.map.shape)))
    return rows


def scores(rows: list[dict], defects: set[str] | None = None) -> dict[str, float]:
    """The metrics per category (normal images and the anomalous ones of ``defects``), averaged."""
    from ovdense.eval.anomaly import AnomalyMetrics

    per_category = []
    for category in sorted({r["category"] for r in rows}):
        metrics = AnomalyMetrics()
        for r in rows:
            if r["category"] == category and (r["label"] == 0 or defects is None or r["defect"] in defects):
                metrics.update(r["score"], r["label"], r["map"], r["mask"])
        result = metrics.scores()
        per_category.append({m: 100 * getattr(result, m) for m in METRICS})
    return {m: float(np.mean([c[m] for c in per_category])) for m in METRICS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("toy_anomaly"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-train", type=int, default=8, help="normal training images per category")
    parser.add_argument("--num-test", type=int, default=6, help="test images per category and state")
    parser.add_argument("--data-only", action="store_true", help="write the data and stop")
    parser.add_argument("--tables-only", action="store_true",
                        help="rewrite the tables from OUT/results.json (no training, no scoring)")
    args = parser.parse_args(argv)
    if args.tables_only:
        results = json.loads((args.out / "results.json").read_text())
        lines = table(results, args.seeds)
        (args.out / "table.md").write_text("\n".join(lines) + "\n")
        picture(lines, args.out / "table.png")
        print("\n".join(lines))
        return 0
    write_data(args.out, args.num_train, args.num_test, seed=0)
    if args.data_only:
        print(f"wrote {args.out}/train-A, train-B, eval-A, eval-B")
        return 0
    heads = {(setup, seed): train(args.out, setup, seed) for seed in args.seeds
             for setup in ("A", "B", f"A-{HELD_OUT}")}

    from ovdense import create_backbone

    backbone = create_backbone("toy")
    seen = {"scratched", "holed"}
    results: dict = {"unseen_categories": {}, "defects": {}}
    for seed in args.seeds:
        for shots in SHOTS:
            for method in ("winclip", "adaptclip"):
                # unseen categories: A's head on eval-B, B's head on eval-A (WinCLIP: the same images)
                pooled = []
                for head_domain, target in (("A", "eval-B"), ("B", "eval-A")):
                    head_file = heads[(head_domain, seed)]
                    rows = predictions(backbone, method, args.out / target, shots, seed, head_file)
                    pooled.append(scores(rows))
                cell = {m: float(np.mean([p[m] for p in pooled])) for m in METRICS}
                results["unseen_categories"].setdefault(f"{method}/{shots}", []).append(cell)
                # seen / unseen category x seen / unseen defect: the head trained on A without stained
                for target, category_kind in (("eval-A", "seen"), ("eval-B", "unseen")):
                    rows = predictions(backbone, method, args.out / target, shots, seed,
                                       heads[(f"A-{HELD_OUT}", seed)])
                    for defect_kind, defects in (("seen", seen), ("unseen", {HELD_OUT})):
                        key = f"{method}/{shots}/{category_kind}-category/{defect_kind}-defect"
                        results["defects"].setdefault(key, []).append(scores(rows, defects))
            print(f"seed {seed}, {shots} shots done", file=sys.stderr)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = table(results, args.seeds)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    picture(lines, args.out / "table.png")
    overlays(backbone, heads[("A", args.seeds[0])], args.out / "eval-B", args.out / "overlays.png")
    return 0


def _cell(values: list[dict], metric: str) -> str:
    column = [v[metric] for v in values]
    return f"{np.mean(column):.1f} ± {np.std(column):.1f}"


def table(results: dict, seeds: list[int]) -> list[str]:
    names = {"winclip": "WinCLIP", "adaptclip": "AdaptCLIP"}
    lines = [f"Unseen categories (A→B and B→A averaged), mean ± std over seeds {seeds}:", "",
             "| method | shots | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for shots in SHOTS:
        for method in ("winclip", "adaptclip"):
            label = names[method] + ("+" if method == "winclip" and shots else "")
            values = results["unseen_categories"][f"{method}/{shots}"]
            lines.append(f"| {label} | {shots} | " + " | ".join(_cell(values, m) for m in METRICS) + " |")
    lines += ["", f"Trained on domain A without '{HELD_OUT}' (image AUROC / pixel AP):", "",
              "| method | shots | seen cat., seen defect | seen cat., unseen defect "
              "| unseen cat., seen defect | unseen cat., unseen defect |", "|---|---|---|---|---|---|"]
    for shots in SHOTS:
        for method in ("winclip", "adaptclip"):
            label = names[method] + ("+" if method == "winclip" and shots else "")
            cells = []
            for category_kind in ("seen", "unseen"):
                for defect_kind in ("seen", "unseen"):
                    key = f"{method}/{shots}/{category_kind}-category/{defect_kind}-defect"
                    values = results["defects"][key]
                    cells.append(f"{_cell(values, 'image_auroc')} / {_cell(values, 'pixel_ap')}")
            lines.append(f"| {label} | {shots} | " + " | ".join(cells) + " |")
    lines += ["", f"Trained on domain A without '{HELD_OUT}', every metric:", "",
              "| method | shots | category | defect | " + " | ".join(METRICS) + " |",
              "|---|---|---|---|" + "---|" * len(METRICS)]
    for category_kind in ("seen", "unseen"):
        for defect_kind in ("seen", "unseen"):
            for shots in SHOTS:
                for method in ("winclip", "adaptclip"):
                    label = names[method] + ("+" if method == "winclip" and shots else "")
                    key = f"{method}/{shots}/{category_kind}-category/{defect_kind}-defect"
                    values = results["defects"][key]
                    lines.append(f"| {label} | {shots} | {category_kind} | {defect_kind} | "
                                 + " | ".join(_cell(values, m) for m in METRICS) + " |")
    return lines


def overlays(backbone, head_file: Path, root: Path, path: Path, categories: int = 4) -> Path:
    """A picture: for the first holed image of ``categories`` categories of ``root``, the image, its defect
    mask, AdaptCLIP's zero-shot map and WinCLIP's (JET, fixed scale 0–1), one row each."""
    from ovdense.anomaly.adaptclip import AdaptClip
    from ovdense.anomaly.winclip import WinClip
    from ovdense.data.anomaly_datasets import iter_mvtec, load_mask, mvtec_categories
    from ovdense.io import heatmap_overlay, load_image, write_image

    adaptclip = AdaptClip(backbone, head_checkpoint=head_file)
    rows = []
    for category in mvtec_categories(root)[:categories]:
        sample = next(s for s in iter_mvtec(root, category, "test") if s.defect == "holed")
        rgb = load_image(sample.image)
        mask = np.repeat(load_mask(sample, rgb.shape[:2])[..., None], 3, axis=2).astype(np.uint8) * 255
        (ours,) = adaptclip.predict([rgb])
        (theirs,) = WinClip(backbone, category.split("_")[0]).predict([rgb])
        maps = [heatmap_overlay(rgb, ours.map), heatmap_overlay(rgb, theirs.map)]
        rows.append(np.concatenate([rgb, mask, *maps], 1))
    return write_image(path, np.concatenate(rows, 0))


def picture(lines: list[str], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    from ovdense.io import write_image

    font = ImageFont.load_default()
    canvas = Image.new("RGB", (8 + 6 * max(len(line) for line in lines), 8 + 14 * len(lines)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 14 * i), line, fill="black", font=font)
    write_image(path, np.asarray(canvas))


if __name__ == "__main__":
    sys.exit(main())
