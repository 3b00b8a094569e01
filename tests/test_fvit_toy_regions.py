"""tools/analysis/fvit_toy_regions.py: the windowed CLIP map and the tool on a small toy world."""

from __future__ import annotations

import json
import re

import torch
import torch.nn.functional as F
from tool_runs import load_tool


def test_windowed_map_averages_the_windows_that_cover_each_cell(toy):
    """A 64 × 96 input, 64 px windows at stride 32: two windows (columns 0–63 and 32–95). Cells of
    columns 0–3 see only the first, 8–11 only the second, 4–7 the normalised sum of both."""
    from ovdense.heads.fvit import frozen_features

    regions = load_tool("analysis/fvit_toy_regions")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)
    got = regions.windowed_clip_map(toy, x, None, "maskclip", 64, 32)  # 1, D, 8, 12
    first = frozen_features(toy, x[..., :64]).clip_map  # 1, D, 8, 8
    second = frozen_features(toy, x[..., 32:]).clip_map
    assert got.shape == (1, first.shape[1], 8, 12)
    torch.testing.assert_close(got[..., :4], first[..., :4])
    torch.testing.assert_close(got[..., 8:], second[..., 4:])
    torch.testing.assert_close(got[..., 4:8], F.normalize(first[..., 4:] + second[..., :4], dim=1))
    # a window as large as the image is F-ViT's single pass
    torch.testing.assert_close(regions.windowed_clip_map(toy, x, None, "sclip", 128, 64),
                               frozen_features(toy, x, method="sclip").clip_map)


def test_tool_scores_every_ground_truth_box(tmp_path, capsys):
    world = load_tool("data/make_synthetic_detection")
    world.write_detection_world(tmp_path, num_train=1, num_val=3, seed=5)
    truth = json.loads((tmp_path / "coco" / "annotations" / "instances_val2017.json").read_text())
    assert load_tool("analysis/fvit_toy_regions").main(["--data", str(tmp_path),
                                                        "--methods", "maskclip"]) == 0
    out = capsys.readouterr().out
    assert f"{len(truth['annotations'])} ground-truth boxes in 3 scenes" in out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    for scorer in ("detector head (no CLIP term)", "CLIP term, maskclip, one pass",
                   "CLIP term, maskclip, windows 64/32", "ensemble, maskclip, one pass"):
        assert scorer in rows
        assert len(re.findall(r"\d\.\d{3}|nan", rows[scorer])) == 4


def test_tool_without_data_says_what_to_run(tmp_path, capsys):
    assert load_tool("analysis/fvit_toy_regions").main(["--data", str(tmp_path / "none")]) == 2
    assert "make_synthetic_detection.py" in capsys.readouterr().err


def test_tool_refuses_another_vocabulary(tmp_path, capsys):
    top = load_tool("data/make_synthetic_detection").write_detection_world(tmp_path, num_train=1, num_val=1)
    annotations = top / "annotations" / "instances_val2017.json"
    truth = json.loads(annotations.read_text())
    truth["categories"][0]["name"] = "screw"
    annotations.write_text(json.dumps(truth))
    assert load_tool("analysis/fvit_toy_regions").main(["--data", str(tmp_path)]) == 2
    assert "not the toy detection world" in capsys.readouterr().err
