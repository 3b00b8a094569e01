"""``ovdense anomaly --method adaptclip`` and ``ovdense anomaly-eval --method adaptclip`` end to end on the
toy CLIP with random adapters written by ``save_head``: the outputs against ``AdaptClip`` called directly, the
metrics against scikit-learn on those direct predictions, and each bad input as one line."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tool_runs import run_cli

from ovdense import create_backbone
from ovdense.anomaly.adaptclip import AdaptClip, AdaptClipConfig, AdaptClipHead, save_head
from ovdense.data.layouts import write_toy_anomaly


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptclip-cli")
    backbone = create_backbone("toy")
    torch.manual_seed(0)
    head = AdaptClipHead(backbone, AdaptClipConfig(image_size=128, sigma=1.0)).eval()
    with torch.no_grad():  # batch-norm statistics away from the identity, as after training
        for name, b in head.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    save_head(root / "head.safetensors", head, backbone)
    data = write_toy_anomaly(root / "toy", ["circle_plain", "star_noisy"], 3, 2, seed=1, size=96)
    return root, backbone, data


def test_anomaly_outputs_agree(setup, tmp_path, capsys):
    root, backbone, data = setup
    images, normal = data / "circle_plain" / "test" / "holed", data / "circle_plain" / "train" / "good"
    direct = AdaptClip(backbone, head_checkpoint=root / "head.safetensors")
    for extra, mode in (([], "AdaptCLIP (zero-shot)"),
                        (["--normal", normal, "--shots", "2"], "AdaptCLIP (2-shot)")):
        out = tmp_path / mode.split()[1].strip("()")
        code, _, err = run_cli(["anomaly", images, "--method", "adaptclip", "--model", "toy",
                                "--head-checkpoint", root / "head.safetensors", "--out", out, *extra], capsys)
        assert code == 0, err
        if extra:
            direct.set_references(sorted(normal.iterdir())[:2])
        for image in sorted(images.iterdir()):
            (want,) = direct.predict([np.asarray(Image.open(image).convert("RGB"))])
            amap = np.load(out / f"{image.stem}_anomaly.npy")
            report = json.loads((out / f"{image.stem}_anomaly.json").read_text())
            assert amap.shape == (96, 96) and amap.dtype == np.float32
            np.testing.assert_allclose(amap, want.map, atol=1e-6)
            assert report["score"] == pytest.approx(want.score, abs=1e-6)
            assert report["mode"] == mode and report["object"] == "object"


def test_anomaly_eval_against_sklearn(setup, tmp_path, capsys):
    from sklearn.metrics import average_precision_score, roc_auc_score

    root, backbone, data = setup
    code, out, err = run_cli(["anomaly-eval", "--dataset", "mvtec", "--root", data, "--method", "adaptclip",
                              "--model", "toy", "--head-checkpoint", root / "head.safetensors",
                              "--shots", "1", "--out", tmp_path], capsys)
    assert code == 0, err
    with open(tmp_path / "anomaly_mvtec_1shot_adaptclip.csv", newline="") as f:
        rows = {row["category"]: row for row in csv.DictReader(f)}
    direct = AdaptClip(backbone, head_checkpoint=root / "head.safetensors")
    for category in ("circle_plain", "star_noisy"):
        direct.set_references([sorted((data / category / "train" / "good").iterdir())[0]])
        scores, labels, pixels, truth = [], [], [], []
        for folder in sorted((data / category / "test").iterdir()):
            for image in sorted(folder.iterdir()):
                (result,) = direct.predict([np.asarray(Image.open(image).convert("RGB"))])
                scores.append(result.score)
                labels.append(folder.name != "good")
                pixels.append(result.map.ravel())
                mask = data / category / "ground_truth" / folder.name / f"{image.stem}_mask.png"
                truth.append((np.asarray(Image.open(mask)) > 0).ravel() if mask.is_file()
                             else np.zeros(result.map.size, bool))
        image_auroc, image_ap = roc_auc_score(labels, scores), average_precision_score(labels, scores)
        assert float(rows[category]["image_auroc"]) == pytest.approx(100 * image_auroc, abs=0.01)
        assert float(rows[category]["image_ap"]) == pytest.approx(100 * image_ap, abs=0.01)
        assert float(rows[category]["pixel_ap"]) == pytest.approx(
            100 * average_precision_score(np.concatenate(truth), np.concatenate(pixels)), abs=0.01)


def test_anomaly_eval_reference_seed(setup, tmp_path, capsys):
    """--reference-seed draws the references with random.Random(seed).sample: the image AUROC of one category
    against scikit-learn on direct predictions with the drawn references."""
    import random

    from sklearn.metrics import roc_auc_score

    root, backbone, data = setup
    code, _, err = run_cli(["anomaly-eval", "--dataset", "mvtec", "--root", data, "--method", "adaptclip",
                            "--model", "toy", "--head-checkpoint", root / "head.safetensors", "--shots", "2",
                            "--reference-seed", "3", "--categories", "star_noisy", "--out", tmp_path], capsys)
    assert code == 0, err
    with open(tmp_path / "anomaly_mvtec_2shot_adaptclip.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["category"] == "star_noisy")
    normal = sorted((data / "star_noisy" / "train" / "good").iterdir())
    direct = AdaptClip(backbone, head_checkpoint=root / "head.safetensors",
                       references=random.Random(3).sample(normal, 2))
    scores, labels = [], []
    for folder in sorted((data / "star_noisy" / "test").iterdir()):
        for image in sorted(folder.iterdir()):
            scores.append(direct.predict([np.asarray(Image.open(image).convert("RGB"))])[0].score)
            labels.append(folder.name != "good")
    assert float(row["image_auroc"]) == pytest.approx(100 * roc_auc_score(labels, scores), abs=0.01)


@pytest.mark.parametrize("extra, message", [
    (["--method", "winclip", "--object", "circle", "--head-checkpoint", "{head}"],
     "not an option of --method winclip"),
    (["--method", "adaptclip", "--head-checkpoint", "{head}", "--normal", "{empty}"], "holds no images"),
    (["--method", "adaptclip", "--head-checkpoint", "{other}"], "not a safetensors AdaptCLIP head"),
    (["--method", "adaptclip", "--model", "ViT-B-16", "--pretrained", "none"], "needs trained adapters"),
    (["--method", "winclip"], "--object NAME is needed"),
    (["--method", "adaptclip", "--head-checkpoint", "{head}", "--normal", "{big}"],
     "needs normal images of the"),
])
def test_bad_input_is_one_line(setup, tmp_path, capsys, extra, message):
    root, _, data = setup
    (tmp_path / "empty").mkdir()
    (tmp_path / "big").mkdir()
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(tmp_path / "big" / "ref.png")
    (tmp_path / "other.safetensors").write_bytes(b"not weights")
    values = dict(head=root / "head.safetensors", empty=tmp_path / "empty",
                  other=tmp_path / "other.safetensors", big=tmp_path / "big")
    extra = [str(a).format(**values) for a in extra]
    model = [] if "--model" in extra else ["--model", "toy"]
    code, _, err = run_cli(["anomaly", data / "circle_plain" / "test" / "good", *model,
                            "--out", tmp_path / "out", *extra], capsys)
    assert code != 0 and message in err, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err


def test_anomaly_eval_refuses_head_for_winclip(setup, tmp_path, capsys):
    root, _, data = setup
    code, _, err = run_cli(["anomaly-eval", "--dataset", "mvtec", "--root", data, "--model", "toy",
                            "--head-checkpoint", root / "head.safetensors", "--out", tmp_path], capsys)
    assert code != 0 and "--method adaptclip" in err
