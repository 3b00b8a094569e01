"""The OV-COCO evaluation of ``configs/ovdet/fvit_vitb16_ovcoco_clim.py`` (what tools/test.py runs with
it: mmdet's ``OVCocoMetric`` on the whole ``instances_val2017.json``, the dataset's base/novel metainfo)
against wusize/CLIM's own (its config's two stock ``CocoMetric``s, prefixes ``Base`` and ``Novel``, on
the ``wusize/instances_val2017_{base,novel}.json`` files that CLIM's ``ovdet/tools/pre_processors/
keep_coco_{base,novel}.py`` write, run as they are from the mirror, tests/official_clim.py), on a small
COCO-format ground truth with COCO's 80 categories and the same fixed detections.

The ground truth has base, novel and other (neither split) classes, an image with only an "other"
object and one with none, a crowd box, and classes without any box; the detections hit and miss, with
false positives on every image, of every kind of class. Reported figures: CLIM's ``Base/bbox_mAP_50``
and ``Novel/bbox_mAP_50`` (stats[1]: IoU 0.5, all areas, 1000 detections, rounded to 3 decimals), ours
``coco/base_ap50`` and ``coco/novel_ap50`` (the mean of the same precision entries, not rounded).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from official_clim import CLIM_CONFIG, clim_checkout

pytest.importorskip("mmdet", reason="needs mmdet 3.3 (pip install -e '.[mm]')")
pytest.importorskip("pycocotools", reason="needs pycocotools")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ovdet" / "fvit_vitb16_ovcoco_clim.py"
OLD_CONFIG = ROOT / "configs" / "ovdet" / "fvit_vitb16_ovcoco.py"
# COCO's category ids, in COCO's order (the 80 of instances_val2017.json: 1–90 with 10 gaps)
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
SIZES = {1: (480, 640), 2: (427, 640), 3: (640, 480), 4: (480, 640), 5: (375, 500), 6: (480, 640),
         7: (512, 512), 8: (333, 500)}  # image id: (height, width)
GROUND_TRUTH = {  # image id: (class, x, y, w, h[, crowd]); person car bicycle base, bus cat novel
    1: [("person", 40, 60, 120, 300), ("person", 300, 80, 90, 250), ("car", 380, 300, 200, 120),
        ("bus", 20, 20, 300, 200)],
    2: [("bicycle", 100, 150, 180, 120), ("cat", 400, 200, 150, 120), ("person", 250, 40, 80, 200)],
    3: [("car", 30, 400, 200, 150), ("cat", 200, 100, 120, 100), ("bus", 50, 50, 350, 250)],
    4: [("traffic light", 200, 100, 40, 90)],  # only a class of neither split
    5: [],  # no object
    6: [("person", 500, 100, 70, 220), ("bus", 60, 120, 380, 260), ("traffic light", 20, 10, 30, 70)],
    7: [("bicycle", 10, 200, 200, 150), ("bicycle", 260, 220, 210, 160), ("cat", 100, 20, 180, 150, 1)],
    8: [("car", 120, 100, 250, 160), ("person", 20, 30, 60, 200)],
}


def coco_categories() -> list[dict]:
    from mmdet.datasets import CocoDataset

    names = CocoDataset.METAINFO["classes"]
    assert len(names) == len(COCO_IDS) == 80
    return [dict(id=i, name=name, supercategory="thing") for i, name in zip(COCO_IDS, names)]


def write_ground_truth(path: Path) -> dict:
    """instances_val2017.json's layout: every image, the 80 categories, the boxes above."""
    names = {c["name"]: c["id"] for c in coco_categories()}
    images, annotations = [], []
    for image_id, (h, w) in SIZES.items():
        images.append(dict(id=image_id, file_name=f"{image_id:012d}.jpg", height=h, width=w))
        for entry in GROUND_TRUTH[image_id]:
            name, x, y, bw, bh = entry[:5]
            crowd = entry[5] if len(entry) > 5 else 0
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=names[name],
                                    bbox=[x, y, bw, bh], area=bw * bh, iscrowd=crowd,
                                    segmentation=[[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]))
    data = dict(info={}, licenses=[], images=images, annotations=annotations, categories=coco_categories())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def detections() -> list[dict]:
    """Fixed detections per image, as a detector's ``pred_instances`` (labels index COCO's 80 classes):
    each ground-truth box found or missed, shifted a little or a lot, and false positives of base,
    novel, other and absent classes everywhere (high-scoring ones on the images without base or
    novel objects)."""
    from mmdet.datasets import CocoDataset

    classes = list(CocoDataset.METAINFO["classes"])
    rng = np.random.default_rng(0)
    decoys = ["person", "car", "bicycle", "bus", "cat", "dog", "chair", "traffic light"]
    samples = []
    for image_id, (h, w) in SIZES.items():
        boxes, scores, labels = [], [], []
        for entry in GROUND_TRUTH[image_id]:
            name, x, y, bw, bh = entry[:5]
            if rng.random() < 0.8:  # found, shifted by up to a fifth of its size
                dx, dy = rng.uniform(-0.2, 0.2, 2) * (bw, bh)
                boxes.append([x + dx, y + dy, x + dx + bw, y + dy + bh])
                scores.append(rng.uniform(0.2, 0.95))
                labels.append(classes.index(name))
            if rng.random() < 0.4:  # the same box, a wrong class
                boxes.append([x, y, x + bw, y + bh])
                scores.append(rng.uniform(0.0, 0.6))
                labels.append(classes.index(decoys[rng.integers(len(decoys))]))
        for _ in range(4):  # false positives anywhere
            x, y = rng.uniform(0, w - 60), rng.uniform(0, h - 60)
            bw, bh = rng.uniform(20, min(200, w - x)), rng.uniform(20, min(200, h - y))
            boxes.append([x, y, x + bw, y + bh])
            scores.append(rng.uniform(0.0, 1.0))
            labels.append(classes.index(decoys[rng.integers(len(decoys))]))
        if image_id in (4, 5):  # confident mistakes where no base or novel object is
            for name, score in (("person", 0.99), ("bus", 0.98), ("cat", 0.97), ("car", 0.96)):
                boxes.append([50.0, 60.0, 250.0, 300.0])
                scores.append(score)
                labels.append(classes.index(name))
        samples.append(dict(img_id=image_id, ori_shape=(h, w), pred_instances=dict(
            bboxes=torch.tensor(boxes, dtype=torch.float32), scores=torch.tensor(scores, dtype=torch.float32),
            labels=torch.tensor(labels, dtype=torch.long))))
    return samples


def evaluate(evaluator_cfg, dataset_cfg, root: Path, samples: list[dict]) -> dict:
    """What tools/test.py's runner does with a config's test evaluator: built by mmengine's
    ``Evaluator``, given the test dataset's metainfo, fed the predictions, evaluated. Paths under
    ``data/coco/`` move to ``root``."""
    from mmdet.registry import DATASETS
    from mmengine.evaluator import Evaluator

    def moved(path: str) -> str:
        return str(root / Path(path).relative_to("data/coco"))

    metrics = [evaluator_cfg] if isinstance(evaluator_cfg, dict) else list(evaluator_cfg)
    metrics = [dict(m, ann_file=moved(m["ann_file"])) for m in metrics]
    dataset = DATASETS.build(dict(dataset_cfg, data_root=str(root) + "/"))
    evaluator = Evaluator(metrics)
    evaluator.dataset_meta = dataset.metainfo
    evaluator.process(data_samples=copy.deepcopy(samples))
    return evaluator.evaluate(len(samples))


@pytest.fixture(scope="module")
def clim(tmp_path_factory):
    return clim_checkout(tmp_path_factory.mktemp("clim"), ("ovdet/configs", "ovdet/tools/pre_processors"))


def test_ovcoco_ap50_equals_clims(clim, tmp_path):
    """Base and novel AP50 of the new config's evaluator equal CLIM's ``Base/bbox_mAP_50`` and
    ``Novel/bbox_mAP_50`` (to CLIM's 3 decimals), the base/novel files written by CLIM's own scripts."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    data = write_ground_truth(tmp_path / "annotations" / "instances_val2017.json")
    scripts = clim / "ovdet" / "tools" / "pre_processors"
    (tmp_path / "wusize").mkdir()  # DATA.md's layout: the scripts write into data/coco/wusize/
    for split in ("base", "novel"):  # CLIM's scripts, run as they are (DATA.md's commands, paths moved)
        subprocess.run([sys.executable, str(scripts / f"keep_coco_{split}.py"),
                        "--json_path", str(tmp_path / "annotations" / "instances_val2017.json"),
                        "--out_path", str(tmp_path / "wusize" / f"instances_val2017_{split}.json")],
                       check=True, capture_output=True)
    ours = Config.fromfile(str(CONFIG), import_custom_modules=False)
    names = {c["id"]: c["name"] for c in data["categories"]}
    for split, classes in (("base", ours.base_classes), ("novel", ours.novel_classes)):
        kept = json.loads((tmp_path / "wusize" / f"instances_val2017_{split}.json").read_text())
        assert kept["images"] == data["images"] and kept["categories"] == data["categories"]
        assert {names[a["category_id"]] for a in kept["annotations"]} == \
            {names[a["category_id"]] for a in data["annotations"]} & set(classes)

    theirs = Config.fromfile(str(clim / CLIM_CONFIG))
    samples = detections()
    want = evaluate(theirs.test_evaluator, theirs.test_dataloader.dataset, tmp_path, samples)
    got = evaluate(ours.test_evaluator, ours.test_dataloader.dataset, tmp_path, samples)
    print(f"[OV-COCO metric vs CLIM] CLIM Base/Novel bbox_mAP_50 {want['Base/bbox_mAP_50']} / "
          f"{want['Novel/bbox_mAP_50']}; ours coco/base_ap50, coco/novel_ap50 {got['coco/base_ap50']:.6f} / "
          f"{got['coco/novel_ap50']:.6f}")
    for split, key in (("base", "Base"), ("novel", "Novel")):
        value = float(got[f"coco/{split}_ap50"])
        assert 0.05 < value < 0.95, (split, value)  # neither trivial nor perfect
        assert want[f"{key}/bbox_mAP_50"] == round(value, 3), split
        assert abs(want[f"{key}/bbox_mAP_50"] - value) <= 5e-4


def test_the_old_protocol_scores_otherwise(tmp_path):
    """The same detections under fvit_vitb16_ovcoco.py's protocol (mmdet's coco2ovd file: only the 65
    OV classes and only the images with a base or novel box) score higher: the false positives on the
    images without base or novel objects are not counted. So the protocol change matters here."""
    import importlib.util

    import mmdet
    from mmdet.datasets import CocoDataset
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    data = write_ground_truth(tmp_path / "annotations" / "instances_val2017.json")
    samples = detections()
    ours = Config.fromfile(str(CONFIG), import_custom_modules=False)
    new = evaluate(ours.test_evaluator, ours.test_dataloader.dataset, tmp_path, samples)

    spec = importlib.util.spec_from_file_location(
        "coco2ovd", Path(mmdet.__file__).parent / ".mim" / "tools" / "dataset_converters" / "coco2ovd.py")
    coco2ovd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coco2ovd)
    split = {c["id"]: "seen" if c["name"] in coco2ovd.base_classes else "unseen"
             for c in data["categories"] if c["name"] in coco2ovd.base_classes + coco2ovd.novel_classes}
    coco2ovd.filter_annotation(data, ["seen", "unseen"], split)
    (tmp_path / "annotations" / "instances_val2017_all_2.json").write_text(json.dumps(data))
    kept_images = {image["id"] for image in data["images"]}
    assert kept_images == set(SIZES) - {4, 5}

    old = Config.fromfile(str(OLD_CONFIG), import_custom_modules=False)
    vocabulary = list(old.test_dataloader.dataset.metainfo.classes)  # the old config's 65 test classes
    coco = list(CocoDataset.METAINFO["classes"])
    relabelled = []
    for sample in samples:  # what a 65-class detector would have output on the images it is given
        if sample["img_id"] not in kept_images:
            continue
        pred = sample["pred_instances"]
        names = [coco[i] for i in pred["labels"].tolist()]
        keep = torch.tensor([n in vocabulary for n in names])
        labels = torch.tensor([vocabulary.index(n) for n in names if n in vocabulary], dtype=torch.long)
        relabelled.append(dict(sample, pred_instances=dict(bboxes=pred["bboxes"][keep],
                                                           scores=pred["scores"][keep], labels=labels)))
    previous = evaluate(old.test_evaluator, old.test_dataloader.dataset, tmp_path, relabelled)
    print(f"[OV-COCO metric] base/novel AP50: CLIM's protocol {new['coco/base_ap50']:.4f} / "
          f"{new['coco/novel_ap50']:.4f}, coco2ovd's {previous['coco/base_ap50']:.4f} / "
          f"{previous['coco/novel_ap50']:.4f}")
    assert previous["coco/base_ap50"] > new["coco/base_ap50"] + 0.01
    assert previous["coco/novel_ap50"] > new["coco/novel_ap50"] + 0.01
