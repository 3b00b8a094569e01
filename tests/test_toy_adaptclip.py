"""The AdaptCLIP adapters that ship for the toy CLIP (ovdense/assets/adaptclip-toy-head.safetensors,
trained by configs/adaptclip/adaptclip_toy_domain-a.py on the toy world's domain A, seed 0): what loads by
default is the file, and on categories of domain B — which the adapters never saw — in new scenes they find
the defects where WinCLIP on the same backbone does not."""

import numpy as np
import pytest
import torch

from ovdense import create_backbone
from ovdense.anomaly.adaptclip import TOY_HEAD_FILE, AdaptClip, default_head_checkpoint
from ovdense.backbone.clip import ASSETS
from ovdense.data.layouts import toy_anomaly_categories, write_toy_anomaly


@pytest.fixture(scope="module")
def toy():
    return create_backbone("toy")


def test_the_default_is_the_shipped_file(toy):
    from safetensors import safe_open

    path = default_head_checkpoint(toy)
    assert path == ASSETS / TOY_HEAD_FILE and path.stat().st_size < 5 * 2 ** 20
    head = AdaptClip(toy).head
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(head.state_dict())
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), head.state_dict()[key]), key
    assert head.config.image_size == 128 and head.taps == (2, 3, 5, 6) and head.dual_from == 2


def test_unseen_categories_beat_winclip(toy, tmp_path):
    """Four domain-B categories, 4 normal and 4 of each defect in fresh scenes (seed 77): AdaptCLIP's
    zero-shot image AUROC and pixel AP, per category then averaged, against WinCLIP's."""
    from ovdense.anomaly.evaluate import evaluate

    categories = toy_anomaly_categories("B")[::3]
    root = write_toy_anomaly(tmp_path, categories, 2, 4, seed=77)
    ours = evaluate(toy, "mvtec", root, method="adaptclip")
    theirs = evaluate(toy, "mvtec", root, method="winclip")

    def mean(results, field):
        return float(np.mean([getattr(r, field) for r in results.values()]))

    print({f: (round(mean(ours, f), 3), round(mean(theirs, f), 3)) for f in ("image_auroc", "pixel_ap")})
    assert mean(ours, "image_auroc") > 0.8 and mean(ours, "pixel_ap") > 0.25
    assert mean(ours, "image_auroc") > mean(theirs, "image_auroc") + 0.2
    assert mean(ours, "pixel_ap") > mean(theirs, "pixel_ap") + 0.2


def test_the_toy_experiments_scores_are_per_category_means():
    """tools/analysis/eval_adaptclip_toy.py's ``scores``: metrics per category, then averaged; ``defects``
    keeps every normal image and the anomalous ones of those kinds (image AUROC against scikit-learn)."""
    from sklearn.metrics import roc_auc_score
    from tool_runs import load_tool

    experiment = load_tool("analysis/eval_adaptclip_toy")
    rng = np.random.default_rng(0)
    rows = []
    for category in ("a", "b"):
        for defect, label in [("good", 0)] * 2 + [("holed", 1)] * 2 + [("stained", 1)] * 2:
            mask = np.zeros((8, 8), bool)
            mask[2:4, 2:4] = bool(label)
            rows.append(dict(category=category, defect=defect, label=label, score=float(rng.random()),
                             map=rng.random((8, 8)).astype(np.float32), mask=mask))

    def auroc(category, keep):
        chosen = [r for r in rows if r["category"] == category and (r["label"] == 0 or r["defect"] in keep)]
        return roc_auc_score([r["label"] for r in chosen], [r["score"] for r in chosen])

    everything = experiment.scores(rows)["image_auroc"]
    both = {"holed", "stained"}
    assert everything == pytest.approx(50 * (auroc("a", both) + auroc("b", both)))
    stained = experiment.scores(rows, {"stained"})["image_auroc"]
    assert stained == pytest.approx(50 * (auroc("a", {"stained"}) + auroc("b", {"stained"})))
    assert stained != everything
