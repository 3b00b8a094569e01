"""``ovdense detect`` end to end: its JSON and overlay against ``Detector.predict`` on the same image,
unreadable images, ``--skip-existing``, and one ``ovdense: error:`` line per bad option.

The head is conftest.py's ``fvit_head``: a random-init F-ViT for the toy backbone, built from
configs/ovdet/fvlm_toy_synthetic.py in plain torch (``PlainFViT``, the file ``export_head`` writes), so
every test here runs without mmcv, mmdet or mmengine; the bad-option cases need no head.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_runs import run_cli

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "ring")
ALL_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
# pycocotools 2.0 under numpy 2 (its own decode, used here as the reference)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning")


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    """A folder with one 96×128 toy scene (not square: x and y cannot be swapped unnoticed)."""
    from ovdense.data.synthetic import SceneConfig, render_scene

    folder = tmp_path_factory.mktemp("scenes")
    rgb = render_scene(np.random.default_rng([99, 7]), SceneConfig(size=(96, 128))).image
    Image.fromarray(rgb).save(folder / "scene.png")
    return folder


@pytest.fixture(scope="module")
def threshold(toy_env_cache, fvit_head, scene_dir) -> float:
    """A score threshold halfway between two of the random head's scores: some detections kept, some
    dropped, none on the boundary."""
    from ovdense.heads.fvit import Detector

    scores = np.sort(Detector(toy_env_cache, ALL_CLASSES, fvit_head, score_threshold=0.0)
                     .predict(scene_dir / "scene.png").scores)[::-1]
    assert len(scores) >= 4, scores
    middle = len(scores) // 2
    return float((scores[middle - 1] + scores[middle]) / 2)


def detect_argv(inputs, out, fvit_head, threshold, *extra):
    return ["detect", *inputs, "--model", "toy", "--head-checkpoint", fvit_head, "--classes",
            ",".join(ALL_CLASSES), "--score-threshold", repr(threshold), "--out", out, *extra]


def test_json_and_overlay_are_the_detectors_prediction(toy_env_cache, fvit_head, scene_dir, threshold,
                                                        tmp_path, capsys):
    from pycocotools import mask as mask_utils

    from ovdense.heads.fvit import Detector

    out = tmp_path / "out"
    code, stdout, err = run_cli(detect_argv([scene_dir / "scene.png"], out, fvit_head, threshold), capsys)
    assert code == 0, err
    assert f"wrote 1 result to {out}" in stdout
    report = json.loads((out / "scene.json").read_text())
    assert set(report) == {"classes", "detections"} and report["classes"] == ALL_CLASSES

    detector = Detector(toy_env_cache, ALL_CLASSES, fvit_head, score_threshold=threshold)
    want = detector.predict(str(scene_dir / "scene.png"))
    assert 0 < len(want.scores) == len(report["detections"])
    assert want.masks is not None and want.masks.shape[1:] == (96, 128)
    for k, found in enumerate(report["detections"]):
        assert set(found) == {"bbox", "category_id", "class", "score", "segmentation"}
        x1, y1, x2, y2 = want.boxes[k]
        np.testing.assert_allclose(found["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
        assert found["category_id"] == int(want.class_ids[k])
        assert found["class"] == ALL_CLASSES[int(want.class_ids[k])]
        assert found["score"] == pytest.approx(float(want.scores[k]), abs=1e-6)
        assert found["score"] >= threshold
        rle = found["segmentation"]
        assert rle["size"] == [96, 128]
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        np.testing.assert_array_equal(decoded.astype(bool), want.masks[k])
        coco = mask_utils.encode(np.asfortranarray(want.masks[k].astype(np.uint8)))
        assert rle["counts"] == coco["counts"].decode("ascii")  # the same string pycocotools writes
    with Image.open(out / "scene_overlay.jpg") as pil:
        assert pil.format == "JPEG" and pil.size == (128, 96)
        drawn = np.asarray(pil.convert("RGB"))
    original = np.asarray(Image.open(scene_dir / "scene.png").convert("RGB"))
    assert np.abs(drawn.astype(int) - original).max() > 100  # boxes and labels are drawn
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())  # written atomically


def test_detect_runs_without_openmmlab(fvit_head, scene_dir, threshold, tmp_path, capsys, env_cache):
    """mmcv, mmdet and mmengine unimportable (a fresh interpreter): the same JSON as in-process."""
    argv = [str(a) for a in detect_argv([scene_dir / "scene.png"], tmp_path / "plain", fvit_head, threshold)]
    code = ("import sys\n"
            "for name in ('mmcv', 'mmdet', 'mmengine'):\n"
            "    sys.modules[name] = None  # import fails\n"
            "from ovdense.cli import main\n"
            f"code = main({argv!r})\n"
            "assert not any(m.split('.')[0] in ('mmcv', 'mmdet', 'mmengine') and sys.modules[m] is not None\n"
            "               for m in sys.modules)\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert done.returncode == 0, done.stderr[-2000:]
    here = detect_argv([scene_dir / "scene.png"], tmp_path / "here", fvit_head, threshold)
    run_code, _, err = run_cli(here, capsys)
    assert run_code == 0, err
    plain = json.loads((tmp_path / "plain" / "scene.json").read_text())
    ours = json.loads((tmp_path / "here" / "scene.json").read_text())
    # another process (and thread count) may round the last float bits differently: same detections,
    # boxes and scores to float tolerance, masks equal but for a pixel at a threshold
    assert plain["classes"] == ours["classes"] and len(plain["detections"]) == len(ours["detections"]) > 0
    from pycocotools import mask as mask_utils

    def decoded(entry):
        return mask_utils.decode({"size": entry["segmentation"]["size"],
                                  "counts": entry["segmentation"]["counts"].encode()}).astype(bool)

    for a, b in zip(plain["detections"], ours["detections"]):
        assert (a["category_id"], a["class"]) == (b["category_id"], b["class"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-2)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert (decoded(a) != decoded(b)).mean() < 1e-3


def test_no_ensemble_gives_the_detectors_own_scores(toy_env_cache, fvit_head, scene_dir, tmp_path, capsys):
    from ovdense.heads.fvit import Detector

    out = tmp_path / "out"
    code, _, err = run_cli(detect_argv([scene_dir / "scene.png"], out, fvit_head, 0.0, "--no-ensemble",
                                       "--image-size", "64"), capsys)
    assert code == 0, err
    got = json.loads((out / "scene.json").read_text())["detections"]
    want = Detector(toy_env_cache, ALL_CLASSES, fvit_head, score_threshold=0.0, image_size=64,
                    ensemble=False).predict(str(scene_dir / "scene.png"))
    with_ensemble = Detector(toy_env_cache, ALL_CLASSES, fvit_head, score_threshold=0.0,
                             image_size=64).predict(str(scene_dir / "scene.png"))
    np.testing.assert_allclose([d["score"] for d in got], want.scores, atol=1e-6)
    assert len(want.scores) != len(with_ensemble.scores) or not np.allclose(want.scores, with_ensemble.scores)
    full_size = Detector(toy_env_cache, ALL_CLASSES, fvit_head, score_threshold=0.0,
                         ensemble=False).predict(str(scene_dir / "scene.png"))  # the default image size
    assert len(want.scores) != len(full_size.scores) or not np.allclose(want.scores, full_size.scores)


def test_unreadable_image_is_skipped_and_skip_existing_resumes(fvit_head, scene_dir, threshold, tmp_path,
                                                               capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "scene.png").write_bytes((scene_dir / "scene.png").read_bytes())
    (folder / "broken.jpg").write_text("not a jpeg")
    (folder / "again.png").write_bytes((scene_dir / "scene.png").read_bytes())
    out = tmp_path / "out"
    code, _, err = run_cli(detect_argv([folder], out, fvit_head, threshold), capsys)
    assert code == 1
    skipped = [line for line in err.splitlines() if line.startswith("ovdense: skipped:")]
    assert len(skipped) == 1 and "broken.jpg" in skipped[0], err
    assert "1 of 3 images failed" in err and "Traceback" not in err
    assert (out / "scene.json").is_file() and (out / "again_overlay.jpg").is_file()
    assert not (out / "broken.json").exists()

    # resume: 'scene' is complete; 'again' lost its JSON (an interrupted run); 'broken' still fails
    (out / "again.json").unlink()
    written = (out / "scene.json").stat().st_mtime_ns
    code, stdout, err = run_cli(detect_argv([folder], out, fvit_head, threshold, "--skip-existing"), capsys)
    assert code == 1 and "1 of 3 images failed" in err
    assert "wrote 1 result" in stdout and "skipped 1 of 3 images whose outputs exist" in stdout
    assert (out / "scene.json").stat().st_mtime_ns == written
    assert json.loads((out / "again.json").read_text()) == json.loads((out / "scene.json").read_text())


def test_skip_existing_needs_no_model_and_ignores_segment_outputs(scene_dir, tmp_path, capsys, no_model):
    """All done: nothing is built. A ``segment`` JSON of the same stem is not a detection result."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "scene_overlay.jpg").write_bytes(b"x")
    (out / "scene.json").write_text(json.dumps({"classes": ["a"], "detections": []}))
    argv = ["detect", scene_dir / "scene.png", "--model", "toy", "--classes", "a", "--out", out,
            "--skip-existing"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0 and "skipped 1 of 1 images whose outputs exist" in stdout, err
    (out / "scene.json").write_text(json.dumps({"image": "scene.png", "classes": [{"name": "a"}]}))
    with pytest.raises(AssertionError, match="a model was built"):  # not complete: it computes again
        run_cli(argv, capsys)


def test_a_pickle_as_head_checkpoint_is_one_line_and_never_runs(scene_dir, tmp_path, capsys, env_cache):
    class Marker:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "code-ran"),))

    bad = tmp_path / "head.safetensors"
    bad.write_bytes(pickle.dumps({"w": Marker()}))
    code, _, err = run_cli(["detect", scene_dir / "scene.png", "--model", "toy", "--classes", "red circle",
                            "--head-checkpoint", bad, "--out", tmp_path / "o"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a safetensors" in err, err
    assert not (tmp_path / "code-ran").exists()


def test_a_head_of_another_backbone_is_one_line(fvit_head, scene_dir, tmp_path, capsys, tiny_config_path):
    code, _, err = run_cli(["detect", scene_dir / "scene.png", "--model", tiny_config_path, "--classes",
                            "a,b", "--head-checkpoint", fvit_head, "--out", tmp_path / "o"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trained on backbone" in err, err


@pytest.mark.parametrize("shipped", [True, False], ids=["head-ships", "none-ships"])
def test_toy_without_head_checkpoint_uses_the_shipped_head(toy_env_cache, fvit_head, scene_dir, tmp_path,
                                                           capsys, monkeypatch, shipped):
    """No --head-checkpoint: the head ``default_head_checkpoint`` names (made to be ``fvit_head``
    here, whether or not this install has the trained one), or the Detector's one line."""
    from ovdense.heads import fvit

    monkeypatch.setattr(fvit, "default_head_checkpoint", lambda backbone: fvit_head if shipped else None)
    out = tmp_path / "out"
    code, _, err = run_cli(["detect", scene_dir / "scene.png", "--model", "toy", "--classes",
                            "red circle,blue star", "--score-threshold", "0", "--out", out], capsys)
    if not shipped:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("ovdense: error: no F-ViT head ships for backbone 'toy'")
        assert "--head-checkpoint" in err
        return
    assert code == 0, err
    want = fvit.Detector(toy_env_cache, ["red circle", "blue star"], fvit_head, score_threshold=0.0)
    want = want.predict(str(scene_dir / "scene.png"))
    got = json.loads((out / "scene.json").read_text())["detections"]
    assert len(got) == len(want.scores) > 0
    np.testing.assert_allclose([d["score"] for d in got], want.scores, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The JSON and the picture, from a hand-made result


def test_detections_json_by_hand():
    from pycocotools import mask as mask_utils

    from ovdense.heads.fvit import DetectionResult

    masks = np.zeros((2, 5, 7), bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 0] = True
    result = DetectionResult(boxes=np.array([[2.0, 1.0, 6.0, 3.0], [0.25, 3.5, 1.0, 5.0]], np.float32),
                             scores=np.array([0.9, 0.4], np.float32), class_ids=np.array([1, 0]), masks=masks,
                             classes=["cat", "dog"])
    report = result.to_json()
    assert report["classes"] == ["cat", "dog"]
    first, second = report["detections"]
    assert first["bbox"] == [2.0, 1.0, 4.0, 2.0] and second["bbox"] == [0.25, 3.5, 0.75, 1.5]
    assert (first["category_id"], first["class"]) == (1, "dog")
    assert (second["category_id"], second["class"]) == (0, "cat")
    assert first["score"] == pytest.approx(0.9) and second["score"] == pytest.approx(0.4)
    for entry, mask in zip(report["detections"], masks):
        rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    json.dumps(report)  # plain JSON types only
    result.masks = None
    assert all("segmentation" not in d for d in result.to_json()["detections"])
    result.boxes, result.scores, result.class_ids = np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
    assert result.to_json() == {"classes": ["cat", "dog"], "detections": []}


def test_draw_detections_blends_the_mask_and_draws_the_box():
    from ovdense.heads.fvit import DetectionResult
    from ovdense.io import draw_detections, palette

    rgb = np.full((120, 160, 3), 91, np.uint8)
    masks = np.zeros((1, 120, 160), bool)
    masks[0, 50:90, 40:120] = True
    result = DetectionResult(boxes=np.array([[40.0, 50.0, 119.0, 89.0]]), scores=np.array([0.8]),
                             class_ids=np.array([2]), masks=masks, classes=["a", "b", "c"])
    drawn = draw_detections(rgb, result)
    assert drawn.shape == rgb.shape and drawn.dtype == np.uint8
    colour = palette()[3].astype(float)  # class 2 → palette index 3 (index 0 is black)
    inside = np.round(0.55 * 91 + 0.45 * colour)  # no value falls on .5
    np.testing.assert_array_equal(drawn[70, 80], inside)  # the middle of the mask, away from lines
    np.testing.assert_array_equal(drawn[110, 5], rgb[110, 5])  # far outside: untouched
    np.testing.assert_array_equal(drawn[70, 40], palette()[3])  # the box's left edge
    assert (np.abs(drawn[38:50, 40:70].astype(int) - 91).sum(axis=-1) > 0).mean() > 0.5  # the label tab
    empty = DetectionResult(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), None, ["a"])
    np.testing.assert_array_equal(draw_detections(rgb, empty), rgb)


# --------------------------------------------------------------------------------------------
# Every bad option: one `ovdense: error:` line, exit 2, before any model


@pytest.fixture
def no_model(monkeypatch):
    """Building a backbone or a detector fails loudly: a bad argument must be refused before."""
    import ovdense
    from ovdense.heads import fvit

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(ovdense, "create_backbone", built)
    monkeypatch.setattr(fvit, "Detector", built)


def _files(tmp_path: Path) -> None:
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file.txt").write_text("x\n")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    (tmp_path / "synonyms.txt").write_text("red circle\nperson, man\n")
    (tmp_path / "noimages").mkdir()
    (tmp_path / "noimages" / "notes.txt").write_text("x")


DETECT_CASES = [
    (["--score-threshold", "1.5"], "--score-threshold must lie in [0, 1], got 1.5"),
    (["--score-threshold", "-0.1"], "--score-threshold must lie in [0, 1]"),
    (["--score-threshold", "nan"], "--score-threshold must be a finite number"),
    (["--score-threshold", "abc"], "invalid float value"),
    (["--image-size", "0"], "--image-size must lie in [1"),
    (["--image-size", "1.5"], "invalid int value"),
    (["--max-pixels", "0"], "--max-pixels must lie in [1"),
    (["--head-checkpoint", "{tmp}/missing.safetensors"], "no such file"),
    (["--model", "ViT-B-16"], "no F-ViT head ships for --model ViT-B-16: pass --head-checkpoint"),
    (["--classes", "red circle|round thing"], "one name per class"),
    (["--classes", "red circle,red circle"], "'red circle' is listed twice"),
    (["--classes", " , "], "the class list is empty"),
    (["--classes-file", "{tmp}/synonyms.txt"], "one name per class"),
    (["--classes-file", "{tmp}/a_folder"], "is a folder"),
    (["--classes-file", "{tmp}/latin1.txt"], "is not UTF-8 text"),
    (["--classes-file", "{tmp}/empty.txt"], "has no class names"),
    (["--classes-file", "{tmp}/missing.txt"], "class file not found"),
    (["--classes", "a", "--classes-file", "{tmp}/a_file.txt"], "not allowed with argument"),
    (["--out", "{tmp}/a_file.txt"], "is a file; give a folder"),
    (["--out", "{tmp}/a_file.txt/sub"], "a_file.txt is a file, so the folder cannot be made"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--method", "maskclip"], "argument --method: invalid choice: 'maskclip'"),  # not a detection head
    (["--window", "32", "16"], "unrecognized arguments"),
]


@pytest.mark.parametrize("args, message", DETECT_CASES, ids=[" ".join(a) for a, _ in DETECT_CASES])
def test_every_bad_option_is_one_line_before_any_model(scene_dir, tmp_path, capsys, no_model, args, message):
    _files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    vocab = [] if any(a.startswith("--classes") for a in args) else ["--classes", "red circle,blue star"]
    model = [] if "--model" in args else ["--model", "toy"]
    argv = ["detect", scene_dir / "scene.png", *vocab, *model, "--out", tmp_path / "o", *args]
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("ovdense: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err


def test_inputs_and_outputs_are_checked_before_any_model(tmp_path, capsys, no_model):
    _files(tmp_path)
    code, _, err = run_cli(["detect", tmp_path / "noimages", "--model", "toy", "--classes", "a"], capsys)
    assert code == 2 and "no images found" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["detect", tmp_path / "a.png", "--model", "toy"], capsys)
    assert code == 2 and "one of the arguments --classes --classes-file is required" in err
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "a_overlay.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / name)
    code, _, err = run_cli(["detect", folder, "--model", "toy", "--classes", "a", "--out", folder], capsys)
    assert code == 2 and "would overwrite an input" in err and len(err.strip().splitlines()) == 1, err


def test_help_and_methods_name_detect(capsys):
    code, stdout, _ = run_cli(["--help"], capsys)
    assert code == 0 and "detect" in stdout
    code, stdout, _ = run_cli(["methods"], capsys)
    assert code == 0 and "ovdense detect" in stdout and "F-VLM" in stdout
