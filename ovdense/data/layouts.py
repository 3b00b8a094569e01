"""Write synthetic scenes in the on-disk layouts of the real datasets.

Each writer reproduces the folder structure, file naming and label encoding of its dataset,
so every loader in the project meets here the layout it will meet in the wild:

* ``ade20k`` — ADEChallengeData2016: ``images/{training,validation}/ADE_{train,val}_%08d.jpg``,
  ``annotations/...png`` (``L`` mode; 0 = "other", ignored under mmseg's
  ``reduce_zero_label``; class ``k`` is stored as ``k``), ``objectInfo150.txt``.
* ``voc`` — VOCdevkit/VOC2012: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNG,
  0 background, 255 = the void band around object boundaries), ``ImageSets/Segmentation``.
* ``coco-stuff`` — mmseg's converted COCO-Stuff 164k:
  ``images/{train2017,val2017}/%012d.jpg``, ``annotations/.../%012d_labelTrainIds.png``.
* ``coco-instances`` — ``{train2017,val2017}/%012d.jpg`` and
  ``annotations/instances_{split}.json`` with compressed-RLE segmentations.
* ``coco-panoptic`` — ``{train2017,val2017}/%012d.jpg``, ``annotations/panoptic_{split}.json``
  (``segments_info`` per image) and ``annotations/panoptic_{split}/%012d.png`` (RGB segment ids,
  ``id = R + 256·G + 256²·B``): the 30 colour–shape pairs are things, the backgrounds
  (``"<texture> background"``) stuff.
* ``cityscapes`` — ``leftImg8bit/{train,val}/<city>/<city>_%06d_%06d_leftImg8bit.png`` and
  ``gtFine/.../*_gtFine_{labelTrainIds,instanceIds,color}.png`` (255 = ignore; instance ids
  are ``class · 1000 + index``).
* ``mvtec`` — MVTec AD: ``<category>/train/good/%03d.png``, ``<category>/test/{good,<defect>}``,
  ``<category>/ground_truth/<defect>/%03d_mask.png`` (0/255).
* ``visa`` — VisA: ``<category>/Data/Images/{Normal,Anomaly}/*.JPG``,
  ``<category>/Data/Masks/Anomaly/*.png`` (defect pixels > 0, one value per region) and
  ``split_csv/1cls.csv`` (``object,split,label,image,mask``).

Semantic classes are the world's colour–shape pairs (``synthetic.colour_shape_classes``);
the anomaly categories are the shapes, each in one colour.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from ovdense.data import rle
from ovdense.data.synthetic import (
    DEFECTS,
    SHAPES,
    TEXTURES,
    Scene,
    SceneConfig,
    colour_shape_classes,
    render_scene,
)
from ovdense.io import palette, write_bytes, write_image, write_json

LAYOUTS = ("ade20k", "voc", "coco-stuff", "coco-instances", "coco-panoptic", "cityscapes", "mvtec", "visa")
IGNORE = 255
ANOMALY_COLOUR = dict(zip(SHAPES, ["red", "blue", "green", "orange", "purple"]))


def write_dataset(layout: str, root: str | Path, num: int, seed: int, size: int = 128) -> Path:
    """Write ``num`` scenes per split (per category and state for anomaly layouts) under
    ``root``; return the dataset's top folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; layouts are {', '.join(LAYOUTS)}")
    if num <= 0:
        raise ValueError("num must be positive")
    writer: Callable[..., Path] = globals()["_write_" + layout.replace("-", "_")]
    return writer(Path(root), num, seed, size)


def _scenes(num: int, seed: int, split: str, config: SceneConfig) -> Iterator[Scene]:
    for index in tqdm(range(num), desc=f"{split}", unit="scene", leave=False):
        yield render_scene(np.random.default_rng([seed, hash_split(split), index]), config)


def hash_split(split: str) -> int:
    """A stable integer per split name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(split.encode("utf-8")[:8].ljust(8, b"\0"), "little")


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _palette_png(labels: np.ndarray) -> bytes:
    pil = Image.fromarray(labels.astype(np.uint8), mode="P")
    pil.putpalette(palette().reshape(-1).tolist())
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def boundary_band(instance: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within ``width`` of a boundary between different instance ids (VOC's void)."""
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    ids = instance.astype(np.int32)
    grown = cv2.dilate(ids.astype(np.float32), kernel)
    shrunk = cv2.erode(ids.astype(np.float32), kernel)
    return grown != shrunk


# --------------------------------------------------------------------------------------------
# Semantic layouts


def _write_ade20k(root: Path, num: int, seed: int, size: int) -> Path:
    top = root / "ADEChallengeData2016"
    config = SceneConfig(size=(size, size))
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for index, scene in enumerate(_scenes(num, seed, split, config), start=1):
            name = f"{prefix}_{index:08d}"
            write_image(top / "images" / split / f"{name}.jpg", scene.image)
            write_bytes(top / "annotations" / split / f"{name}.png",
                        _png(scene.colour_shape.astype(np.uint8), "L"))
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    lines += [f"{i}\t0\t0\t0\t{name}" for i, name in enumerate(colour_shape_classes()[1:], start=1)]
    write_bytes(top / "objectInfo150.txt", ("\n".join(lines) + "\n").encode())
    return top


def _write_voc(root: Path, num: int, seed: int, size: int) -> Path:
    top = root / "VOCdevkit" / "VOC2012"
    config = SceneConfig(size=(size, size))
    for split, year in (("train", 2007), ("val", 2008)):
        ids = []
        for index, scene in enumerate(_scenes(num, seed, split, config)):
            image_id = f"{year}_{index:06d}"
            ids.append(image_id)
            labels = scene.colour_shape.copy()
            labels[boundary_band(scene.instance)] = IGNORE
            write_image(top / "JPEGImages" / f"{image_id}.jpg", scene.image)
            write_bytes(top / "SegmentationClass" / f"{image_id}.png", _palette_png(labels))
        write_bytes(top / "ImageSets" / "Segmentation" / f"{split}.txt", ("\n".join(ids) + "\n").encode())
    return top


def _write_coco_stuff(root: Path, num: int, seed: int, size: int) -> Path:
    top = root / "coco_stuff164k"
    config = SceneConfig(size=(size, size))
    for split in ("train2017", "val2017"):
        for index, scene in enumerate(_scenes(num, seed, split, config), start=1):
            name = f"{index + (0 if split == 'train2017' else 500000):012d}"
            write_image(top / "images" / split / f"{name}.jpg", scene.image)
            write_bytes(top / "annotations" / split / f"{name}_labelTrainIds.png",
                        _png(scene.colour_shape.astype(np.uint8), "L"))
    return top


def _write_coco(top: Path, kind: str, num: int, seed: int, size: int, categories: list[dict],
                annotate: Callable[[Scene, int, str], list[dict]]) -> Path:
    """COCO's common layout: ``{train2017,val2017}/%012d.jpg`` and ``annotations/{kind}_{split}.json``
    with the images, the categories and what ``annotate(scene, image_id, split)`` returns per image."""
    config = SceneConfig(size=(size, size))
    for split in ("train2017", "val2017"):
        images, annotations = [], []
        for index, scene in enumerate(_scenes(num, seed, split, config), start=1):
            image_id = index + (0 if split == "train2017" else 500000)
            file_name = f"{image_id:012d}.jpg"
            write_image(top / split / file_name, scene.image)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            annotations += annotate(scene, image_id, split)
        write_json(top / "annotations" / f"{kind}_{split}.json", {
            "info": {"description": "ovdense synthetic world", "version": "1.0"},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories,
        })
    return top


def _write_coco_instances(root: Path, num: int, seed: int, size: int) -> Path:
    names = colour_shape_classes()[1:]
    categories = [{"id": i, "name": n, "supercategory": n.split()[1]} for i, n in enumerate(names, 1)]
    annotation_ids = itertools.count(1)  # numbered across both splits

    def annotate(scene: Scene, image_id: int, split: str) -> list[dict]:
        out = []
        for obj_index, obj in enumerate(scene.objects, start=1):
            mask = scene.instance == obj_index
            encoded = rle.encode(mask)
            out.append({
                "id": next(annotation_ids), "image_id": image_id,
                "category_id": names.index(f"{obj.colour} {obj.shape}") + 1,
                "segmentation": encoded, "area": rle.area(encoded), "bbox": rle.bbox(mask),
                "iscrowd": 0,
            })
        return out

    return _write_coco(root / "coco", "instances", num, seed, size, categories, annotate)


def panoptic_categories() -> list[dict]:
    """The synthetic world's panoptic categories: the 30 colour–shape pairs (things, ids 1–30), then
    one background per texture (stuff, ids 31–35)."""
    things = [{"id": i, "name": n, "supercategory": n.split()[1], "isthing": 1}
              for i, n in enumerate(colour_shape_classes()[1:], 1)]
    stuff = [{"id": len(things) + i, "name": f"{t} background", "supercategory": "background", "isthing": 0}
             for i, t in enumerate(TEXTURES, 1)]
    return things + stuff


def _write_coco_panoptic(root: Path, num: int, seed: int, size: int) -> Path:
    top = root / "coco"
    categories = panoptic_categories()
    category_id = {c["name"]: c["id"] for c in categories}

    def annotate(scene: Scene, image_id: int, split: str) -> list[dict]:
        ids = np.zeros(scene.instance.shape, np.int64)
        segments = []
        for obj_index in range(len(scene.objects) + 1):  # 0: the background
            mask = scene.instance == obj_index
            if not mask.any():
                continue
            segment_id = 1 + 4099 * obj_index  # spread over the three channels
            ids[mask] = segment_id
            name = (f"{scene.texture} background" if obj_index == 0 else
                    f"{scene.objects[obj_index - 1].colour} {scene.objects[obj_index - 1].shape}")
            segments.append({"id": segment_id, "category_id": category_id[name], "iscrowd": 0,
                             "bbox": rle.bbox(mask), "area": int(mask.sum())})
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)
        png = f"{image_id:012d}.png"
        write_bytes(top / "annotations" / f"panoptic_{split}" / png, _png(rgb, "RGB"))
        return [{"image_id": image_id, "file_name": png, "segments_info": segments}]

    return _write_coco(top, "panoptic", num, seed, size, categories, annotate)


def _write_cityscapes(root: Path, num: int, seed: int, size: int) -> Path:
    top = root / "cityscapes"
    config = SceneConfig(size=(size, 2 * size))
    colours = palette()
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        for index, scene in enumerate(_scenes(num, seed, split, config)):
            stem = f"{city}_{index:06d}_000019"
            write_bytes(top / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _png(scene.image))
            gt = top / "gtFine" / split / city
            train_ids = scene.colour_shape.astype(np.uint8)
            write_bytes(gt / f"{stem}_gtFine_labelTrainIds.png", _png(train_ids, "L"))
            instance_ids = np.where(scene.instance > 0,
                                    scene.colour_shape * 1000 + scene.instance - 1, scene.colour_shape)
            write_bytes(gt / f"{stem}_gtFine_instanceIds.png", _png(instance_ids.astype(np.uint16)))
            write_bytes(gt / f"{stem}_gtFine_color.png", _png(colours[train_ids]))
    return top


# --------------------------------------------------------------------------------------------
# Anomaly layouts: one category per shape, single objects on plain or gradient backgrounds


def _anomaly_config(size: int, shape: str, defect: str | None) -> SceneConfig:
    return SceneConfig(size=(size, size), objects=(1, 1), radius=(0.3, 0.38),
                       defect_rate=1.0 if defect else 0.0, defects=(defect,) if defect else DEFECTS,
                       colours=(ANOMALY_COLOUR[shape],), shapes=(shape,),
                       textures=("plain", "gradient"), noise=4.0)


def _write_mvtec(root: Path, num: int, seed: int, size: int) -> Path:
    top = root / "mvtec_anomaly_detection"
    for shape in SHAPES:
        category = top / shape
        good = _anomaly_config(size, shape, None)
        for split in ("train", "test"):
            for index, scene in enumerate(_scenes(num, seed, f"{shape}/{split}", good)):
                write_bytes(category / split / "good" / f"{index:03d}.png", _png(scene.image))
        for defect in DEFECTS:
            config = _anomaly_config(size, shape, defect)
            for index, scene in enumerate(_scenes(num, seed, f"{shape}/{defect}", config)):
                write_bytes(category / "test" / defect / f"{index:03d}.png", _png(scene.image))
                mask = np.where(scene.defect, 255, 0).astype(np.uint8)
                write_bytes(category / "ground_truth" / defect / f"{index:03d}_mask.png", _png(mask, "L"))
    return top


# The toy world's anomaly domains (AdaptCLIP's cross-category protocol, issue 30): a category is a
# (shape, texture) pair, 25 in all; domain A holds the pairs with (shape index + texture index) even
# (13), domain B the rest (12), so neither domain misses a shape or a texture, and no category is in both.


def toy_anomaly_categories(domain: str | None = None) -> list[str]:
    """The toy anomaly categories ``"<shape>_<texture>"``: all 25, or those of domain ``"A"`` / ``"B"``."""
    if domain not in (None, "A", "B"):
        raise ValueError(f"domain must be 'A', 'B' or None, got {domain!r}")
    pairs = [(i, j) for i in range(len(SHAPES)) for j in range(len(TEXTURES))]
    keep = {None: (0, 1), "A": (0,), "B": (1,)}[domain]
    return [f"{SHAPES[i]}_{TEXTURES[j]}" for i, j in pairs if (i + j) % 2 in keep]


def write_toy_anomaly(root: str | Path, categories: list[str], num_train: int, num_test: int, seed: int,
                      size: int = 128, defects: tuple[str, ...] = DEFECTS) -> Path:
    """The ``categories`` (``toy_anomaly_categories``) in the MVTec AD layout under ``root``: per category
    ``num_train`` normal training images, ``num_test`` normal test images and ``num_test`` of each of
    ``defects`` with their masks. One object of the shape's colour (``ANOMALY_COLOUR``) on the texture,
    every image seeded by (``seed``, category, split, index). Returns ``root``."""
    top = Path(root)
    for category in categories:
        shape, texture = category.split("_", 1)
        if shape not in SHAPES or texture not in TEXTURES:
            raise ValueError(f"{category!r} is not a toy anomaly category (<shape>_<texture>)")

        def config(defect: str | None, shape: str = shape, texture: str = texture) -> SceneConfig:
            return SceneConfig(size=(size, size), objects=(1, 1), radius=(0.3, 0.38),
                               defect_rate=1.0 if defect else 0.0, defects=(defect,) if defect else DEFECTS,
                               colours=(ANOMALY_COLOUR[shape],), shapes=(shape,), textures=(texture,),
                               noise=4.0)

        for split, count in (("train", num_train), ("test", num_test)):
            for index, scene in enumerate(_scenes(count, seed, f"toy/{category}/{split}", config(None))):
                write_bytes(top / category / split / "good" / f"{index:03d}.png", _png(scene.image))
        for defect in defects:
            scenes = _scenes(num_test, seed, f"toy/{category}/{defect}", config(defect))
            for index, scene in enumerate(scenes):
                write_bytes(top / category / "test" / defect / f"{index:03d}.png", _png(scene.image))
                mask = np.where(scene.defect, 255, 0).astype(np.uint8)
                mask_path = top / category / "ground_truth" / defect / f"{index:03d}_mask.png"
                write_bytes(mask_path, _png(mask, "L"))
    return top


def _write_visa(root: Path, num: int, seed: int, size: int) -> Path:
    top = root / "VisA"
    rows = [("object", "split", "label", "image", "mask")]
    for shape in SHAPES:
        images = top / shape / "Data" / "Images"
        normal = 0
        for split in ("train", "test"):
            config = _anomaly_config(size, shape, None)
            for scene in _scenes(num, seed, f"{shape}/{split}/normal", config):
                relative = f"{shape}/Data/Images/Normal/{normal:04d}.JPG"
                write_image(top / relative, scene.image)
                rows.append((shape, split, "normal", relative, ""))
                normal += 1
        rng = np.random.default_rng([seed, hash_split(shape), 7])
        for index in range(num):
            defect = str(rng.choice(DEFECTS))
            scene = render_scene(np.random.default_rng([seed, hash_split(shape), 8, index]),
                                 _anomaly_config(size, shape, defect))
            relative = f"{shape}/Data/Images/Anomaly/{index:03d}.JPG"
            mask_relative = f"{shape}/Data/Masks/Anomaly/{index:03d}.png"
            write_image(images / "Anomaly" / f"{index:03d}.JPG", scene.image)
            _, regions = cv2.connectedComponents(scene.defect.astype(np.uint8))  # 1, 2, … per region
            write_bytes(top / mask_relative, _png(regions.astype(np.uint8), "L"))
            rows.append((shape, "test", "anomaly", relative, mask_relative))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_bytes(top / "split_csv" / "1cls.csv", buffer.getvalue().encode())
    return top

