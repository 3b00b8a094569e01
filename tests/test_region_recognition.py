"""tools/analysis/eval_region_recognition.py (``ovdense/eval/regions.py``) end to end on the synthetic
panoptic layout with the toy CLIP; the official equalities are in tests/test_clipself_official.py."""

import json

import pytest
from tool_runs import load_tool

from ovdense.data.layouts import panoptic_categories, write_dataset
from ovdense.errors import OvdenseError


@pytest.fixture(scope="module")
def panoptic(tmp_path_factory):
    return write_dataset("coco-panoptic", tmp_path_factory.mktemp("panoptic"), num=8, seed=7, size=128)


def test_the_toy_names_its_objects_from_crops_well_above_chance(panoptic, tmp_path, capsys):
    """Crops of the toy's own objects are named far above chance (1 in 30 pairs); every kind and part
    is reported, the table printed, the JSON written."""
    tool = load_tool("analysis/eval_region_recognition")
    out = tmp_path / "result.json"
    code = tool.main(["--model", "toy", "--data", str(panoptic), "--image-size", "128", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| crops |" in printed and "| boxes |" in printed and "| masks |" in printed
    result = json.loads(out.read_text())
    assert result["regions"] > 20 and result["crop_size"] == 64
    for kind in ("boxes", "masks", "crops"):
        for part in ("thing", "stuff"):
            for k in ("top1", "top5"):
                assert 0.0 <= result[kind][part][k] <= 1.0
                assert result[kind][part]["top5"] >= result[kind][part]["top1"]
    assert result["crops"]["thing"]["top1"] > 0.25  # chance: 1/30 (1/35 over all classes)


def test_bad_inputs_are_one_line_errors(panoptic, tmp_path, capsys):
    tool = load_tool("analysis/eval_region_recognition")
    assert tool.main(["--model", "toy", "--data", str(tmp_path)]) == 2
    assert "panoptic annotation file not found" in capsys.readouterr().err
    assert tool.main(["--model", "toy", "--data", str(panoptic), "--image-size", "100"]) == 2
    assert "not a multiple of the patch size" in capsys.readouterr().err
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(dict(images=[])))
    assert tool.main(["--model", "toy", "--data", str(tmp_path)]) == 2
    assert "is not a COCO panoptic file" in capsys.readouterr().err


def test_a_segment_of_an_unknown_category_is_refused(panoptic):
    from ovdense.eval import regions as rr

    annotations = panoptic / "annotations"
    categories, samples = rr.read_panoptic(annotations / "panoptic_val2017.json", panoptic / "val2017",
                                           annotations / "panoptic_val2017")
    sample = next(samples)
    sample.segments[0]["category_id"] = len(panoptic_categories()) + 9
    with pytest.raises(OvdenseError, match="which the file's categories do not list"):
        rr.prepare(sample, categories, (0.5,) * 3, (0.25,) * 3, patch=8, image_size=128, crop_size=64)
