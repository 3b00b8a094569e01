"""The embedded CLIPSelf-refined toy (``--model toy-clipself``): the toy CLIP with the image tower that
``configs/clipself/clipself_toy_synthetic.py`` (region proposals) refined, shipped as
``ovdense/assets/toy-clipself-visual.safetensors`` with its F-ViT head; and the tool that writes such a
tower (``tools/model_converters/export_visual_tower.py``).

The bars are the measurements of docs/clipself.md (100 held-out scenes) with margins for the fewer
scenes drawn here.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tool_runs import load_tool

from ovdense import create_backbone
from ovdense.backbone.model_config import TOY_CLIPSELF_VISUAL, TOY_WEIGHTS, model_defaults
from ovdense.errors import OvdenseError

pytestmark = pytest.mark.skipif(not TOY_CLIPSELF_VISUAL.is_file(),
                                reason="ovdense/assets/toy-clipself-visual.safetensors missing")


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    return create_backbone("toy-clipself", cache_dir=tmp_path_factory.mktemp("cache"))


def test_is_the_toy_with_the_shipped_image_tower(toy, refined):
    """Every ``visual.*`` tensor is the shipped file's (fp16, read here by safetensors itself), every
    other tensor the toy's; the defaults are the toy's; a head trained on it records another identity."""
    tower = load_file(str(TOY_CLIPSELF_VISUAL))
    ours, theirs = refined.model.state_dict(), toy.model.state_dict()
    assert sorted(tower) == sorted(k for k in ours if k.startswith("visual."))
    for key, value in ours.items():
        if key.startswith("visual."):
            assert value.dtype == torch.float32 and torch.equal(value, tower[key].float()), key
        else:
            assert torch.equal(value, theirs[key]), key
    moved = [k for k in tower if not torch.equal(ours[k], theirs[k])]
    assert any(".resblocks." in k for k in moved)
    assert not any(k.startswith(("visual.conv1", "visual.positional_embedding", "visual.proj"))
                   for k in moved)  # CLIPSelf trains the blocks only
    assert refined.defaults == toy.defaults == model_defaults("toy-clipself")
    assert refined.identity.startswith("toy-clipself|sha256:") and refined.identity != toy.identity


def test_its_boxes_name_objects_far_better_than_the_toys(toy, refined, tmp_path, capsys):
    """Region recognition on held-out scenes (tools/analysis/eval_region_recognition.py): the refined
    tower's pooled box tokens name the object (thing top-1) far more often than the toy's (docs: 69.9
    against 25.5 % on 100 scenes)."""
    from ovdense.data.layouts import write_dataset

    data = write_dataset("coco-panoptic", tmp_path / "panoptic", num=16, seed=7, size=128)
    tool = load_tool("analysis/eval_region_recognition")
    results = {}
    for model in ("toy", "toy-clipself"):
        out = tmp_path / f"{model}.json"
        argv = ["--model", model, "--data", str(data), "--image-size", "128", "--out", str(out)]
        assert tool.main(argv) == 0
        results[model] = json.loads(out.read_text())
    before, after = (results[m]["boxes"]["thing"]["top1"] for m in ("toy", "toy-clipself"))
    assert after > 0.55 and after > before + 0.2, (before, after)
    masks = results["toy-clipself"]["masks"]["thing"]["top1"], results["toy"]["masks"]["thing"]["top1"]
    assert masks[0] > masks[1] + 0.2, masks


def test_detect_uses_its_own_shipped_head(refined, toy, tmp_path):
    """``ovdense detect --model toy-clipself`` needs no head argument: the shipped head is the one trained
    on this tower (the toy's head is refused for it, by identity)."""
    from ovdense.heads import fvit

    path = fvit.default_head_checkpoint(refined)
    assert path is not None and path.name == "fvit-toy-clipself-head.safetensors"
    assert fvit.default_head_checkpoint(toy).name == "fvit-toy-head.safetensors"
    with pytest.raises(OvdenseError, match="trained on backbone"):
        fvit.Detector(refined, ["red circle"], head_checkpoint=fvit.default_head_checkpoint(toy))
    import numpy as np

    from ovdense.cli import main
    from ovdense.data.synthetic import SceneConfig, render_scene
    from ovdense.io import write_image

    scene = render_scene(np.random.default_rng(3), SceneConfig(size=(128, 128), objects=(2, 2)))
    write_image(tmp_path / "scene.png", scene.image)
    assert main(["detect", str(tmp_path / "scene.png"), "--model", "toy-clipself", "--classes",
                 "red circle,blue star,green square", "--out", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "scene.json").read_text())
    assert written["classes"] == ["red circle", "blue star", "green square"]


def test_a_broken_tower_file_is_one_clear_error(monkeypatch, tmp_path):
    import ovdense.backbone.clip as clip
    import ovdense.backbone.model_config as model_config

    tower = load_file(str(TOY_CLIPSELF_VISUAL))
    for name, state, match in [
        ("missing", {k: v for k, v in tower.items() if k != "visual.proj"}, "missing keys \\[visual.proj\\]"),
        ("extra", {**tower, "visual.extra": torch.zeros(1)}, "unexpected keys \\[visual.extra\\]"),
        ("shape", {**tower, "visual.proj": torch.zeros(3, 3)}, "visual.proj has shape \\(3, 3\\)"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        monkeypatch.setattr(model_config, "TOY_CLIPSELF_VISUAL", path)
        with pytest.raises(OvdenseError, match=match) as error:
            create_backbone("toy-clipself")
        assert "\n" not in str(error.value)
    monkeypatch.setattr(model_config, "TOY_CLIPSELF_VISUAL", tmp_path / "absent.safetensors")
    with pytest.raises(OvdenseError, match="toy-clipself image tower is missing"):
        clip.create_backbone("toy-clipself")


def test_export_visual_tower_keeps_the_tower_and_checks_the_text_tower(tmp_path, capsys):
    """The exporter writes exactly the source's ``visual.*`` tensors in the asked dtype, atomically,
    with the source's hash; it refuses a source whose text tower is not the reference's, and its own
    input as output."""
    import hashlib

    from safetensors import safe_open

    tool = load_tool("model_converters/export_visual_tower")
    toy = load_file(str(TOY_WEIGHTS))
    source = {k: (v + 0.25 if k.startswith("visual.transformer") else v) for k, v in toy.items()}
    save_file(source, str(tmp_path / "refined.safetensors"))
    out = tmp_path / "tower.safetensors"
    assert tool.main([str(tmp_path / "refined.safetensors"), str(out)]) == 0
    tower = load_file(str(out))
    assert sorted(tower) == sorted(k for k in source if k.startswith("visual."))
    assert all(v.dtype == torch.float16 and torch.equal(v, source[k].half()) for k, v in tower.items())
    with safe_open(str(out), "pt") as f:
        digest = hashlib.sha256((tmp_path / "refined.safetensors").read_bytes()).hexdigest()
        assert f.metadata()["source_sha256"] == digest
    assert tool.main([str(tmp_path / "refined.safetensors"), str(out), "--dtype", "float32"]) == 0
    assert all(torch.equal(v, source[k]) for k, v in load_file(str(out)).items())

    other = dict(source)
    other["token_embedding.weight"] = other["token_embedding.weight"] + 1
    save_file(other, str(tmp_path / "other_text.safetensors"))
    capsys.readouterr()
    assert tool.main([str(tmp_path / "other_text.safetensors"), str(tmp_path / "x.safetensors")]) == 2
    assert "token_embedding.weight" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert tool.main([str(tmp_path / "other_text.safetensors"), str(tmp_path / "x.safetensors"),
                      "--reference", "none"]) == 0
    assert tool.main([str(out), str(out)]) == 2
    assert "is the input" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    assert tool.main([str(tmp_path / "bad.safetensors"), str(tmp_path / "y.safetensors")]) == 2
    assert "not a readable weights file" in capsys.readouterr().err
