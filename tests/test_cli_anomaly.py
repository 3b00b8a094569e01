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
