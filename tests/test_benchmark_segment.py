"""tools/benchmarks/segment.py ``--methods``: a smoke run of every timed method on a small random CLIP
(ViT-B/16-shaped, width 768 as CLIP-DINOiser's official code needs, 4 blocks) and a 64² image. Timings
are never asserted; where a method's official mirrors are here, its official time must be there too."""

from __future__ import annotations

import csv
import json
import math

import torch
from official_segmenters import CD_REPO, CLIPER_REPO, OC_REPO, OPENAI_CLIP_REPO
from official_vfm import DINO_REPO, PROXYCLIP_REPO
from tool_runs import load_tool

#: ViT-B/16-shaped (patch 16, native 224, width 768, 12 heads), 4 blocks; a small text tower
TOWER = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 2},
}
#: each timed method and the mirrors its official time needs
MIRRORS = {
    "naclip": None,
    "proxyclip": (PROXYCLIP_REPO, DINO_REPO),
    "cliper": (CLIPER_REPO, OPENAI_CLIP_REPO),
    "clipdinoiser": (CD_REPO, OC_REPO),
}


def test_every_method_gets_a_row_and_its_official_time(tmp_path, monkeypatch, capfd):
    import open_clip

    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config, weights = tmp_path / "bench-tower.json", tmp_path / "bench-tower.pt"
    config.write_text(json.dumps(TOWER))
    torch.save(open_clip.CLIP(**TOWER).state_dict(), weights)
    out = tmp_path / "methods.csv"
    bench = load_tool("benchmarks/segment")
    assert bench.main(["--methods", *MIRRORS, "--model", str(config), "--pretrained", str(weights),
                       "--device", "cpu", "--repeats", "1", "--size", "64", "--short-side", "64",
                       "--classes", "3", "--out", str(out)]) == 0
    printed = capfd.readouterr().out  # each method runs in a process of its own
    with open(out, newline="") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert list(rows) == list(MIRRORS)
    for method, mirrors in MIRRORS.items():
        row = rows[method]
        assert (row["device"], row["image"], row["classes"]) == ("cpu", "64x64", "3")
        assert math.isfinite(float(row["seconds_per_image"])) and float(row["seconds_per_image"]) > 0
        assert f"{method:>12}: " in printed
        if mirrors is None:
            assert row["official_seconds_per_image"] == ""
        elif all(path.is_dir() for path in mirrors):
            assert math.isfinite(float(row["official_seconds_per_image"])), method
    assert 0 < float(rows["proxyclip"]["vfm_share"]) <= 1
