"""The toy CLIP training script: outputs, reproducibility and resuming (a few tiny steps)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_toy_clip  # noqa: E402


def run(out, steps):
    argv = ["--out", str(out), "--steps", str(steps), "--batch", "4", "--warmup", "1",
            "--single-steps", "1", "--shape-first", "1", "--threads", "1"]
    assert train_toy_clip.main(argv) == 0


def test_writes_weights_config_curve_and_resumes(tmp_path):
    run(tmp_path / "a", 2)
    for name in ("config.json", "model.safetensors", "loss.png", "checkpoint.pt"):
        assert (tmp_path / "a" / name).is_file(), name
    assert json.loads((tmp_path / "a" / "config.json").read_text())["embed_dim"] == 128
    first = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in first.values())

    run(tmp_path / "b", 2)  # same seed, same weights
    second = load_file(str(tmp_path / "b" / "model.safetensors"))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)

    run(tmp_path / "a", 3)  # resumes at step 2 and takes one more
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and len(state["losses"]) == 3
