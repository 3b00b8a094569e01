"""``ovdense anomaly`` and ``ovdense anomaly-eval`` end to end with a tiny random model."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_eval_anomaly import reference_metrics
from test_winclip import reference_winclip

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


def test_anomaly_prompt_set_anomalib(mvtec, tiny_config_path, tmp_path, capsys, monkeypatch):
    """``--prompt-set anomalib``: maps and scores equal the plain-loop reference built from
    anomalib's prompts, which differs from the paper prompts' one."""
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    images = mvtec / "star" / "test" / "holed"
    backbone = create_backbone(str(tiny_config_path))
    weights = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), weights)
    code = main(["anomaly", str(images), "--object", "star", "--model", str(tiny_config_path),
                 "--pretrained", str(weights), "--prompt-set", "anomalib", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    paths = sorted(images.iterdir())
    rgbs = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    want = reference_winclip(backbone, "star", "anomalib", rgbs)
    paper = reference_winclip(backbone, "star", "paper", rgbs)
    for path, rgb, reference, other in zip(paths, rgbs, want, paper):
        report = json.loads((tmp_path / "out" / f"{path.stem}_anomaly.json").read_text())
        assert (report["prompt_set"], report["mode"]) == ("anomalib", "WinCLIP (zero-shot)")
        score, grid = reference["zero"]
        assert report["score"] == pytest.approx(score, rel=1e-4, abs=1e-6)
        amap = np.load(tmp_path / "out" / f"{path.stem}_anomaly.npy")
        full = F.interpolate(grid[None, None], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(amap, full.numpy(), rtol=1e-4, atol=1e-6)
        assert (grid - other["zero"][1]).abs().max() > 1e-3  # the paper prompts would show


def mvtec_subset(mvtec, root, categories, defect):
    """A copy of ``categories`` with their normal images and one defect kind only (fewer images)."""
    for category in categories:
        for part in ("train/good", "test/good", f"test/{defect}", f"ground_truth/{defect}"):
            shutil.copytree(mvtec / category / part, root / category / part)
    return root


def read_mvtec(root, category, shots):
    """The first ``shots`` training images and every test image with its label and mask."""
    references = sorted((root / category / "train" / "good").glob("*.png"))[:shots]
    samples = []
    for folder in sorted((root / category / "test").iterdir()):
        for image in sorted(folder.glob("*.png")):
            if folder.name == "good":
                mask = np.zeros(Image.open(image).size[::-1], bool)
            else:
                mask = np.asarray(Image.open(root / category / "ground_truth" / folder.name
                                             / f"{image.stem}_mask.png")) > 0
            samples.append((image, int(folder.name != "good"), mask))
    return references, samples


def test_anomaly_eval_writes_the_metrics_of_the_predictions(mvtec, tiny_config_path, tmp_path, capsys,
                                                             monkeypatch):
    """The CSV, the printed table and the picture of ``anomaly-eval`` against metrics computed here
    (scikit-learn, plain AUPRO) over ``WinClip.predict`` on the same files."""
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    categories = ["star", "ring"]
    root = mvtec_subset(mvtec, tmp_path / "mvtec", categories, "holed")
    backbone = create_backbone(str(tiny_config_path))
    weights = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), weights)
    out = tmp_path / "out"
    code = main(["anomaly-eval", "--dataset", "mvtec", "--root", str(root), "--categories", *categories,
                 "--model", str(tiny_config_path), "--pretrained", str(weights), "--shots", "1",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    columns = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "pixel_ap", "image_ap"]
    want = {}
    for category in categories:
        references, samples = read_mvtec(root, category, 1)
        winclip = WinClip(backbone, category)
        winclip.set_references(references)
        results = winclip.predict([image for image, _, _ in samples])
        metrics = reference_metrics([r.score for r in results], [label for _, label, _ in samples],
                                    [r.map for r in results], [mask for _, _, mask in samples])
        want[category] = [100 * metrics[c] for c in columns]
    want["mean"] = list(np.mean([want[c] for c in categories], axis=0))
    assert len({tuple(want[c]) for c in categories}) == 2  # the mean row is not any one row

    assert sorted(p.name for p in out.iterdir()) == ["anomaly_mvtec_1shot.csv", "anomaly_mvtec_1shot.png"]
    with open(out / "anomaly_mvtec_1shot.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["category"] + columns
    assert [row[0] for row in rows[1:]] == categories + ["mean"]
    for row in rows[1:]:
        assert all(len(v.split(".")[1]) == 2 for v in row[1:]), row
        assert [float(v) for v in row[1:]] == pytest.approx(want[row[0]], abs=0.005 + 1e-9), row[0]
    lines = printed.splitlines()
    assert lines[0].split() == ["category"] + columns
    for line in lines[1:4]:
        name, *values = line.split()
        assert [float(v) for v in values] == pytest.approx(want[name], abs=0.05 + 1e-9), name
    assert lines[4].startswith("ovdense: wrote ")
    with Image.open(out / "anomaly_mvtec_1shot.png") as pil:
        picture = np.asarray(pil.convert("L"))
    assert picture.shape[0] == 8 + 16 * 4  # a text line for the header, each category and the mean
    for i in range(4):
        assert (picture[4 + 16 * i:4 + 16 * (i + 1)] < 128).any(), f"line {i} of the picture is empty"


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
