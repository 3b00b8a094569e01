"""A model config's ``"ovdense"`` entry (``ovdense.backbone.model_config``): read before any
model loads, the same entry ``create_backbone`` uses, and its ``method`` as the CLI's default."""

import json

import numpy as np
import pytest

from ovdense import OvdenseError, create_backbone
from ovdense.backbone.model_config import ASSETS, model_defaults, read_defaults
from ovdense.cli import main
from ovdense.registry import DEFAULT_HEADS, list_heads


def toy_entry() -> dict:
    return json.loads((ASSETS / "toy-clip.json").read_text())["ovdense"]


def test_toy_defaults_are_its_config_files_entry():
    entry = toy_entry()
    assert model_defaults("toy") == entry
    assert entry["method"] in list_heads("segmentation")
    assert model_defaults("ViT-B-16") == {}  # open_clip names carry none
    assert model_defaults("no/such/config.json") == {}  # loading it reports the missing file


@pytest.mark.parametrize("entry, message", [
    ({"stride": 32}, r"unknown keys \['stride'\].*known: templates, short_side, window, method"),
    ({"method": 3}, "'method' in its 'ovdense' entry must be a head's name, not 3"),
    ([1, 2], "its 'ovdense' entry must be an object, not list"),
])
def test_bad_entries_are_refused_before_and_at_load(tiny_config_path, tmp_path, entry, message):
    config = json.loads(tiny_config_path.read_text()) | {"ovdense": entry}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config))
    with pytest.raises(OvdenseError, match=message):
        read_defaults(config, path)
    with pytest.raises(OvdenseError, match=message):
        model_defaults(str(path))
    with pytest.raises(OvdenseError, match=message):
        create_backbone(str(path), cache_dir=tmp_path / "cache")


def run_segment(image, out, *model):
    code = main(["segment", str(image), "--classes", "background,red circle,blue square", *model,
                 "--short-side", "64", "--out", str(out)])
    assert code == 0
    return json.loads((out / f"{image.stem}.json").read_text())


def test_segment_without_method_uses_the_models_own(tiny_config_path, tmp_path):
    """No ``--method``: the toy model's (its config file's entry), recorded in the report and giving
    that head's labels; a config without one: the registry's default."""
    from PIL import Image

    from ovdense import create_head

    rng = np.random.default_rng(0)
    image = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    own = toy_entry()["method"]
    report = run_segment(image, tmp_path / "toy", "--model", "toy")
    assert report["method"] == own
    toy = create_backbone("toy", cache_dir=tmp_path / "cache")
    head = create_head(own, toy, ["background", "red circle", "blue square"], short_side=64)
    want = head.predict(str(image))
    with Image.open(tmp_path / "toy" / "scene_labels.png") as got:
        np.testing.assert_array_equal(np.asarray(got), want.labels)
    report = run_segment(image, tmp_path / "tiny", "--model", str(tiny_config_path))
    assert report["method"] == DEFAULT_HEADS["segmentation"]
