"""``ovdense anomaly`` and ``ovdense anomaly-eval`` end to end with a tiny random model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovdense import create_backbone
from ovdense.anomaly.winclip import WinClip
from ovdense.cli import main
from ovdense.data.layouts import write_dataset


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    return write_dataset("mvtec", tmp_path_factory.mktemp("mvtec"), 2, 0, 40)


def test_anomaly_outputs_agree(mvtec, tiny_config_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    images = mvtec / "star" / "test" / "holed"
    refs = mvtec / "star" / "train" / "good"
    backbone = create_backbone(str(tiny_config_path))
    weights = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), weights)  # the CLI must use the same weights
    code = main(["anomaly", str(images), "--object", "star", "--model", str(tiny_config_path),
                 "--pretrained", str(weights), "--reference", str(refs), "--shots", "2",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    winclip = WinClip(backbone, "star")
    winclip.set_references(sorted(refs.iterdir()))
    for image in sorted(images.iterdir()):
        amap = np.load(tmp_path / "out" / f"{image.stem}_anomaly.npy")
        report = json.loads((tmp_path / "out" / f"{image.stem}_anomaly.json").read_text())
        with Image.open(tmp_path / "out" / f"{image.stem}_heatmap.png") as pil:
            assert pil.size == (40, 40)
        (want,) = winclip.predict([image])
        assert amap.shape == (40, 40) and amap.dtype == np.float32
        np.testing.assert_allclose(amap, want.map, rtol=1e-5, atol=1e-6)
        assert report["score"] == pytest.approx(want.score, abs=1e-6)
        assert report["map_max"] == pytest.approx(float(amap.max()), abs=1e-6)
        assert report["mode"] == "WinCLIP+ (2-shot)"


@pytest.mark.parametrize("extra, message", [
    (["--reference", "missing-folder"], "reference folder not found"),
    (["--reference", "{refs}", "--shots", "5"], "--shots 5 asked, the reference folder has 2"),
    (["--object", " "], "object name is empty"),
])
def test_anomaly_bad_input(mvtec, tiny_config_path, tmp_path, capsys, extra, message):
    refs = str(mvtec / "star" / "train" / "good")
    args = ["anomaly", str(mvtec / "star" / "test" / "good"), "--object", "star",
            "--model", str(tiny_config_path), "--out", str(tmp_path)]
    args += [e.format(refs=refs) for e in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_anomaly_eval_writes_table(mvtec, tiny_config_path, tmp_path, capsys):
    code = main(["anomaly-eval", "--dataset", "mvtec", "--root", str(mvtec), "--categories", "star",
                 "--model", str(tiny_config_path), "--shots", "1", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "star" in out and "mean" in out
    rows = (tmp_path / "anomaly_mvtec_1shot.csv").read_text().splitlines()
    assert rows[0].startswith("category,image_auroc,pixel_auroc,aupro")
    assert (tmp_path / "anomaly_mvtec_1shot.png").is_file()


# --------------------------------------------------------------------------------------------
# Every option checked before any model: one `ovdense: error:` line each


@pytest.fixture
def no_model(monkeypatch):
    import ovdense

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(ovdense, "create_backbone", built)


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


ANOMALY_CASES = [
    (["--object", " "], "object name is empty"),
    (["--reference", "{refs}/000.png"], "is a file; give the folder of normal images"),
    (["--reference", "{tmp}/missing"], "reference folder not found"),
    (["--shots", "3"], "--shots needs --reference"),
    (["--reference", "{refs}", "--shots", "0"], "--shots 0 asked, the reference folder has 2"),
    (["--reference", "{refs}", "--shots", "-2"], "--shots -2 asked"),
    (["--out", "{tmp}/file.txt"], "is a file; give a folder"),
    (["--max-pixels", "-1"], "--max-pixels must lie in [1"),
    (["--prompt-set", "mine"], "invalid choice"),
    (["--shots", "x"], "invalid int value"),
]


@pytest.mark.parametrize("args, message", ANOMALY_CASES, ids=[" ".join(a) for a, _ in ANOMALY_CASES])
def test_anomaly_bad_options_before_any_model(mvtec, tmp_path, capsys, no_model, args, message):
    (tmp_path / "file.txt").write_text("x")
    refs = mvtec / "star" / "train" / "good"
    args = [a.format(refs=refs, tmp=tmp_path) for a in args]
    argv = ["anomaly", str(mvtec / "star" / "test" / "good"), "--model", "toy", "--out", str(tmp_path / "o")]
    argv += [] if "--object" in args else ["--object", "star"]
    code, err = run_cli(argv + args, capsys)
    assert code == 2, err
    assert err.startswith("ovdense: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err


EVAL_CASES = [
    (["--root", "{above}"], "is --root one level too high?"),
    (["--root", "{mvtec}/star"], "is a category or inside a category"),
    (["--root", "{mvtec}/star/test"], "inside a category"),
    (["--root", "{tmp}/file.txt"], "is a file; give the dataset's folder"),
    (["--root", "{tmp}/missing"], "dataset folder not found"),
    (["--root", "{tmp}/empty"], "no MVTec AD category in"),
    (["--shots", "-1"], "--shots must be ≥ 0"),
    (["--shots", "99"], "99 shots asked, only 2 normal training images"),
    (["--categories", "nope"], "categories ['nope'] are not in"),
    (["--categories", "onlygood"], "onlygood in"),
    (["--dataset", "visa"], "a VisA folder?"),
    (["--out", "{tmp}/file.txt"], "is a file; give a folder"),
    (["--max-pixels", "0"], "--max-pixels must lie in [1"),
]


@pytest.mark.parametrize("args, message", EVAL_CASES, ids=[" ".join(a) for a, _ in EVAL_CASES])
def test_anomaly_eval_bad_options_before_any_model(mvtec, tmp_path, capsys, no_model, args, message):
    import shutil

    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    root = tmp_path / "data" / "mvtec"  # a copy with one more category, whose tests are all good
    shutil.copytree(mvtec, root)
    good = root / "onlygood" / "test" / "good"
    good.mkdir(parents=True)
    shutil.copy(next((root / "star" / "test" / "good").iterdir()), good)
    args = [a.format(above=tmp_path / "data", mvtec=root, tmp=tmp_path) for a in args]
    argv = ["anomaly-eval", "--model", "toy", "--out", str(tmp_path / "o")]
    argv += [] if "--root" in args else ["--root", str(root)]
    argv += [] if "--dataset" in args else ["--dataset", "mvtec"]
    argv += [] if "--categories" in args or "--root" in args else ["--categories", "star"]
    code, err = run_cli(argv + args, capsys)
    assert code == 2, err
    assert err.startswith("ovdense: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err
