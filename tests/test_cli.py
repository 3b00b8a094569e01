"""``ovdense segment`` end to end on generated images, and its answers to bad input."""

import json
import os
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


# --------------------------------------------------------------------------------------------
# Every option checked before any model: one `ovdense: error:` line each


@pytest.fixture
def no_model(monkeypatch):
    """Make building any model fail loudly: a bad argument must be refused before that."""
    import ovdense
    from ovdense.heads import sam_clip

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(ovdense, "create_backbone", built)
    monkeypatch.setattr(sam_clip, "load_sam", built)
    monkeypatch.setattr("ovdense.backbone.vfm._build", built)


def run_cli(argv, capsys):
    """``main(argv)`` as the console script runs it (argparse's exit included): code, stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _files(tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (tmp_path / "a_file.txt").write_text("x\n")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na picture\n")
    (tmp_path / "two.txt").write_text("a {} and a {}.\n")
    (tmp_path / "noimages").mkdir()
    (tmp_path / "noimages" / "notes.txt").write_text("x")


SEGMENT_CASES = [
    (["--window", "10", "20"], "stride is larger than the crop"),
    (["--window", "-1", "5"], "crop and stride must be positive"),
    (["--window", "0", "8"], "crop and stride must be positive"),
    (["--window", "32"], "expected 2 arguments"),
    (["--short-side", "-5"], "--short-side must lie in [0"),
    (["--short-side", "abc"], "invalid int value"),
    (["--logit-scale", "0"], "--logit-scale must lie in (0"),
    (["--logit-scale", "nan"], "--logit-scale must be a finite number"),
    (["--bg-threshold", "1.5"], "--bg-threshold must lie in [0, 1]"),
    (["--area-threshold", "-0.1"], "--area-threshold must lie in [0, 1]"),
    (["--max-pixels", "0"], "--max-pixels must lie in [1"),
    (["--kernel", "cuda"], "invalid choice"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--out", "{tmp}/a_file.txt"], "is a file; give a folder"),
    (["--out", "{tmp}/a_file.txt/sub"], "a_file.txt is a file, so the folder cannot be made"),
    (["--classes-file", "{tmp}/a_folder"], "is a folder"),
    (["--classes-file", "{tmp}/latin1.txt"], "is not UTF-8 text"),
    (["--classes-file", "{tmp}/empty.txt"], "has no class names"),
    (["--classes", "a", "--classes-file", "{tmp}/a_file.txt"], "not allowed with argument"),
    (["--templates", "a photo"], "exactly one '{}'"),
    (["--templates", "{} and {}"], "exactly one '{}'"),
    (["--templates", "{tmp}/templates.txt"], "template 2 'a picture' has 0"),
    (["--templates", "{tmp}/two.txt"], "template 1 'a {} and a {}.' has 2"),
    (["--templates", "{tmp}/latin1.txt"], "is not UTF-8 text"),
    (["--templates", "{tmp}/a_folder"], "is a folder"),
    (["--templates", "{tmp}/missing.txt"], "template file not found"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--method", "sam-clip", "--window", "32", "16"], "--window: not an option of --method sam-clip"),
    (["--method", "clearclip", "--points-per-side", "4"], "--points-per-side: not an option"),
    (["--method", "sam-clip", "--points-per-side", "0"], "--points-per-side must lie in [1"),
    (["--method", "sam-clip", "--pred-iou-thresh", "2"], "--pred-iou-thresh must lie in [0, 1]"),
    (["--method", "sam-clip", "--crop-weight", "-1"], "--crop-weight must lie in [0, 1]"),
    (["--method", "sam-clip", "--clip-method", "nope"], "unknown --clip-method 'nope'"),
    (["--method", "sam-clip", "--sam-model", "vit_x"], "invalid choice"),
    (["--method", "san", "--window", "32", "16"], "--window: not an option of --method san"),
    (["--method", "san", "--logit-scale", "10"], "--logit-scale: not an option of --method san"),
    (["--method", "san", "--sam-checkpoint", "x.pth"], "--sam-checkpoint: not an option of --method san"),
    (["--method", "clearclip", "--head-checkpoint", "{tmp}/a_file.txt"], "--head-checkpoint: not an option"),
    (["--method", "san", "--head-checkpoint", "{tmp}/missing.safetensors"], "no such file"),
    (["--method", "clearclip", "--vfm", "dino_vitb8"], "--vfm: not an option of --method clearclip"),
    (["--method", "proxyclip", "--vfm", "dino_vitb32"], "invalid choice"),
    (["--method", "proxyclip", "--vfm-weights", "{tmp}/missing.pth"],
     "--vfm-weights {tmp}/missing.pth: no such file (the official weights of --vfm dino_vitb8"),
    (["--method", "proxyclip", "--vfm", "dino_vitb16"],
     "dino_vitb16 needs its weights: download dino_vitbase16_pretrain.pth (https://dl.fbaipublicfiles.com"),
]


@pytest.mark.parametrize("args, message", SEGMENT_CASES, ids=[" ".join(a) for a, _ in SEGMENT_CASES])
def test_every_bad_option_is_one_line_before_any_model(scene, tmp_path, capsys, no_model, args, message):
    _files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    vocab = [] if any(a.startswith("--classes") for a in args) else ["--classes", "a,b"]
    argv = ["segment", str(scene), *vocab, "--model", "toy", "--out", str(tmp_path / "o"), *args]
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("ovdense: error: ") and len(err.strip().splitlines()) == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_device_that_is_not_here(scene, tmp_path, capsys, no_model):
    code, err = run_cli(["segment", str(scene), "--classes", "a", "--device", "cuda", "--out", str(tmp_path)],
                        capsys)
    assert code == 2 and "no CUDA GPU is available here" in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_images(tmp_path, capsys, no_model):
    _files(tmp_path)
    code, err = run_cli(["segment", str(tmp_path / "noimages"), "--classes", "a"], capsys)
    assert code == 2 and "no images found" in err


def test_weights_that_are_a_pickle_with_code(scene, tiny_config_path, tmp_path, capsys):
    """Refused in one line that never advises ``weights_only=False``; the code never runs."""
    import pickle

    class Marker:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "code-ran"),))

    for protocol in (2, 4):
        weights = tmp_path / f"weights{protocol}.pt"
        weights.write_bytes(pickle.dumps({"visual.proj": Marker()}, protocol=protocol))
        code, err = run_cli(["segment", str(scene), "--classes", "a", "--model", str(tiny_config_path),
                             "--pretrained", str(weights), "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and err.startswith("ovdense: error: ") and len(err.strip().splitlines()) == 1, err
        assert f"weights{protocol}.pt" in err
        assert "weights_only" not in err and "safe_globals" not in err and "Traceback" not in err
        assert not (tmp_path / "code-ran").exists()


def test_a_folder_with_bombs_and_truncated_files(tmp_path, capsys):
    """The issue's folder, run as a user runs it: two valid images, a PNG whose header claims
    50,000 × 50,000 pixels, a truncated PNG and a truncated JPEG: one line per bad file, the
    valid ones written, exit code 1, no traceback and no warning."""
    import struct
    import zlib

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / name)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    (folder / "cut_png.png").write_bytes((folder / "a.png").read_bytes()[:300])
    (folder / "cut_jpeg.jpg").write_bytes((folder / "b.jpg").read_bytes()[:400])
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", OVDENSE_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "ovdense.cli", "segment", str(folder), "--classes", "a,b",
                             "--model", "toy", "--method", "maskclip", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("ovdense:")]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
    skipped = [line for line in lines if line.startswith("ovdense: skipped:")]
    assert len(skipped) == 3
    bomb = "bomb.png is 50000×50000 = 2500.0 megapixels, over the limit of 100 megapixels"
    assert any(bomb in line for line in skipped)
    assert any("cut_png.png" in s for s in skipped) and any("cut_jpeg.jpg" in s for s in skipped)
    assert "3 of 5 images failed" in result.stderr and "wrote 2 results" in result.stdout
    assert sorted(p.name for p in out.glob("*.json")) == ["a.json", "b.json"]
    with capsys.disabled():
        print("\n" + result.stdout.strip() + "\n" + "\n".join(lines))


def test_max_pixels_option(scene, tiny_config_path, tmp_path, capsys):
    code, err = run([str(scene), "--classes", "a,b", "--out", str(tmp_path / "o"), "--max-pixels", "3000"],
                    tiny_config_path, tmp_path, capsys)
    assert code == 1 and "scene.png is 64×48 = 0.0 megapixels, over the limit of 0.003 megapixels" in err
    code, err = run([str(scene), "--classes", "a,b", "--out", str(tmp_path / "o"), "--max-pixels", "3072"],
                    tiny_config_path, tmp_path, capsys)
    assert code == 0, err


def test_help_and_methods_import_no_torch():
    """``ovdense --help`` and ``ovdense methods`` stay fast: no torch, numpy, PIL or open_clip."""
    code = ("import sys, contextlib, io\n"
            "from ovdense.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['methods']) == 0\n"
            "    for argv in (['--help'], ['segment', '--help'], ['anomaly', '--help']):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'open_clip', 'mmcv') if m in sys.modules)\n"
            "print(heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_san_with_the_shipped_toy_head_writes_the_three_outputs(tmp_path, capsys, monkeypatch):
    """``--method san --model toy`` needs no checkpoint flag (the head ships with ovdense); its
    labels are SanSegmenter's, and a head for another backbone is one line."""
    from ovdense import create_backbone
    from ovdense.heads.san import SanSegmenter

    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    scene = tmp_path / "in" / "toy.png"
    scene.parent.mkdir()
    from ovdense.data.synthetic import SceneConfig, render_scene

    rgb = render_scene(3, SceneConfig(size=(96, 112))).image
    Image.fromarray(rgb).save(scene)
    classes = "background,red circle,green square,blue triangle"
    out = tmp_path / "out"
    code, err = run_cli(["segment", str(scene), "--model", "toy", "--method", "san", "--classes", classes,
                         "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "toy.json").read_text())
    assert report["settings"]["method"] == "san"
    assert report["settings"]["head_checkpoint"].endswith("san-toy-head.safetensors")
    with Image.open(out / "toy_labels.png") as pil:
        labels = np.asarray(pil)
    backbone = create_backbone("toy", cache_dir=tmp_path / "cache")
    want = SanSegmenter(backbone, classes.split(",")).predict(str(scene)).labels
    np.testing.assert_array_equal(labels, want)
    assert (out / "toy_overlay.jpg").stat().st_size > 0

    code, err = run_cli(["segment", str(scene), "--model", "toy", "--method", "san", "--classes", classes,
                         "--head-checkpoint", str(out / "toy.json"), "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a safetensors SAN head" in err, err
