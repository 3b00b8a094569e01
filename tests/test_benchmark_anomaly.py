"""tools/benchmarks/anomaly.py: anomalib's WinClipModel on ovdense's weights. anomalib is the
``anomaly-ref`` extra, not a dependency: skipped without it, except in CI (``CI=true``), where
.ci/run installs it and a skip would hide the one comparison with another implementation."""

import os

import numpy as np
import pytest
import torch
from tool_runs import load_tool

from ovdense.anomaly.winclip import WinClip

try:
    import anomalib.models.image.winclip.torch_model  # noqa: F401
except ImportError as e:
    if os.environ.get("CI", "").lower() == "true":
        raise ImportError(f"CI must compare WinCLIP with anomalib, which does not import ({e}): "
                          "pip install -e '.[anomaly-ref]'") from e
    pytest.skip(f"needs anomalib (pip install -e '.[anomaly-ref]'): {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def bench():
    return load_tool("benchmarks/anomaly")


def test_anomalib_gets_the_backbones_weights_and_agrees(bench, tiny_backbone, rng):
    theirs = bench.anomalib_winclip(tiny_backbone, "bottle")
    ours = WinClip(tiny_backbone, "bottle", prompt_set="anomalib")
    mine = tiny_backbone.model.state_dict()
    assert all(torch.equal(value, mine[key]) for key, value in theirs.clip.state_dict().items())
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(3)]
    x = ours.prepare(images[:2])
    with torch.no_grad():
        for got, want in zip(bench.run_ovdense(ours, x), bench.run_anomalib(theirs, x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        ours.set_references(images[2:])  # WinCLIP+, 1 shot
        theirs.setup("bottle", ours.prepare(images[2:]))
        for got, want in zip(bench.run_ovdense(ours, x), bench.run_anomalib(theirs, x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_unfixed_anomalib_gives_every_window_of_an_image_one_embedding(bench, tiny_backbone):
    """anomalib 2.7 under open_clip >= 2.26.1 (its issue #2571): the reason for the fix. If this
    fails, anomalib fixed it and ``fix_windows`` can go."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, unfixed, _ = bench.anomalib_winclip(tiny_backbone, "bottle", fix_windows=False).encode_image(x)
        _, fixed, _ = bench.anomalib_winclip(tiny_backbone, "bottle").encode_image(x)
    for windows in unfixed:  # 1, n, D
        torch.testing.assert_close(windows, windows[:, :1].expand_as(windows))
    assert all((windows - windows[:, :1]).abs().max() > 1e-3 for windows in fixed)
