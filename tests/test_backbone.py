"""Creating the backbone: names, weights, offline behaviour, the dense contract on ViT-B-16."""

import json

import pytest
import torch

from ovdense import create_backbone
from ovdense.backbone import clip as clip_module
from ovdense.errors import OvdenseError


class Payload:
    """An arbitrary object: loading it would need unpickling code, which must be refused."""


def test_vit_b16_dense_and_text_shapes(tmp_path):
    backbone = create_backbone("ViT-B-16", pretrained=None, cache_dir=tmp_path)
    assert (backbone.patch_size, backbone.native_grid, backbone.embed_dim) == (16, (14, 14), 512)
    with torch.no_grad():
        for size in ((224, 224), (336, 448)):
            out = backbone.encode_dense(torch.randn(1, 3, *size), "clearclip")
            assert out.shape == (1, 512, size[0] // 16, size[1] // 16)
            torch.testing.assert_close(out.norm(dim=1), torch.ones(out.shape[0], *out.shape[2:]))
    text = backbone.encode_text(["cat", "dog"], "single")
    assert text.shape == (2, 512)


def test_non_vit_is_not_supported(tmp_path):
    with pytest.raises(OvdenseError, match="not supported"):
        create_backbone("RN50", pretrained=None, cache_dir=tmp_path)


def test_unknown_model_lists_vits():
    with pytest.raises(OvdenseError, match="unknown model 'ViT-Q-99'.*ViT-B-16"):
        create_backbone("ViT-Q-99")


def test_offline_tag_names_the_local_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_module, "_online", lambda host="huggingface.co": False)
    with pytest.raises(OvdenseError) as info:
        create_backbone("ViT-B-16", pretrained="openai", weights_cache_dir=str(tmp_path))
    message = str(info.value)
    assert "no network" in message and "--pretrained PATH" in message and str(tmp_path) in message


def test_unknown_tag():
    with pytest.raises(OvdenseError, match="neither a file nor a tag.*openai"):
        create_backbone("ViT-B-16", pretrained="definitely-not-a-tag")


def test_checkpoint_round_trip_and_fingerprint(tiny_config_path, tmp_path):
    torch.manual_seed(3)
    source = create_backbone(str(tiny_config_path), cache_dir=tmp_path)
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    loaded = create_backbone(str(tiny_config_path), pretrained=str(path), cache_dir=tmp_path)
    for (key, a), (_, b) in zip(source.model.state_dict().items(), loaded.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=key)
    assert loaded.weights.kind == "file" and str(path.resolve()) in loaded.fingerprint
    from safetensors.torch import save_file

    save_file(source.model.state_dict(), str(tmp_path / "tiny.safetensors"))
    again = create_backbone(str(tiny_config_path), pretrained=str(tmp_path / "tiny.safetensors"))
    torch.testing.assert_close(again.model.visual.proj, source.model.visual.proj)


def test_identity_follows_the_weights_not_their_path_or_precision(tiny_config_path, tmp_path):
    """What SAN and F-ViT head files record (``ClipBackbone.identity``): the same for a copied
    weights file and for the backbone run in fp16; different for other weights."""
    import hashlib
    import shutil

    torch.manual_seed(5)
    source = create_backbone(str(tiny_config_path), cache_dir=tmp_path)
    path = tmp_path / "a" / "tiny.pt"
    path.parent.mkdir()
    torch.save(source.model.state_dict(), path)
    copy = tmp_path / "b" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    loaded = create_backbone(str(tiny_config_path), pretrained=str(path), cache_dir=tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    assert loaded.identity == f"{loaded.name}|sha256:{digest}"
    moved = create_backbone(str(tiny_config_path), pretrained=str(copy), cache_dir=tmp_path)
    assert moved.identity == loaded.identity
    half = create_backbone(str(tiny_config_path), pretrained=str(path), cache_dir=tmp_path, precision="fp16")
    assert half.dtype == torch.float16 and half.identity == loaded.identity
    # random weights: a hash of every tensor, image tower included
    assert source.identity.startswith(f"{source.name}|params:") and source.identity != loaded.identity
    other = create_backbone(str(tiny_config_path), cache_dir=tmp_path)
    other.model.load_state_dict(source.model.state_dict())
    assert other.identity == source.identity
    with torch.no_grad():
        other = create_backbone(str(tiny_config_path), cache_dir=tmp_path)
        other.model.load_state_dict(source.model.state_dict())
        other.model.visual.conv1.weight[0, 0, 0, 0] += 1.0
    assert other.identity != source.identity


def test_wrong_checkpoint_names_the_keys(tiny_config_path, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3), "head.weight": torch.zeros(2)}, path)
    with pytest.raises(OvdenseError, match=r"does not fit.*missing keys \[.*unexpected keys \[head.weight"):
        create_backbone(str(tiny_config_path), pretrained=str(path))


def test_unreadable_and_pickled_checkpoints_are_refused(tiny_config_path, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(OvdenseError, match="not a readable weights file"):
        create_backbone(str(tiny_config_path), pretrained=str(tmp_path / "junk.pt"))
    torch.save({"obj": Payload()}, tmp_path / "pickle.pt")  # code to unpickle: refused
    with pytest.raises(OvdenseError, match="not a readable weights file"):
        create_backbone(str(tiny_config_path), pretrained=str(tmp_path / "pickle.pt"))
    with pytest.raises(OvdenseError, match="checkpoint not found"):
        create_backbone(str(tiny_config_path), pretrained=str(tmp_path / "none.pt"))


def test_bad_config_files(tmp_path):
    with pytest.raises(OvdenseError, match="model config not found"):
        create_backbone(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 4, "vision_cfg": {"nope": 1}}))
    with pytest.raises(OvdenseError, match="not an open_clip model config"):
        create_backbone(str(tmp_path / "bad.json"))


def test_cuda_without_gpu_is_a_clear_error(tiny_config_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(OvdenseError, match="no CUDA GPU"):
        create_backbone(str(tiny_config_path), device="cuda")
