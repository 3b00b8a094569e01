"""PhraseCut for CLIPSeg (``ovdense/mm/phrasecut.py``, ``configs/clipseg/clipseg_vit-b16_phrasecut.py``)
on the synthetic PhraseCut of ``tools/data/make_synthetic_phrasecut.py``: the items against the
annotation files, the regions against shapes drawn here by hand and against PhraseCut's own
``polygons_to_mask``, the metric against numpy and SciPy and against the official CLIPSeg
``FixedIntervalMetrics``, the config built on the synthetic layout, and a short train + test run
through tools/.

The official code runs from the mirrors of timojl/clipseg and ChenyunWu/PhraseCutDataset
(``OVDENSE_CLIPSEG_REPO`` / ``OVDENSE_PHRASECUT_REPO``: bare git repositories); those tests skip
without them.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tool_runs import ROOT, load_tool, run, train_command

pytest.importorskip("mmcv.ops",
                    reason="needs full mmcv with its compiled ops: python tools/misc/build_mmcv.py")
pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

from ovdense.mm import phrasecut  # noqa: E402

CONFIG = ROOT / "configs" / "clipseg" / "clipseg_vit-b16_phrasecut.py"
CLIPSEG_REPO = Path(os.environ.get("OVDENSE_CLIPSEG_REPO", "/work/.mirror/timojl+clipseg/repo"))
PHRASECUT_REPO = Path(os.environ.get("OVDENSE_PHRASECUT_REPO",
                                     "/work/.mirror/ChenyunWu+PhraseCutDataset/repo"))
THRESHOLDS = np.linspace(0, 1, 51)[1:-1]


def official_file(repo: Path, path: str) -> str:
    """A file of an official repository's mirror (HEAD), or skip."""
    if not repo.is_dir():
        pytest.skip(f"no mirror of the official code at {repo}")
    result = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"{path} is not in {repo}: {result.stderr.strip()}")
    return result.stdout


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """The synthetic PhraseCut: 10 training, 2 validation and 6 test images."""
    out = tmp_path_factory.mktemp("phrasecut")
    writer = load_tool("data/make_synthetic_phrasecut")
    return writer.write_phrasecut(out, num_train=10, num_val=2, num_test=6, seed=0)


def build_dataset(root, split="test", pipeline=(), **kwargs):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    return DATASETS.build(dict(type="PhraseCutDataset", data_root=str(root), split=split,
                               pipeline=list(pipeline), **kwargs))


def refer(root, split) -> list[dict]:
    return json.loads((Path(root) / f"refer_{split}.json").read_text())


# --------------------------------------------------------------------------------------------
# The dataset


def test_items_are_the_tasks_of_the_split(layout, tmp_path):
    """One item per task of refer_test.json, grouped by image in the order the images first
    appear (RefVGLoader's), each image's tasks in file order — here a copy of the layout whose
    tasks are shuffled; the classes are background then the split's phrases sorted; an item's
    phrase_id names its phrase; its image is images/<image_id>.jpg; its polygons are the task's."""
    root = tmp_path / "VGPhraseCut_v0"
    root.mkdir()
    for name in ("image_data_split.json", "refer_val.json"):
        (root / name).write_text((layout["root"] / name).read_text())
    tasks = refer(layout["root"], "test")
    tasks = [tasks[i] for i in np.random.default_rng(0).permutation(len(tasks))]
    (root / "refer_test.json").write_text(json.dumps(tasks))
    dataset = build_dataset(root, "test")
    phrases = sorted({t["phrase"] for t in tasks})
    assert dataset.metainfo["classes"] == ("background", *phrases)
    images = list(dict.fromkeys(t["image_id"] for t in tasks))
    expected = [t for i in images for t in tasks if t["image_id"] == i]
    assert expected != tasks  # the shuffle parted some image's tasks
    assert len(dataset) == len(expected) > 6
    for i, task in enumerate(expected):
        info = dataset.get_data_info(i)
        assert info["task_id"] == task["task_id"] and info["phrase"] == task["phrase"]
        assert dataset.metainfo["classes"][info["phrase_id"]] == task["phrase"] and info["phrase_id"] >= 1
        assert info["img_path"] == str(root / "images" / f"{task['image_id']}.jpg")
        assert info["polygons"] == task["Polygons"]
    both = build_dataset(root, "val_test")  # PhraseCut's joined splits (RefVGLoader)
    assert len(both) == len(dataset) + len(refer(root, "val"))


def test_the_official_skipped_images_are_left_out(layout):
    """The default skip list is the official loader's ``invalid_img_ids``; an image named in
    ``skip_image_ids`` loses all its tasks."""
    source = official_file(CLIPSEG_REPO, "datasets/phrasecut.py")
    start = source.index("invalid_img_ids = set([") + len("invalid_img_ids = set([")
    official = {int(x) for x in source[start:source.index("])", start)].replace("\n", " ").split(",")}
    assert phrasecut.CLIPSEG_SKIPPED_IMAGES == official and len(official) == 17
    root = layout["root"]
    first = refer(root, "test")[0]["image_id"]
    kept = build_dataset(root, "test", skip_image_ids=[first])
    assert len(kept) == sum(t["image_id"] != first for t in refer(root, "test"))
    assert all(kept.get_data_info(i)["image_id"] != first for i in range(len(kept)))


def test_images_of_class_lists_each_phrases_items(layout):
    """Class id → the items of that phrase, from refer_train.json directly."""
    root = layout["root"]
    dataset = build_dataset(root, "train")
    tasks = refer(root, "train")
    order = [t for i in dict.fromkeys(t["image_id"] for t in tasks) for t in tasks if t["image_id"] == i]
    expected = {}
    for i, task in enumerate(order):
        expected.setdefault(dataset.metainfo["classes"].index(task["phrase"]), []).append(i)
    got = dataset.images_of_class()
    assert got == expected and 0 not in got
    assert any(len(v) > 1 for v in got.values())  # phrases shared by several images


def shape_region(shapes, height, width) -> np.ndarray:
    """The union of the writer's shapes, drawn here: squares and right triangles with integer
    corners, boundaries included (``(kind, x0, y0, side)``, x the column)."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.zeros((height, width), bool)
    for kind, x0, y0, side in shapes:
        inside = (x0 <= xx) & (xx <= x0 + side) & (y0 <= yy) & (yy <= y0 + side)
        if kind == "triangle":
            inside &= (xx - x0) <= (yy - y0)
        elif kind == "mirrored triangle":
            inside &= (x0 + side - xx) <= (yy - y0)
        out |= inside
    return out


def test_masks_are_the_known_shapes_in_the_image(layout):
    """Through LoadImageFromFile + LoadPhraseMask + PackSegInputs: the label map is the task's
    shapes exactly (every instance, every polygon; points [x, y] truncated), the image shows
    the phrase's colour there, and the metainfo carries the phrase and label_classes."""
    from ovdense.data.synthetic import COLOURS

    cfg_keys = ("img_path", "ori_shape", "img_shape", "task_id", "phrase", "phrase_id", "label_classes")
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadPhraseMask"),
                dict(type="PackSegInputs", meta_keys=cfg_keys)]
    dataset = build_dataset(layout["root"], "train", pipeline)
    kinds = set()
    for i in range(len(dataset)):
        data = dataset[i]
        sample = data["data_samples"]
        task = layout["tasks"][sample.metainfo["task_id"]]
        expected = shape_region(task["shapes"], task["height"], task["width"])
        gt = sample.gt_sem_seg.data[0].numpy()
        assert gt.shape == (task["height"], task["width"]) and set(np.unique(gt)) <= {0, 1}
        assert np.array_equal(gt == 1, expected), task
        assert sample.metainfo["phrase"] == task["phrase"]
        assert sample.metainfo["label_classes"] == [0, sample.metainfo["phrase_id"]]
        rgb = data["inputs"].numpy()[::-1].transpose(1, 2, 0).astype(float)  # H, W, 3 (packed BGR)
        inner = expected.copy()  # two pixels in from the edge: JPEG smears colour across it
        for _ in range(2):
            inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        inner[[0, -1]], inner[:, [0, -1]] = False, False
        seen = np.median(rgb[inner], axis=0)
        nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - seen).sum())
        assert nearest == task["phrase"].split()[0], (task, seen)
        kinds.update(shape[0] for shape in task["shapes"])
    assert kinds == {"square", "triangle", "mirrored triangle"}
    several = [t for t in refer(layout["root"], "train") if len(t["Polygons"]) > 1]
    split = [t for t in refer(layout["root"], "train") if any(len(i) > 1 for i in t["Polygons"])]
    assert several and split  # tasks of two instances and instances of two polygons were drawn


def test_polygons_follow_phrasecuts_convention():
    """Points are [x, y] with x the column, truncated: a box of columns 2–8, rows 1–4 on a canvas
    wider than tall."""
    mask = phrasecut.polygons_mask([[[[2.7, 1.2], [8.9, 1.5], [8.2, 4.9], [2.1, 4.4]]], [[[0, 0]]]], 6, 11)
    expected = np.zeros((6, 11), np.uint8)
    expected[1:5, 2:9] = 1
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected)


def test_polygons_mask_is_phrasecuts_own(tmp_path):
    """Against ``polygons_to_mask`` of PhraseCut's utils/data_transfer.py (run from its mirror) on
    random polygons, self-crossing ones included, of several instances (the evaluator's
    flattening of a task's Polygons)."""
    source = official_file(PHRASECUT_REPO, "utils/data_transfer.py")
    (tmp_path / "phrasecut_data_transfer.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        official = importlib.import_module("phrasecut_data_transfer")
    finally:
        sys.path.remove(str(tmp_path))
    rng = np.random.default_rng(0)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(20, 60, 2))
        instances = [[rng.uniform(-3, [width + 3, height + 3], (int(rng.integers(1, 7)), 2)).tolist()
                      for _ in range(int(rng.integers(1, 3)))] for _ in range(int(rng.integers(1, 3)))]
        flat = [polygon for polygons in instances for polygon in polygons]
        want = official.polygons_to_mask(flat, width, height)
        assert np.array_equal(phrasecut.polygons_mask(instances, height, width), want.astype(np.uint8))


# --------------------------------------------------------------------------------------------
# The metric


def random_samples(rng, count=7):
    """(probability float32 [1, H, W], gt int64 [1, H, W]) pairs: blob-shaped foregrounds,
    noisy probabilities, some exactly on thresholds; one sample predicts nothing."""
    out = []
    for k in range(count):
        h, w = (int(v) for v in rng.integers(12, 30, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 10)
        gt = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.int64)
        logit = 2.5 * (2 * gt - 1) * rng.uniform(0.2, 1.0) + rng.normal(0, 1.5, (h, w))
        p = (1 / (1 + np.exp(-logit))).astype(np.float32)
        exact = rng.random((h, w)) < 0.1
        p[exact] = THRESHOLDS[rng.integers(0, len(THRESHOLDS), int(exact.sum()))].astype(np.float32)
        if k == count - 1:
            p[:] = 0.01
        out.append((torch.from_numpy(p)[None], torch.from_numpy(gt)[None]))
    return out


def brute_counts(p: np.ndarray, g: np.ndarray) -> list[list[int]]:
    """``[4][T]``: tp, fp, fn, tn of a probability map ``p`` and a bool region ``g``, p > t in float32."""
    p, g = p.ravel(), g.ravel()
    out = [[int(np.sum((p > t) & g)), int(np.sum((p > t) & ~g)), int(np.sum((p <= t) & g)),
            int(np.sum((p <= t) & ~g))] for t in THRESHOLDS.astype(np.float32)]
    return np.array(out).T.tolist()


def test_threshold_counts_against_numpy():
    """tp, fp, fn, tn at each threshold by brute force (p > t in float32), label 255 ignored."""
    rng = np.random.default_rng(1)
    for probability, gt in random_samples(rng, 4):
        gt = gt.clone()
        gt[0, :2] = 255
        p, g = probability.numpy()[0], gt.numpy()[0]
        keep = g != 255
        want = brute_counts(p[keep], g[keep] == 1)
        assert np.array_equal(phrasecut.threshold_counts(probability, gt), want)


def scipy_simps(y, x) -> float:
    """``scipy.integrate.simps(y, x)`` of SciPy < 1.11 (``even="avg"``) from today's
    ``simpson`` (which agrees with it on an odd number of points) and ``trapezoid``."""
    from scipy.integrate import simpson, trapezoid

    y, x = np.asarray(y, float), np.asarray(x, float)
    if len(y) < 3:
        return float(trapezoid(y, x=x)) if len(y) == 2 else 0.0
    if len(y) % 2:
        return float(simpson(y, x=x))
    last = simpson(y[:-1], x=x[:-1]) + trapezoid(y[-2:], x=x[-2:])
    first = trapezoid(y[:2], x=x[:2]) + simpson(y[1:], x=x[1:])
    return float(0.5 * (last + first))


def test_simpson_is_scipys_old_simps():
    pytest.importorskip("scipy.integrate")
    rng = np.random.default_rng(2)
    for n in range(2, 12):
        x = np.sort(rng.uniform(0, 1, n))
        y = rng.uniform(0, 1, n)
        assert phrasecut.simpson(y, x) == pytest.approx(scipy_simps(y, x), rel=1e-12, abs=1e-12), n


def test_scores_against_an_independent_computation():
    """mIoU: the mean of each sample's tp / (1 + tp + fp + fn) at 0.3; IoU_FG: the ratio of the
    summed counts; AP: Simpson over the (recall, precision) pairs of the summed counts — all by
    numpy here (counts by brute force)."""
    pytest.importorskip("scipy.integrate")
    samples = random_samples(np.random.default_rng(3))
    counts = np.array([brute_counts(p.numpy()[0], g.numpy()[0] == 1) for p, g in samples], float)  # N, 4, T
    j = 14  # 0.3
    assert THRESHOLDS[j] == 0.3
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    miou = np.mean(tp[:, j] / (1 + tp[:, j] + fp[:, j] + fn[:, j]))
    TP, FP, FN = tp.sum(0), fp.sum(0), fn.sum(0)
    fg = TP[j] / (1 + TP[j] + FP[j] + FN[j])
    made = TP + FP > 0
    curve = sorted(set(zip(TP[made] / (1 + TP[made] + FN[made]), TP[made] / (1 + TP[made] + FP[made]))))
    ap = scipy_simps([c[1] for c in curve], [c[0] for c in curve])
    metric = phrasecut.PhraseGroundingMetric()
    metric.process([], [dict(seg_logits=dict(data=p), gt_sem_seg=dict(data=g)) for p, g in samples])
    got = metric.compute_metrics(metric.results)
    assert got == pytest.approx({"mIoU": 100 * miou, "IoU_FG": 100 * fg, "AP": 100 * ap}, rel=1e-12)
    assert 10 < got["mIoU"] < 90 and 10 < got["AP"] < 100 and got["IoU_FG"] != got["mIoU"]


@pytest.fixture(scope="module")
def official_metrics(tmp_path_factory):
    """CLIPSeg's metrics.py and general_utils.py from the mirror, importable, with SciPy's removed
    ``simps`` restored by ``scipy_simps``."""
    import scipy.integrate

    folder = tmp_path_factory.mktemp("clipseg_official")
    (folder / "metrics.py").write_text(official_file(CLIPSEG_REPO, "metrics.py"))
    (folder / "general_utils.py").write_text(official_file(CLIPSEG_REPO, "general_utils.py"))
    had = hasattr(scipy.integrate, "simps")
    if not had:
        scipy.integrate.simps = scipy_simps
    sys.path.insert(0, str(folder))
    saved = {name: sys.modules.pop(name) for name in ("metrics", "general_utils") if name in sys.modules}
    try:
        yield importlib.import_module("metrics")
    finally:
        sys.path.remove(str(folder))
        for name in ("metrics", "general_utils"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        if not had:
            del scipy.integrate.simps


def test_metric_is_the_official_fixed_interval_metrics(official_metrics):
    """The official FixedIntervalMetrics fed as score.py feeds it for PhraseCut (each sample its
    own class: its index; probabilities given, sigmoid=False) gives our mIoU, IoU_FG and AP."""
    samples = random_samples(np.random.default_rng(4), 9)
    official = official_metrics.FixedIntervalMetrics(resize_pred=True, sigmoid=False)
    for i, (probability, gt) in enumerate(samples):
        official.add([probability[None]], (gt[None].float(), torch.zeros(1, 0), torch.tensor([i])))
    want = official.value()
    metric = phrasecut.PhraseGroundingMetric(threshold=0.3)
    metric.process([], [dict(seg_logits=dict(data=p), gt_sem_seg=dict(data=g)) for p, g in samples])
    got = metric.evaluate(len(samples))
    assert got["mIoU"] == pytest.approx(100 * want["miou_0.3"], rel=1e-9)
    assert got["IoU_FG"] == pytest.approx(100 * want["fgiou_0.3"], rel=1e-9)
    assert got["AP"] == pytest.approx(100 * want["ap"], rel=1e-9)
    half = phrasecut.PhraseGroundingMetric(threshold=0.5)
    half.process([], [dict(seg_logits=dict(data=p), gt_sem_seg=dict(data=g)) for p, g in samples])
    assert half.evaluate(len(samples))["mIoU"] == pytest.approx(100 * want["miou_0.5"], rel=1e-9)


def test_resize_to_scores_at_the_official_input_size():
    """resize_to=(S, S): the mask resized as the official loader does (nearest: row ⌊i·H/S⌋,
    column ⌊j·W/S⌋), a probability already S × S left as it is."""
    rng = np.random.default_rng(5)
    S, H, W = 16, 40, 25
    gt = torch.from_numpy((rng.random((1, H, W)) < 0.4).astype(np.int64))
    probability = torch.from_numpy(rng.random((1, S, S)).astype(np.float32))
    small = gt[:, (np.arange(S) * H) // S][:, :, (np.arange(S) * W) // S]
    resized = phrasecut.PhraseGroundingMetric(resize_to=(S, S))
    resized.process([], [dict(seg_logits=dict(data=probability), gt_sem_seg=dict(data=gt))])
    direct = phrasecut.PhraseGroundingMetric()
    direct.process([], [dict(seg_logits=dict(data=probability), gt_sem_seg=dict(data=small))])
    assert np.array_equal(resized.results[0], direct.results[0])


def test_metric_refuses_a_class_map_and_a_wrong_threshold():
    from ovdense.errors import OvdenseError

    metric = phrasecut.PhraseGroundingMetric()
    with pytest.raises(OvdenseError, match="one probability map"):
        metric.process([], [dict(seg_logits=dict(data=torch.rand(3, 8, 8)),
                                 gt_sem_seg=dict(data=torch.zeros(1, 8, 8, dtype=torch.long)))])
    with pytest.raises(OvdenseError, match="not one of"):
        phrasecut.PhraseGroundingMetric(threshold=0.33)


# --------------------------------------------------------------------------------------------
# The config


def test_config_builds_on_the_synthetic_layout(layout):
    """The PhraseCut config parses; its training set is ClipSegPromptDataset over PhraseCut train
    (prompts are phrases, targets the phrase's region) and its test set PhraseCut test whose
    samples carry their phrase and binary mask at the image's size; the metric is
    PhraseGroundingMetric at 0.3 on 352 × 352."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    cfg = Config.fromfile(str(CONFIG))
    assert cfg.model.type == "OvdenseCLIPSeg" and cfg.model.get("test_classnames") is None
    assert cfg.test_evaluator == dict(type="PhraseGroundingMetric", threshold=0.3, resize_to=(352, 352))
    assert "LoadAnnotations" not in str(cfg.train_dataloader.dataset.dataset.pipeline)
    root = str(layout["root"])
    cfg.train_dataloader.dataset.dataset.data_root = root
    cfg.test_dataloader.dataset.data_root = root
    train = DATASETS.build(cfg.train_dataloader.dataset)
    assert type(train).__name__ == "ClipSegPromptDataset" and train.names == train.dataset.metainfo["classes"]
    data = train[(0, 7, 0)]
    sample = data["data_samples"]
    plan = sample.metainfo["clipseg_prompt"]
    assert data["inputs"].shape == (3, 352, 352) and plan["cls"] >= 1
    assert any(phrase in plan["text"] for phrase in [train.names[plan["cls"]]])
    assert sample.metainfo["label_classes"] == [0, train.dataset.get_data_info(0)["phrase_id"]]
    supported = 0
    for draw in range(16):  # a visual prompt wherever another task has the phrase: its whole image
        index = draw % len(train)
        sample = train[(index, draw, 0)]["data_samples"]
        plan = sample.metainfo["clipseg_prompt"]
        others = [i for i in train.dataset.images_of_class().get(plan["cls"], []) if i != index]
        assert (plan["support"] is not None) == bool(others), plan
        if others:
            supported += 1
            assert train.dataset.get_data_info(plan["support"])["phrase_id"] == plan["cls"]
            assert bool(sample.support_mask.any()) and max(sample.support_inputs.shape[1:]) == 352
    assert supported >= 3
    test = DATASETS.build(cfg.test_dataloader.dataset)
    assert len(test) == len(refer(root, "test"))
    sample = test[0]["data_samples"]
    task = layout["tasks"][sample.metainfo["task_id"]]
    assert sample.metainfo["phrase"] == task["phrase"]
    assert tuple(sample.metainfo["ori_shape"]) == tuple(sample.metainfo["img_shape"]) == (task["height"],
                                                                                          task["width"])
    assert np.array_equal(sample.gt_sem_seg.data[0].numpy() == 1,
                          shape_region(task["shapes"], task["height"], task["width"]))


# --------------------------------------------------------------------------------------------
# tools/train.py and tools/test.py

TOY_CONFIG = """
_base_ = {base!r}
image_size = 128
model = dict(backbone=dict(_delete_=True, name="toy", cache_dir={cache!r}),
             head=dict(image_size=image_size, reduce_dim=16, mlp=64),
             data_preprocessor=dict(size_divisor=image_size))
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadPhraseMask"),
    dict(type="ResizeShortestEdge", scale=image_size, max_size=100 * image_size),
    dict(type="RandomCrop", crop_size=(image_size, image_size), cat_max_ratio=0.95),
    dict(type="PackSegInputs", meta_keys={{{{_base_.meta_keys}}}}),
]
support_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadPhraseMask"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="PackSegInputs", meta_keys={{{{_base_.meta_keys}}}}),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(support_pipeline=support_pipeline,
                                     dataset=dict(data_root={root!r}, pipeline=train_pipeline)))
test_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root={root!r}))
test_evaluator = dict(resize_to=(image_size, image_size))
train_cfg = dict(max_iters=2, val_interval=3)
param_scheduler = [dict(type="CosineAnnealingLR", T_max=2, eta_min=1e-4, begin=0, end=2, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
custom_hooks = []
"""


def test_train_then_test_through_the_tools(layout, tmp_path):
    """Two iterations of CLIPSeg on the synthetic PhraseCut (toy backbone, a small decoder) with
    tools/train.py, then tools/test.py on its checkpoint: the metric it prints equals the one
    computed here from the trained model's probabilities of each test phrase."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS

    config = tmp_path / "clipseg_toy_phrasecut.py"
    config.write_text(TOY_CONFIG.format(base=str(CONFIG), cache=str(tmp_path / "cache"),
                                        root=str(layout["root"])))
    work = tmp_path / "work"
    run(train_command(config, work, ["default_hooks.logger.interval=1"]), cwd=tmp_path, check=True)
    checkpoint = work / "iter_2.pth"
    assert checkpoint.is_file()
    result = run([sys.executable, str(ROOT / "tools" / "test.py"), str(config), "--checkpoint",
                  str(checkpoint), "--work-dir", str(tmp_path / "test")], cwd=tmp_path, check=True)
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("metrics: ")][-1]
    printed = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in line[len("metrics: "):].split(", "))}
    assert set(printed) == {"mIoU", "IoU_FG", "AP"}

    init_default_scope("mmseg")
    cfg = Config.fromfile(str(config))
    model = MODELS.build(cfg.model)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    test = DATASETS.build(cfg.test_dataloader.dataset)
    counts = []
    for i in range(len(test)):
        data = test[i]
        task = layout["tasks"][data["data_samples"].metainfo["task_id"]]
        rgb = data["inputs"].flip(0).permute(1, 2, 0).numpy()  # the image as the pipeline read it
        with torch.no_grad():
            p = model.phrase_probability(rgb, task["phrase"])  # 1, H, W
        p = torch.nn.functional.interpolate(p[None].float(), (128, 128), mode="bilinear")[0, 0]  # 128, 128
        region = shape_region(task["shapes"], task["height"], task["width"])
        g = region[(np.arange(128) * task["height"]) // 128][:, (np.arange(128) * task["width"]) // 128]
        counts.append(brute_counts(p.numpy(), g))
    want = phrasecut.phrase_grounding_scores(np.array(counts), 0.3)
    assert want["AP"] > 0 and want["mIoU"] > 0  # not a vacuous comparison
    for key, value in want.items():
        assert printed[key] == pytest.approx(value, abs=0.006), (key, printed, want)
