"""``ovdense segment`` end to end on generated images, and its answers to bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ovdense.backbone import clip as clip_module
from ovdense.cli import main


@pytest.fixture
def scene(tmp_path, rng):
    """A 48×64 two-colour image on disk."""
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, :32] = (200, 30, 30)
    rgb[:, 32:] = (30, 30, 200)
    rgb += rng.integers(0, 20, size=rgb.shape, dtype=np.uint8)
    path = tmp_path / "in" / "scene.png"
    path.parent.mkdir()
    Image.fromarray(rgb).save(path)
    return path


def run(args, tiny_config_path, tmp_path, capsys):
    argv = ["segment", *args, "--model", str(tiny_config_path), "--pretrained", "none",
            "--templates", "single", "--short-side", "32", "--window", "32", "16"]
    code = main(argv)
    return code, capsys.readouterr().err


def test_three_outputs_agree(scene, tiny_config_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, err = run([str(scene.parent), "--classes", "sky,person|man,dog", "--out", str(out),
                     "--method", "naclip", "--bg-threshold", "0.2"], tiny_config_path, tmp_path, capsys)
    assert code == 0, err
    with Image.open(out / "scene_labels.png") as pil:
        assert pil.mode == "P"
        labels = np.asarray(pil)
    with Image.open(out / "scene_overlay.jpg") as pil:
        assert pil.size[1] >= 48 and pil.size[0] == 64 + 200
    report = json.loads((out / "scene.json").read_text())
    assert labels.shape == (48, 64) == tuple(report["size"])
    assert [c["name"] for c in report["classes"]] == ["sky", "person", "dog"]
    assert report["classes"][1]["synonyms"] == ["person", "man"]
    shares = np.bincount(labels.ravel(), minlength=3) / labels.size
    np.testing.assert_allclose([c["pixel_share"] for c in report["classes"]], shares)
    settings = report["settings"]
    assert (settings["method"], settings["window"], settings["short_side"]) == ("naclip", [32, 16], 32)
    assert settings["pamr"] is True and settings["bg_threshold"] == 0.2  # naclip's default PAMR
    assert report["model"] == str(tiny_config_path) and report["pretrained"] is None


def test_unreadable_image_is_reported_and_the_rest_run(scene, tiny_config_path, tmp_path, capsys):
    (scene.parent / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "out"
    code, err = run([str(scene.parent), "--classes", "a,b", "--out", str(out)],
                    tiny_config_path, tmp_path, capsys)
    assert code == 1
    assert "broken.jpg" in err and "1 of 2 images failed" in err
    assert (out / "scene_labels.png").is_file() and not (out / "broken_labels.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--classes", " , "], "the class list is empty"),
    (["--classes", "a,b", "--method", "magic"], "unknown method 'magic'"),
    (["--classes-file", "missing.txt"], "class file not found"),
])
def test_bad_input_gives_one_line_and_exit_2(scene, tiny_config_path, tmp_path, capsys, args, message):
    code, err = run([str(scene), *args, "--out", str(tmp_path / "o")], tiny_config_path, tmp_path, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_model_and_missing_weights(scene, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(clip_module, "_online", lambda host="huggingface.co": False)
    base = ["segment", str(scene), "--classes", "a,b", "--out", str(tmp_path / "o")]
    assert main(base + ["--model", "ViT-Nope"]) == 2
    assert "unknown model 'ViT-Nope'" in capsys.readouterr().err
    assert main(base + ["--model", "ViT-B-32", "--pretrained", str(tmp_path / "w.pt")]) == 2
    assert "neither a file nor a tag" in capsys.readouterr().err
    code = main(base + ["--model", "ViT-B-32", "--pretrained", "openai"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be downloaded" in err and len(err.strip().splitlines()) == 1


def test_missing_image_and_no_overwrite(scene, tiny_config_path, tmp_path, capsys):
    code, err = run([str(tmp_path / "nope.png"), "--classes", "a,b", "--out", str(tmp_path)],
                    tiny_config_path, tmp_path, capsys)
    assert code == 1 and "image not found" in err
    previous = scene.with_name("scene_labels.png")  # an earlier result, given as an input
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(previous)
    before = previous.read_bytes()
    code, err = run([str(scene), str(previous), "--classes", "a,b", "--out", str(scene.parent)],
                    tiny_config_path, tmp_path, capsys)
    assert code == 2 and "would overwrite an input" in err
    assert previous.read_bytes() == before


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("sclip", "clearclip", "naclip", "cliptrase", "itaclip", "maskclip", "vanilla"):
        assert name in out


def test_console_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ovdense.cli", "methods"], capture_output=True, text=True)
    assert result.returncode == 0 and "clearclip" in result.stdout
