"""ovdense's plain-torch NAS-FPN (``ovdense.detection.necks.NASFPN``, the neck of CLIM's OV-LVIS ViT-B/16
detector) against mmdet 3.3's ``NASFPN`` with mmcv's merge cells, on the same weights."""

from __future__ import annotations

import pytest
import torch

from ovdense.detection.necks import NASFPN, MergeCell, build_neck
from ovdense.errors import OvdenseError

pytest.importorskip("mmcv.ops", reason="needs full mmcv with compiled ops (python tools/misc/build_mmcv.py)")
mmdet_necks = pytest.importorskip("mmdet.models.necks", reason="needs mmdet 3.3 (pip install -e '.[mm]')")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and BN statistic drawn at random (mmdet's init zeroes biases and BN is near
    the identity in eval, which could hide a missing bias or a norm in the wrong place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() > 1:  # conv weights: unit gain, so that seven stages neither vanish nor blow up
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("norm_cfg", [dict(type="BN", requires_grad=True), None], ids=["BN", "no norm"])
@pytest.mark.parametrize("size", [(56, 72), (64, 64), (40, 100)], ids=["14x18 patches", "square", "wide"])
def test_nasfpn_equals_mmdets(norm_cfg, size):
    """CLIM's OV-LVIS neck (4 inputs of 768 channels at strides 4–32, 256 out, 5 levels, 7 stages):
    the same state-dict keys, and the same five outputs. The sizes make every resize branch run: the
    extra level of 7 × 9 is 3 × 4 (max-pool floors), so the stages pad P5 (7 × 9) to 9 × 12 for P6 and
    to 7 × 10 for P7 (1 × 2) before pooling; the wide input gives maps whose height and width compare
    differently (mmcv compares the shapes as tuples: a smaller height upsamples even when the width is
    larger)."""
    torch.manual_seed(0)
    config = dict(in_channels=[768] * 4, out_channels=256, num_outs=5, stack_times=7, norm_cfg=norm_cfg)
    theirs = mmdet_necks.NASFPN(**config).eval()
    ours = build_neck(dict(type="NASFPN", **config)).eval()
    assert isinstance(ours, NASFPN)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomise(theirs, 1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    h, w = size
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, 768, h // s, w // s, generator=generator) for s in (1, 2, 4, 8)]
    with torch.no_grad():
        expected, got = theirs(inputs), ours(inputs)
    assert len(got) == 5
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        scale = float(a.abs().max())
        assert 1e-2 < scale < 1e4 and torch.isfinite(a).all()
        assert float((a - b).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("have, size", [((7, 9), (4, 5)), ((4, 5), (7, 9)), ((5, 13), (7, 9)),
                                        ((7, 9), (3, 4)), ((8, 8), (4, 4)), ((3, 20), (6, 5))])
def test_merge_cell_resize_equals_mmcvs(have, size):
    """Each resize case of mmcv's ``BaseMergeCell._resize`` (upsample, pad-and-pool, plain pool, and
    the tuple comparison: 3 × 20 against 6 × 5 upsamples, 5 × 13 against 7 × 9 too)."""
    from mmcv.ops.merge_cells import SumCell

    x = torch.randn(1, 4, *have, generator=torch.Generator().manual_seed(3))
    cell = SumCell(4, 4, with_out_conv=False)
    torch.testing.assert_close(MergeCell.resize(x, size), cell._resize(x, size), rtol=0, atol=0)


def test_nasfpn_refuses_other_level_counts():
    with pytest.raises(OvdenseError, match="num_outs=4"):
        NASFPN([768] * 4, 256, num_outs=4, stack_times=1)
