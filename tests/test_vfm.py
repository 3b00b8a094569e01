"""The VFMs beside CLIP (``ovdense/backbone/vfm.py``) against their official code, run as is from the
mirrors of facebookresearch/dino and facebookresearch/dinov2, on the same random weights loaded
through ovdense's own loader from the official state-dict layout; and the loader's errors.
"""

import pytest
import torch
from official_vfm import (
    imagenet,
    import_official_dino,
    import_official_dinov2,
    official_dinov2_vitb14_reg,
    spread,
)

from ovdense.backbone.vfm import VFMS, create_vfm
from ovdense.errors import OvdenseError


@pytest.fixture(scope="module")
def official_dino(tmp_path_factory):
    return import_official_dino(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def official_dinov2(tmp_path_factory):
    return import_official_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.mark.parametrize("name,patch", [("dino_vitb8", 8), ("dino_vitb16", 16)])
def test_dino_features_are_the_official_get_intermediate_layers(official_dino, name, patch, tmp_path):
    """DINO's hub model (``vit_base(patch_size, num_classes=0)``), its state dict saved as the official
    file is, loaded by ``create_vfm``: the last block's final-normed patch tokens on the grid, at the
    native size (no resampling), a larger square and a non-square size that is not a patch multiple
    (DINO's ``+ 0.1`` bicubic rule; the conv drops the partial patch)."""
    official = official_dino.vit_base(patch_size=patch, num_classes=0).eval()
    spread(official, seed=patch)
    torch.save(official.state_dict(), tmp_path / VFMS[name].weights_file)
    ours = create_vfm(name, tmp_path / VFMS[name].weights_file)
    generator = torch.Generator().manual_seed(0)
    for size in [(224, 224), (12 * patch, 20 * patch + 5)]:
        rgb = torch.rand(1, 3, *size, generator=generator)
        with torch.no_grad():
            expected = official.get_intermediate_layers(imagenet(rgb))[0][:, 1:]  # 1, hw, C
        got = ours.features(rgb)
        h, w = size[0] // patch, size[1] // patch
        assert got.shape == (1, 768, h, w) and ours.grid(*size) == (h, w)
        assert (got.flatten(2).transpose(1, 2) - expected).abs().max() < 1e-4, size


def test_a_wrong_position_rule_shows(official_dino, tmp_path):
    """The test above can fail: timm's own resize (antialiased, by size) is not DINO's."""
    import timm

    official = official_dino.vit_base(patch_size=16, num_classes=0).eval()
    spread(official, seed=3)
    timm_vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                 dynamic_img_size=True).eval()
    timm_vit.load_state_dict(official.state_dict())
    rgb = imagenet(torch.rand(1, 3, 192, 320, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        expected = official.get_intermediate_layers(rgb)[0][:, 1:]
        timm_tokens = timm_vit.forward_features(rgb)[:, 1:]
    assert (timm_tokens - expected).abs().max() > 1e-3


def test_dinov2_features_are_the_official_get_intermediate_layers(official_dinov2, tmp_path):
    """The hub's ``dinov2_vitb14_reg`` (``vit_base(patch_size=14, img_size=518, init_values=1.0,
    num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0, block_chunks=0)``),
    its state dict in the official layout (``register_tokens``, ``mask_token``, the class position in
    ``pos_embed``) through ovdense's loader: ``get_intermediate_layers(x, reshape=True)[0]``."""
    official = official_dinov2_vitb14_reg(official_dinov2)
    spread(official, seed=14)
    path = tmp_path / VFMS["dinov2_vitb14_reg"].weights_file
    torch.save(official.state_dict(), path)
    assert "register_tokens" in official.state_dict() and "mask_token" in official.state_dict()
    ours = create_vfm("dinov2_vitb14_reg", path)
    generator = torch.Generator().manual_seed(2)
    for size in [(224, 224), (14 * 9, 14 * 13 + 6)]:
        rgb = torch.rand(1, 3, *size, generator=generator)
        x = imagenet(rgb)[..., : size[0] // 14 * 14, : size[1] // 14 * 14]  # official asserts multiples
        with torch.no_grad():
            expected = official.get_intermediate_layers(x, n=1, reshape=True)[0]
        got = ours.features(rgb)
        assert got.shape == expected.shape == (1, 768, size[0] // 14, size[1] // 14)
        assert (got - expected).abs().max() < 1e-4, size


def test_sam_encoder_sees_proxyclips_input():
    """SAM's features: the ImageNet-normalised image resized (bilinear, not aligned) to 1024², as
    ProxyCLIP's ``forward_feature`` feeds ``image_encoder``; the encoder's output is returned."""
    import torch.nn.functional as F

    vfm = create_vfm("sam_vit_b", "random")
    seen = {}

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen["x"] = x
            return torch.ones(x.shape[0], 256, 64, 64)

    vfm.model = Encoder()
    rgb = torch.rand(2, 3, 90, 130, generator=torch.Generator().manual_seed(4))
    out = vfm.features(rgb)
    expected = F.interpolate(imagenet(rgb), size=(1024, 1024), mode="bilinear", align_corners=False)
    assert out.shape == (2, 256, 64, 64) and vfm.grid(90, 130) == (64, 64)
    assert torch.allclose(seen["x"], expected, atol=1e-6)


def test_weights_errors_are_one_clear_line(official_dino, tmp_path):
    def error(call, match):
        with pytest.raises(OvdenseError, match=match) as e:
            call()
        assert "\n" not in str(e.value)

    error(lambda: create_vfm("dino_vitb32"), "unknown vision model 'dino_vitb32'; known: dino_vitb8")
    error(lambda: create_vfm("dino_vitb8"), "dino_vitbase8_pretrain.pth .*https://dl.fbaipublicfiles.com")
    error(lambda: create_vfm("dino_vitb8", tmp_path / "absent.pth"), "weights file not found")
    b16 = official_dino.vit_base(patch_size=16, num_classes=0).state_dict()
    torch.save(b16, tmp_path / "b16.pth")
    error(lambda: create_vfm("dino_vitb8", tmp_path / "b16.pth"),
          "not dino_vitb8's weights \\(pos_embed has shape \\(1, 197, 768\\), dino_vitb8 expects \\(1, 785")
    error(lambda: create_vfm("dinov2_vitb14_reg", tmp_path / "b16.pth"), "not dinov2_vitb14_reg's weights")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    error(lambda: create_vfm("dino_vitb16", tmp_path / "junk.pth"), "not a readable weights file")
    # DINO's full training checkpoint: the teacher's backbone is taken, its head and the student dropped
    full = {"teacher": {**{f"backbone.{k}": v for k, v in b16.items()}, "head.mlp.0.weight": torch.zeros(2)},
            "student": {}, "epoch": 100}
    torch.save(full, tmp_path / "full.pth")
    vfm = create_vfm("dino_vitb16", tmp_path / "full.pth")
    assert torch.equal(vfm.model.pos_embed, b16["pos_embed"])
    error(lambda: vfm.features(torch.rand(1, 3, 8, 8)), "smaller than one 16 px patch")
