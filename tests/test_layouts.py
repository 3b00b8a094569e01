"""Each synthetic dataset layout, read back by a plain reader written here."""

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ovdense.data.layouts import hash_split, write_dataset
from ovdense.data.synthetic import DEFECTS, SHAPES, SceneConfig, colour_shape_classes, render_scene
from ovdense.io import palette


def read(path):
    with Image.open(path) as pil:
        return pil.mode, np.asarray(pil)


def scene_at(seed, split, index, size=(48, 48)):
    return render_scene(np.random.default_rng([seed, hash_split(split), index]), SceneConfig(size=size))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


def test_ade20k(root):
    top = write_dataset("ade20k", root, num=3, seed=5, size=48)
    assert top.name == "ADEChallengeData2016"
    images = sorted(p.name for p in (top / "images" / "training").iterdir())
    assert images == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg", "ADE_train_00000003.jpg"]
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for index in range(3):
            mode, labels = read(top / "annotations" / split / f"{prefix}_{index + 1:08d}.png")
            assert mode == "L"
            np.testing.assert_array_equal(labels, scene_at(5, split, index).colour_shape)
    rows = (top / "objectInfo150.txt").read_text().splitlines()
    assert rows[0].split("\t") == ["Idx", "Ratio", "Train", "Val", "Name"]
    assert [r.split("\t")[-1] for r in rows[1:]] == colour_shape_classes()[1:]


def test_voc(root):
    top = write_dataset("voc", root, num=2, seed=1, size=48)
    assert top.parts[-2:] == ("VOCdevkit", "VOC2012")
    for split in ("train", "val"):
        ids = (top / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert len(ids) == 2 and all(re.fullmatch(r"20\d\d_\d{6}", i) for i in ids)
        for index, image_id in enumerate(ids):
            assert (top / "JPEGImages" / f"{image_id}.jpg").is_file()
            with Image.open(top / "SegmentationClass" / f"{image_id}.png") as pil:
                assert pil.mode == "P"
                np.testing.assert_array_equal(np.array(pil.getpalette()).reshape(-1, 3)[:21], palette(21))
                labels = np.asarray(pil)
            truth = scene_at(1, split, index).colour_shape
            known = labels != 255
            np.testing.assert_array_equal(labels[known], truth[known])
            assert 0 < (~known).mean() < 0.5  # the void band exists and is thin
            edges = np.zeros_like(known)
            edges[:, 1:] |= truth[:, 1:] != truth[:, :-1]
            assert not known[edges].any()  # every class boundary lies in the band


def test_coco_stuff(root):
    top = write_dataset("coco-stuff", root, num=2, seed=2, size=48)
    names = sorted(p.name for p in (top / "annotations" / "val2017").iterdir())
    assert names == ["000000500001_labelTrainIds.png", "000000500002_labelTrainIds.png"]
    _, labels = read(top / "annotations" / "train2017" / "000000000001_labelTrainIds.png")
    np.testing.assert_array_equal(labels, scene_at(2, "train2017", 0).colour_shape)
    assert (top / "images" / "train2017" / "000000000001.jpg").is_file()


def test_coco_instances_decode_with_pycocotools(root):
    top = write_dataset("coco-instances", root, num=3, seed=3, size=48)
    coco = COCO(str(top / "annotations" / "instances_val2017.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == colour_shape_classes()[1:]
    for index, image_id in enumerate(sorted(coco.getImgIds())):
        info = coco.loadImgs(image_id)[0]
        assert (top / "val2017" / info["file_name"]).is_file()
        scene = scene_at(3, "val2017", index)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(scene.objects)
        for k, (ann, obj) in enumerate(zip(anns, scene.objects), start=1):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), scene.instance == k)
            assert coco.loadCats(ann["category_id"])[0]["name"] == f"{obj.colour} {obj.shape}"
            assert ann["area"] == (scene.instance == k).sum()
    json.loads((top / "annotations" / "instances_train2017.json").read_text())


def test_cityscapes(root):
    top = write_dataset("cityscapes", root, num=2, seed=4, size=32)
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        images = sorted((top / "leftImg8bit" / split / city).iterdir())
        assert [p.name for p in images] == [f"{city}_00000{i}_000019_leftImg8bit.png" for i in range(2)]
        for index, image in enumerate(images):
            stem = image.name.replace("_leftImg8bit.png", "")
            _, train_ids = read(top / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
            _, instance_ids = read(top / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
            scene = scene_at(4, split, index, size=(32, 64))
            np.testing.assert_array_equal(train_ids, scene.colour_shape)
            objects = instance_ids >= 1000
            np.testing.assert_array_equal(objects, scene.instance > 0)
            np.testing.assert_array_equal(instance_ids[objects] // 1000, train_ids[objects])
            np.testing.assert_array_equal(instance_ids[objects] % 1000 + 1, scene.instance[objects])


def test_mvtec(root):
    top = write_dataset("mvtec", root, num=2, seed=6, size=48)
    assert sorted(p.name for p in top.iterdir()) == sorted(SHAPES)
    for category in SHAPES:
        assert sorted(p.name for p in (top / category / "test").iterdir()) == sorted(["good", *DEFECTS])
        assert sorted(p.name for p in (top / category / "ground_truth").iterdir()) == sorted(DEFECTS)
        train = sorted(p.name for p in (top / category / "train" / "good").iterdir())
        assert train == ["000.png", "001.png"]
        for defect in DEFECTS:
            for image in sorted((top / category / "test" / defect).iterdir()):
                mode, mask = read(top / category / "ground_truth" / defect / f"{image.stem}_mask.png")
                assert mode == "L" and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
                _, rgb = read(image)
                assert rgb.shape == mask.shape + (3,)


def test_visa(root):
    top = write_dataset("visa", root, num=2, seed=7, size=48)
    with open(top / "split_csv" / "1cls.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"object", "split", "label", "image", "mask"}
    assert {r["object"] for r in rows} == set(SHAPES)
    for row in rows:
        assert (top / row["image"]).is_file()
        assert row["image"].startswith(f"{row['object']}/Data/Images/{row['label'].capitalize()}/")
        if row["label"] == "normal":
            assert row["mask"] == "" and row["split"] in ("train", "test")
        else:
            assert row["split"] == "test"
            _, mask = read(top / row["mask"])
            assert mask.max() > 0
    counts = {(r["split"], r["label"]) for r in rows}
    assert counts == {("train", "normal"), ("test", "normal"), ("test", "anomaly")}


def test_unknown_layout(root):
    with pytest.raises(ValueError, match="unknown layout"):
        write_dataset("kitti", root, 1, 0)
