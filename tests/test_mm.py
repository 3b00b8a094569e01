"""The OpenMMLab adapter (``ovdense/mm``), its configs and ``tools/test.py``, on CPU.

Synthetic datasets in the real layouts (``ovdense.data.layouts``) go through mmseg's dataset
classes, pipelines and ``IoUMetric``; the mIoU is checked against an independent computation
from the saved predictions and the ground-truth files; the mm segmentor's labels are checked
against ``ovdense.Segmenter``'s; two processes (torchrun, gloo) against one. A tiny random ViT
(``tests/conftest.py``, weights saved to a file so every process loads the same) stands in for
CLIP, with one prompt template.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mmcv.ops",
                    reason="needs full mmcv with its compiled ops: python tools/misc/build_mmcv.py")
pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from tool_runs import load_tool

from ovdense import Segmenter, Vocabulary, create_backbone  # noqa: E402
from ovdense.errors import OvdenseError  # noqa: E402
from ovdense.eval.segmentation import ConfusionMatrix  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHODS = ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "cliptrase", "itaclip", "proxyclip",
           "cliper")
NEEDS_VFM = ("proxyclip",)
SIZE = 64  # synthetic image side (Cityscapes: SIZE × 2·SIZE)


def parse_options(items) -> dict:
    """``key=value`` strings → the dict ``--cfg-options`` gives (values parsed by DictAction)."""
    import argparse

    from mmengine.config import DictAction

    parser = argparse.ArgumentParser()
    parser.add_argument("--options", nargs="+", action=DictAction)
    return parser.parse_args(["--options", *items]).options


test_tool = load_tool("test")


# --------------------------------------------------------------------------------------------
# Fixtures: tiny weights in a file, synthetic datasets in the real layouts


@pytest.fixture(scope="module")
def tiny(tiny_backbone, tiny_config_path, tmp_path_factory):
    """cfg-options that put the tiny ViT (saved weights, private text cache) into any config."""
    folder = tmp_path_factory.mktemp("tiny")
    weights = folder / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), weights)
    return [
        f"model.backbone.name={tiny_config_path}",
        f"model.backbone.pretrained={weights}",
        f"model.backbone.cache_dir={folder / 'cache'}",
        "model.templates=single",
        "test_dataloader.num_workers=0",
        "test_dataloader.persistent_workers=False",
    ]


#: cfg-options for a method that needs a VFM (ProxyCLIP): random weights, the smaller DINO (faster here)
RANDOM_VFM = ["model.vfm.name=dino_vitb16", "model.vfm.weights=random"]


def vfm_options(method: str) -> list[str]:
    return RANDOM_VFM if method in NEEDS_VFM else []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``{dataset: data_root}`` for the eight benchmarks, three validation images each."""
    return load_tool("data/make_synthetic_benchmarks").write_benchmarks(
        tmp_path_factory.mktemp("benchmarks"), 3, seed=0, size=SIZE)


# --------------------------------------------------------------------------------------------
# An independent mIoU from the files


NUM_CLASSES = dict(voc21=21, voc20=20, context60=60, context59=59, coco_object=81, coco_stuff=171,
                   cityscapes=19, ade150=150)
REDUCE_ZERO = {"voc20", "context59", "ade150"}


def ground_truth(dataset: str, root: Path) -> dict[str, Path]:
    """``{prediction stem: ground-truth file}`` of the validation split, from the layout."""
    if dataset in ("voc21", "voc20"):
        ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
        return {i: root / "SegmentationClass" / f"{i}.png" for i in ids}
    if dataset in ("context60", "context59"):
        ids = (root / "ImageSets/SegmentationContext/val.txt").read_text().split()
        return {i: root / "SegmentationClassContext" / f"{i}.png" for i in ids}
    if dataset == "ade150":
        return {p.stem: p for p in (root / "annotations/validation").glob("*.png")}
    if dataset in ("coco_stuff", "coco_object"):
        suffix = "_labelTrainIds.png" if dataset == "coco_stuff" else "_instanceTrainIds.png"
        return {p.name[: -len(suffix)]: p for p in (root / "annotations/val2017").glob("*" + suffix)}
    if dataset == "cityscapes":
        suffix = "_gtFine_labelTrainIds.png"
        return {p.name[: -len(suffix)] + "_leftImg8bit": p
                for p in (root / "gtFine/val").rglob("*" + suffix)}
    raise KeyError(dataset)


def independent_scores(dataset: str, root: Path, predictions: Path) -> dict:
    """mIoU and pixel accuracy (%, 2 decimals as IoUMetric) from the files alone."""
    matrix = ConfusionMatrix(NUM_CLASSES[dataset], ignore_index=255)
    files = ground_truth(dataset, root)
    assert files and sorted(p.stem for p in predictions.glob("*.png")) == sorted(files)
    for stem, gt_file in files.items():
        truth = np.array(Image.open(gt_file)).astype(np.int64)
        prediction = np.array(Image.open(predictions / f"{stem}.png")).astype(np.int64)
        if dataset in REDUCE_ZERO:  # mmseg: 0 → ignored, k → k − 1; predictions are saved + 1
            truth = np.where(truth == 0, 255, np.where(truth == 255, 255, truth - 1))
            prediction = prediction - 1
        matrix.update(prediction, truth)
    scores = matrix.scores()
    return {"mIoU": round(100 * scores.miou, 2), "aAcc": round(100 * scores.pixel_accuracy, 2)}


# --------------------------------------------------------------------------------------------
# Configs


def test_every_config_parses_and_builds(tiny, monkeypatch, tmp_path):
    """Every file in configs/ parses; every method config builds its model and its class file
    has as many classes as the dataset it evaluates. (The 56 models share one tiny backbone.)"""
    from mmseg.registry import DATASETS, MODELS

    import ovdense.mm.segmentor

    backbones = {}

    def shared_backbone(**kwargs):
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in backbones:
            backbones[key] = create_backbone(**kwargs)
        return backbones[key]

    monkeypatch.setattr(ovdense.mm.segmentor, "create_backbone", shared_backbone)

    init_default_scope("mmseg")
    files = sorted(CONFIGS.rglob("*.py"))
    method_configs = [f for f in files if f.parent.name == "training_free"]
    assert len(method_configs) == len(METHODS) * 8
    overrides = parse_options([item for item in tiny if item.startswith("model.")])
    built = built_heads = 0
    from ovdense.heads.clipdinoiser import ClipDinoiserHead, save_head

    tiny_backbone = shared_backbone(**{k.split(".")[-1]: v for k, v in (i.split("=", 1) for i in tiny
                                                                       if i.startswith("model.backbone."))})
    clipdinoiser_head = save_head(tmp_path / "clipdinoiser_head.safetensors", ClipDinoiserHead(tiny_backbone),
                                  tiny_backbone)
    for path in files:
        cfg = Config.fromfile(str(path))
        if path.parent.name == "_base_" or path.parent == CONFIGS / "_base_" / "models":  # shared
            continue
        if path.parent.name == "ovdet":  # mmdet configs: tests/test_mm_detection.py builds them
            assert cfg.default_scope == "mmdet", path
            continue
        assert cfg.default_scope == "mmseg" and "ovdense.mm" in cfg.custom_imports["imports"], path
        if path.parent.name == "adaptclip":  # training only: tests/test_train_adaptclip.py builds them
            assert cfg.model.type == "OvdenseAdaptClip" and cfg.get("test_dataloader") is None, path
            assert cfg.train_dataloader.dataset.type == "AnomalyPairDataset", path
            continue
        if "_train" in path.stem:  # training recipes: tests/test_train_clipdinoiser.py builds them
            assert cfg.train_dataloader is not None and cfg.get("test_dataloader") is None, path
            continue
        if path.parent.name == "clipself":  # training only: tests/test_train_clipself.py builds them
            assert cfg.model.type == "OvdenseCLIPSelf" and cfg.test_dataloader is None, path
            assert cfg.train_dataloader.dataset.type == "ClipSelfDataset", path
            continue
        assert "Resize" not in str(cfg.test_dataloader.dataset.pipeline), path
        if path.parent.name == "clipdinoiser":  # a trained head: the tiny backbone's random one
            cfg.merge_from_dict(parse_options([*[item for item in tiny if item.startswith("model.")],
                                               f"model.head_checkpoint={clipdinoiser_head}"]))
            model = MODELS.build(cfg.model)
            dataset_cls = DATASETS.get(cfg.test_dataloader.dataset.type)
            assert model.num_classes == len(dataset_cls.METAINFO["classes"]), path
            assert model.segmenter.found_background == path.stem.endswith(("voc21", "coco_object")), path
            built_heads += 1
            continue
        if path.parent.name != "training_free":
            continue
        assert cfg.model.method in METHODS and path.name.startswith(cfg.model.method + "_"), path
        dataset_cls = DATASETS.get(cfg.test_dataloader.dataset.type)
        classes = dataset_cls.METAINFO["classes"]
        listed = len(Vocabulary.from_file(cfg.model.classnames))
        # CLIPer's class files list the background first, also for a dataset without one
        assert listed == len(classes) + int(cfg.model.get("dataset_background") is False), path
        if cfg.model.method in NEEDS_VFM:
            assert cfg.model.vfm.name == "dino_vitb8", path  # ProxyCLIP's tables
            cfg.merge_from_dict(parse_options(RANDOM_VFM))
        cfg.merge_from_dict(overrides)
        model = MODELS.build(cfg.model)
        assert model.num_classes == len(classes) and model.segmenter.method == cfg.model.method
        built += 1
    assert built == len(METHODS) * 8 and built_heads == 8 and len(backbones) == 1
    ade847 = Config.fromfile(str(CONFIGS / "_base_" / "datasets" / "ade847.py"))
    assert len(Vocabulary.from_file(ade847.model.classnames)) == 847
    assert ade847.test_dataloader.dataset.classnames == ade847.model.classnames


def test_configs_follow_the_official_settings():
    """Spot checks of per-dataset settings against the official configs."""
    def model(name):
        return Config.fromfile(str(CONFIGS / "training_free" / f"{name}.py")).model

    assert model("sclip_vit-b16_voc21")["bg_threshold"] == 0.1
    assert model("sclip_vit-b16_voc21")["logit_scale"] == 65.0
    assert model("clearclip_vit-b16_voc21")["bg_threshold"] == 0.5
    assert model("naclip_vit-b16_voc21")["window"] == (0, 0)
    assert model("sclip_vit-b16_cityscapes")["short_side"] == 560
    assert model("itaclip_vit-b16_voc21")["area_threshold"] == 0.1
    assert model("naclip_vit-b16_ade150").get("short_side") is None  # the method's default
    # mc-lan/ProxyCLIP configs/cfg_*.py: prob_thd, Resize(scale=(2048, 448)), slide_crop/slide_stride
    assert model("proxyclip_vit-b16_voc21")["bg_threshold"] == 0.2
    assert model("proxyclip_vit-b16_context60")["bg_threshold"] == 0.15
    assert model("proxyclip_vit-b16_coco_object")["bg_threshold"] == 0.25
    assert model("proxyclip_vit-b16_ade150")["short_side"] == 448
    assert model("proxyclip_vit-b16_cityscapes")["window"] == (224, 112)
    assert model("proxyclip_vit-b16_voc20").get("bg_threshold") is None
    # its own class files: VOC21's class 0 is the background words without the word "background"
    voc21 = Vocabulary.from_file(model("proxyclip_vit-b16_voc21")["classnames"])
    assert voc21.synonyms()[0][:3] == ("sky", "wall", "tree") and len(voc21) == 21


# --------------------------------------------------------------------------------------------
# The segmentor


def _build(config: Path, tiny, extra=()):
    from mmseg.registry import MODELS

    import ovdense.mm  # noqa: F401

    init_default_scope("mmseg")
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(parse_options([item for item in [*tiny, *extra] if item.startswith("model.")]))
    return cfg, MODELS.build(cfg.model)


def _sample(image_path: Path, pipeline=None):
    from mmcv.transforms import Compose

    steps = pipeline or [dict(type="LoadImageFromFile"), dict(type="PackSegInputs")]
    packed = Compose(steps)(dict(img_path=str(image_path)))
    return dict(inputs=[packed["inputs"]], data_samples=[packed["data_samples"]])


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 72 × 96 synthetic scene as PNG (lossless, so every loader sees the same pixels)."""
    from ovdense.data.synthetic import SceneConfig, render_scene

    scene = render_scene(np.random.default_rng(7), SceneConfig(size=(72, 96)))
    path = tmp_path_factory.mktemp("photo") / "scene.png"
    Image.fromarray(scene.image).save(path)
    return path


def test_cliper_without_a_dataset_background_maps_its_labels_back(tiny, photo):
    """CLIPer on a dataset without a background class (ADE-150): the segmentor's labels are CLIPer's
    ``c − 1``, its background 255 (IoUMetric's miss), and it counts the dataset's 150 classes."""
    from ovdense.heads.cliper import CliperSegmenter

    cfg, model = _build(CONFIGS / "training_free" / "cliper_vit-b16_ade150.py", tiny,
                        ["model.short_side=96", "model.bg_threshold=0.9", "model.normalize_maps=True"])
    [sample] = model.test_step(_sample(photo))
    labels = sample.pred_sem_seg.data[0].numpy()
    not_head = ("type", "backbone", "classnames", "data_preprocessor", "method", "dataset_background")
    settings = {k: v for k, v in cfg.model.items() if k not in not_head}
    vocabulary = Vocabulary.from_file(cfg.model.classnames)
    own = CliperSegmenter(model.backbone, vocabulary, **settings).predict(photo)
    assert model.num_classes == 150 and len(own.classes) == 151
    assert (own.labels == 0).any() and (own.labels > 0).any()
    np.testing.assert_array_equal(labels, np.where(own.labels == 0, 255, own.labels - 1))


@pytest.mark.parametrize("method", METHODS)
def test_predictions_equal_the_segmenter(method, tiny, photo):
    """The mm segmentor (mmseg pipeline, data preprocessor, test_step) gives ovdense.Segmenter's
    labels for the same image and settings; the windows slide (short side 96, 64/32)."""
    from mmseg.datasets.transforms import LoadAnnotations  # noqa: F401  (registers mmseg transforms)

    extra = ["model.short_side=96", "model.window=(64,32)" if method != "cliper" else "model.window=(0,0)",
             *vfm_options(method),
             # ProxyCLIP's VOC21 threshold (0.2) leaves class 0 everywhere on random weights: none here
             *(["model.bg_threshold=None"] if method in NEEDS_VFM else [])]
    cfg, model = _build(CONFIGS / "training_free" / f"{method}_vit-b16_voc21.py", tiny, extra)
    [sample] = model.test_step(_sample(photo))
    labels = sample.pred_sem_seg.data[0].numpy()

    settings = {k: v for k, v in cfg.model.items()
                if k not in ("type", "backbone", "classnames", "data_preprocessor", "method", "vfm")}
    if model.vfm is not None:  # the same VFM (its random weights), built by the segmentor
        settings["vfm"] = model.vfm
    args = cfg.model.backbone
    backbone = create_backbone(args.name, args.pretrained, cache_dir=args.cache_dir)
    vocabulary = Vocabulary.from_file(cfg.model.classnames)
    if method == "cliper":
        from ovdense.heads.cliper import CliperSegmenter

        segmenter = CliperSegmenter(backbone, vocabulary, **settings)
    else:
        segmenter = Segmenter(backbone, method, vocabulary, **settings)
    expected = segmenter.predict(photo).labels
    assert labels.shape == (72, 96)
    np.testing.assert_array_equal(labels, expected)
    if method not in ("cliptrase", "cliper"):  # its cluster vote (CLIPer: its thresholds) may leave one label
        assert len(np.unique(expected)) > 1, "a constant map would make the comparison empty"


def test_a_resizing_pipeline_and_normalised_inputs_are_refused(tiny, photo):
    _, model = _build(CONFIGS / "training_free" / "sclip_vit-b16_voc21.py", tiny)
    resized = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=(2048, 48), keep_ratio=True),
               dict(type="PackSegInputs")]
    with pytest.raises(OvdenseError, match="remove Resize"):
        model.test_step(_sample(photo, resized))
    data = model.data_preprocessor(_sample(photo))
    with pytest.raises(OvdenseError, match="uint8 RGB"):
        model.predict([data["inputs"][0].float()], data["data_samples"])
    with pytest.raises(OvdenseError, match="training-free"):
        model.loss(data["inputs"], data["data_samples"])


# --------------------------------------------------------------------------------------------
# tools/test.py on every dataset family


FAMILY_RUNS = [  # (dataset, method): every dataset and every method at least once
    ("voc21", "naclip"),
    ("context60", "clearclip"),
    ("coco_object", "sclip"),
    ("voc20", "vanilla"),
    ("context59", "maskclip"),
    ("coco_stuff", "cliptrase"),
    ("cityscapes", "itaclip"),
    ("ade150", "sclip"),
    ("context59", "proxyclip"),
]


@pytest.mark.parametrize(("dataset", "method"), FAMILY_RUNS)
def test_tools_test_miou_equals_an_independent_computation(dataset, method, tiny, data, tmp_path):
    config = CONFIGS / "training_free" / f"{method}_vit-b16_{dataset}.py"
    out = tmp_path / "predictions"
    metrics = test_tool.evaluate([
        str(config), "--work-dir", str(tmp_path / "work"), "--out", str(out),
        "--cfg-options", *tiny, f"test_dataloader.dataset.data_root={data[dataset]}",
        "model.short_side=96", "model.window=(64,32)", *vfm_options(method),
    ])
    expected = independent_scores(dataset, data[dataset], out)
    assert {k: round(float(metrics[k]), 2) for k in expected} == expected


def test_benchmark_table_measures_what_tools_test_measures(tiny, data, tmp_path):
    """tools/benchmarks/table.py on the synthetic benchmarks: the cell it runs holds the mIoU that
    tools/test.py gives for the same config and options; the cells it did not run are marked
    and their commands listed; the results file lets the table be rewritten without running."""
    table_tool = load_tool("benchmarks/table")
    root = data["voc21"].parents[2]  # <root>/data/VOCdevkit/VOC2012
    options = [*tiny, "model.short_side=96", "model.window=(64,32)"]
    results = tmp_path / "results.json"
    argv = ["--data-root-prefix", str(root), "--classnames-dir", str(root / "classnames"),
            "--results", str(results), "--work-dir", str(tmp_path / "work"),
            "--out", str(tmp_path / "table.md"), "--cfg-options", *options]
    assert table_tool.main(["--methods", "sclip", "--datasets", "voc21", *argv]) == 0
    expected = test_tool.evaluate([
        str(CONFIGS / "training_free" / "sclip_vit-b16_voc21.py"), "--work-dir", str(tmp_path / "one"),
        "--cfg-options", *options, f"test_dataloader.dataset.data_root={data['voc21']}",
        f"model.classnames={(root / 'classnames' / 'voc21.txt').resolve()}",
    ])
    row = next(line for line in (tmp_path / "table.md").read_text().splitlines()
               if line.startswith("| `sclip` |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    assert float(cells[0]) == round(float(expected["mIoU"]), 2)
    assert all(cell == table_tool.NEEDS for cell in cells[1:])
    assert "configs/training_free/sclip_vit-b16_ade150.py" in (tmp_path / "table.md").read_text()
    before = (tmp_path / "table.md").read_text()
    assert table_tool.main(["--no-run", *argv]) == 0
    assert (tmp_path / "table.md").read_text() == before


def test_show_dir_writes_overlays(tiny, data, tmp_path):
    config = CONFIGS / "training_free" / "sclip_vit-b16_ade150.py"
    show = tmp_path / "show"
    test_tool.evaluate([
        str(config), "--work-dir", str(tmp_path / "work"), "--show-dir", str(show),
        "--cfg-options", *tiny, f"test_dataloader.dataset.data_root={data['ade150']}",
        "model.short_side=64",
    ])
    assert len(list(show.rglob("*.png"))) == 3


def test_two_processes_give_the_metric_of_one(tiny, data, tmp_path):
    """torchrun with 2 processes (gloo, CPU) on 3 images — the sampler pads one — against one
    process."""
    pytest.importorskip("torch.distributed.run")
    config = CONFIGS / "training_free" / "clearclip_vit-b16_voc21.py"
    options = [*tiny, f"test_dataloader.dataset.data_root={data['voc21']}", "model.short_side=96",
               "model.window=(64,32)"]
    single = test_tool.evaluate(
        [str(config), "--work-dir", str(tmp_path / "one"), "--cfg-options", *options]
    )
    # the workers import this checkout's ovdense, whatever is installed
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tools" / "test.py"), str(config), "--launcher", "pytorch",
         "--work-dir", str(tmp_path / "two"), "--cfg-options", *options],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("metrics: ")]
    assert len(line) == 1, result.stdout[-3000:]
    distributed = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", line[0][len("metrics: "):])}
    assert single["aAcc"] > 0
    for key in ("aAcc", "mIoU", "mAcc"):  # IoUMetric rounds to 2 decimals, tools/test.py prints them
        assert distributed[key] == round(float(single[key]), 2), key


# --------------------------------------------------------------------------------------------
# Label maps beyond 255 classes (PC-459, ADE20K-847)


def test_load_annotations16_keeps_16_bit_labels(tmp_path):
    from ovdense.mm import LoadAnnotations16

    labels = np.array([[0, 300], [458, 65535]], np.uint16)
    path = tmp_path / "map.png"
    Image.fromarray(labels).save(path)
    loaded = LoadAnnotations16()(dict(seg_map_path=str(path), reduce_zero_label=False, seg_fields=[]))
    np.testing.assert_array_equal(loaded["gt_seg_map"], labels.astype(np.int64))
    reduced = LoadAnnotations16()(dict(seg_map_path=str(path), reduce_zero_label=True, seg_fields=[]))
    np.testing.assert_array_equal(reduced["gt_seg_map"], [[65535, 299], [457, 65535]])


# The tiny random ViT gives most pixels of these scenes to the names "thing 9", "thing 3",
# "thing 47" and "thing 67" (which class a name wins does not depend on its index); the class
# file moves those names onto labels of the ground truth (0, 30, 195, 240, 390, 405, 420 are
# there), so that predictions and truth meet, and with ``above_255`` one of them onto 390.
SWAPS = {False: ((0, 9), (240, 3), (30, 47), (195, 67)), True: ((0, 9), (390, 3), (30, 47), (195, 67))}


@pytest.mark.parametrize("above_255", [False, True])
def test_context459_scores_equal_an_independent_confusion_matrix(tiny, data, tmp_path, above_255):
    """The PC-459 base with a method: class names from the data root's file, 16-bit maps with
    labels above 255, 65535 ignored. The mIoU and pixel accuracy tools/test.py reports equal a
    459 × 459 confusion matrix built here from the predictions it saved (``--out``) and the
    ground-truth files: IoU = TP / (TP + FP + FN) over the classes present in either, mean in %.
    With ``above_255`` a predicted 390 must survive in the saved file (``IoUMetric16``: 16-bit PNGs;
    mmseg's ``IoUMetric`` wrote it modulo 256)."""
    root = tmp_path / "VOC2010"
    shutil.copytree(data["context60"] / "JPEGImages", root / "JPEGImages")
    shutil.copytree(data["context60"] / "ImageSets", root / "ImageSets")
    for path in (data["context60"] / "SegmentationClassContext").glob("*.png"):
        labels = np.array(Image.open(path)).astype(np.int64)
        full = np.where(labels == 255, 65535, labels * 15).astype(np.uint16)  # up to 450
        (root / "SegmentationClassContext459").mkdir(exist_ok=True)
        Image.fromarray(full).save(root / "SegmentationClassContext459" / path.name)
    order = list(range(459))
    for a, b in SWAPS[above_255]:
        order[a], order[b] = order[b], order[a]
    names = root / "pc459_classnames.txt"
    names.write_text("".join(f"thing {i}\n" for i in order))
    out = tmp_path / "predictions"
    metrics = test_tool.evaluate([
        str(CONFIGS / "_base_" / "datasets" / "context459.py"), "--work-dir", str(tmp_path / "work"),
        "--out", str(out), "--cfg-options", *tiny, "model.method=sclip", f"model.classnames={names}",
        f"test_dataloader.dataset.classnames={names}", f"test_dataloader.dataset.data_root={root}",
        "model.short_side=64",
    ])
    ids = (root / "ImageSets" / "SegmentationContext" / "val.txt").read_text().split()
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    matrix = np.zeros((459, 459), np.int64)  # truth × prediction
    for image_id in ids:
        truth = np.array(Image.open(root / "SegmentationClassContext459" / f"{image_id}.png"))
        truth = truth.astype(np.int64)
        prediction = np.array(Image.open(out / f"{image_id}.png")).astype(np.int64)
        assert prediction.shape == truth.shape and prediction.max() < 459
        keep = truth != 65535
        matrix += np.bincount(459 * truth[keep] + prediction[keep], minlength=459 * 459).reshape(459, 459)
    assert matrix[256:].sum() > 0  # ground truth above 255 is scored
    if above_255:
        assert matrix[:, 256:].sum() > 0, "no saved prediction above 255"
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    miou = 100 * np.mean(tp[union > 0] / union[union > 0])
    aacc = 100 * tp.sum() / matrix.sum()
    assert 0 < aacc < 100 and 0 < miou < 100  # neither all right nor all wrong
    reported = (round(float(metrics["mIoU"]), 2), round(float(metrics["aAcc"]), 2))
    assert reported == (round(miou, 2), round(aacc, 2))
