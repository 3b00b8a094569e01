"""tools/data/dataset_converters: COCO-Object, COCO-Stuff-171 and PASCAL Context label maps, checked
against the synthetic scenes' own labels and against hand-made inputs (no mmseg needed)."""

from pathlib import Path

import numpy as np
from PIL import Image
from tool_runs import load_tool

from ovdense.data.layouts import hash_split, write_dataset
from ovdense.data.synthetic import SceneConfig, render_scene

ROOT = Path(__file__).resolve().parents[1]


def test_coco_object_maps_equal_the_scenes_labels(tmp_path):
    """Instances (RLE) → label maps: every pixel is its object's class, 0 elsewhere; images
    are linked into images/val2017."""
    coco = write_dataset("coco-instances", tmp_path, 3, seed=4, size=48)
    converter = load_tool("data/dataset_converters/coco_object")
    assert converter.main([str(coco), "--out", str(tmp_path / "object")]) == 0
    for index in range(3):  # the writer's scenes, drawn again from the same seeds
        rng = np.random.default_rng([4, hash_split("val2017"), index])
        scene = render_scene(rng, SceneConfig(size=(48, 48)))
        stem = f"{index + 1 + 500000:012d}"
        path = tmp_path / "object" / "annotations" / "val2017" / f"{stem}_instanceTrainIds.png"
        labels = np.array(Image.open(path))
        np.testing.assert_array_equal(labels, scene.colour_shape)
        assert (tmp_path / "object" / "images" / "val2017" / f"{stem}.jpg").is_file()


def test_coco_object_later_annotations_paint_over_earlier_and_crowds_are_left_out():
    converter = load_tool("data/dataset_converters/coco_object")
    square = np.zeros((4, 4), bool)
    square[:2, :2] = True
    wide = np.zeros((4, 4), bool)
    wide[:2, :] = True
    from ovdense.data import rle

    instances = {
        "categories": [{"id": 90, "name": "b"}, {"id": 3, "name": "a"}],
        "images": [{"id": 1, "height": 4, "width": 4, "file_name": "1.jpg"}],
        "annotations": [
            {"image_id": 1, "category_id": 3, "segmentation": rle.encode(wide), "iscrowd": 0},
            {"image_id": 1, "category_id": 90, "segmentation": rle.encode(square), "iscrowd": 0},
            {"image_id": 1, "category_id": 3, "segmentation": rle.encode(~wide), "iscrowd": 1},
        ],
    }
    [(_, labels)] = list(converter.label_maps(instances))
    expected = np.zeros((4, 4), np.uint8)
    expected[:2, :] = 1  # category 3 is the first id
    expected[:2, :2] = 2
    np.testing.assert_array_equal(labels, expected)
    [(_, with_crowd)] = list(converter.label_maps(instances, include_crowd=True))
    assert (with_crowd[2:] == 1).all()


def test_coco_stuff_train_ids(tmp_path):
    """The 11 never-annotated COCO ids are dropped: 0..10 stay, 12 → 11, 91 → 80, 181 → 170;
    unlabelled (255) and the dropped ids are ignored."""
    converter = load_tool("data/dataset_converters/coco_stuff")
    table = converter.train_id_table()
    assert [table[v] for v in (0, 10, 12, 26, 30, 45, 66, 69, 71, 83, 91, 92, 181)] == [
        0, 10, 11, 24, 26, 40, 60, 61, 62, 73, 80, 81, 170]
    assert all(table[v] == 255 for v in (11, 25, 90, 182, 254, 255))
    assert len(set(table[:182].tolist()) - {255}) == 171
    folder = tmp_path / "annotations" / "val2017"
    folder.mkdir(parents=True)
    Image.fromarray(np.array([[0, 12], [255, 181]], np.uint8)).save(folder / "000000000001.png")
    assert converter.main([str(tmp_path)]) == 0
    out = np.array(Image.open(folder / "000000000001_labelTrainIds.png"))
    np.testing.assert_array_equal(out, [[0, 11], [255, 170]])


def test_pascal_context_maps_and_splits(tmp_path):
    """459-class .mat label maps → Context-60 (by name, in mmseg's order; the rest background)
    and, with --full, 16-bit 459-class maps (id − 1, 65535 unlabelled) and the class names."""
    from scipy.io import savemat

    converter = load_tool("data/dataset_converters/pascal_context")
    names = sorted(set(converter.CONTEXT59) | {"accordion", "zebra crossing", "air conditioner"})
    context = tmp_path / "context"
    context.mkdir()
    (context / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(names, start=1)))
    id_of = {n: i for i, n in enumerate(names, start=1)}
    label_map = np.array([[0, id_of["aeroplane"], id_of["accordion"]],
                          [id_of["wood"], id_of["person"], id_of["zebra crossing"]]], np.uint16)
    (context / "trainval").mkdir()
    savemat(context / "trainval" / "2008_000001.mat", {"LabelMap": label_map})
    savemat(context / "trainval" / "2008_000002.mat", {"LabelMap": label_map})
    voc = tmp_path / "VOC2010"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n2008_000003\n")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000002\n")
    assert converter.main([str(voc), str(context), "--full"]) == 0

    sixty = np.array(Image.open(voc / "SegmentationClassContext" / "2008_000001.png"))
    person = converter.CONTEXT59.index("person") + 1
    np.testing.assert_array_equal(sixty, [[0, 1, 0], [59, person, 0]])
    full = np.array(Image.open(voc / "SegmentationClassContext459" / "2008_000001.png"))
    np.testing.assert_array_equal(full, np.where(label_map == 0, 65535, label_map.astype(np.int64) - 1))
    assert (voc / "ImageSets" / "SegmentationContext" / "train.txt").read_text().split() == ["2008_000001"]
    assert (voc / "ImageSets" / "SegmentationContext" / "val.txt").read_text().split() == ["2008_000002"]
    assert (voc / "pc459_classnames.txt").read_text().splitlines() == names
