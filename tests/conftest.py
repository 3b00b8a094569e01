"""Shared fixtures: a tiny random-weight CLIP (12 blocks so every method's layer choices exist,
width 32, patch 8, 32 px native) and a private cache folder for each test session; the shipped
toy backbone, one per module (``toy``: a text cache of its own; ``toy_env_cache``: the module's
``env_cache``, which the CLI's and the demo's runs read too); a random-init F-ViT head for the toy
backbone."""

import json
import os
from pathlib import Path

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before
# anything imports triton (open_clip does). A GPU run can set TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config_path, tmp_path_factory):
    from ovdense import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone(str(tiny_config_path), cache_dir=tmp_path_factory.mktemp("cache"))
    _spread_weights(backbone)
    return backbone


def _spread_weights(backbone):
    """Random init leaves attention nearly uniform; larger q/k weights make the attention
    variants differ visibly, so a wrong equation cannot hide behind near-equal outputs."""
    generator = torch.Generator().manual_seed(1)
    for block in backbone.model.visual.transformer.resblocks:
        w = block.attn.in_proj_weight
        w.data = torch.randn(w.shape, generator=generator) * 0.4
        block.attn.in_proj_bias.data = torch.randn(w.shape[0], generator=generator) * 0.1


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def env_cache(tmp_path_factory):
    """One text-embedding cache for the module: ``OVDENSE_CACHE`` names a fresh folder from the
    first test that asks for it (or for ``toy_env_cache``) to the module's end, so the CLI's runs,
    the demo's and the API's share it (the toy's classes are encoded once)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("OVDENSE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The shipped toy backbone, one per module, with a text-embedding cache folder of its own."""
    from ovdense import create_backbone

    return create_backbone("toy", cache_dir=tmp_path_factory.mktemp("toy-cache"))


@pytest.fixture(scope="module")
def toy_env_cache(env_cache):
    """The shipped toy backbone built as the CLI and the demo build it (no ``cache_dir``: it reads
    ``OVDENSE_CACHE``, which ``env_cache`` sets), so its text embeddings are the ones their runs read."""
    from ovdense import create_backbone

    return create_backbone("toy")


def fvit_head_config() -> dict:
    """The model of ``configs/ovdet/fvlm_toy_synthetic.py`` as ``OvdenseFViT.head_config`` (what
    ``export_head`` writes), read as plain Python: no mmengine."""
    import runpy

    config = Path(__file__).resolve().parents[1] / "configs" / "ovdet" / "fvlm_toy_synthetic.py"
    model = runpy.run_path(str(config))["model"]
    keys = ("classes", "neck", "rpn_head", "roi_head", "test_cfg", "method", "pyramid")
    return {**{k: model[k] for k in keys}, "templates": None, "indices": None}


@pytest.fixture(scope="session")
def fvit_head(tmp_path_factory) -> Path:
    """A random-init F-ViT head (Mask R-CNN, ``configs/ovdet/fvlm_toy_synthetic.py``) for the toy
    backbone, built in plain torch (``ovdense.heads.fvit.PlainFViT``: the state-dict keys and
    config that ``ovdense.mm.detection.export_head`` writes; the background embedding initialised
    from the text "background", as ``OvdenseFViT``), so the tests that use it run in the lean
    install, without mmcv, mmdet or mmengine."""
    from ovdense import create_backbone
    from ovdense.heads import fvit as det

    config = fvit_head_config()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OVDENSE_CACHE", str(tmp_path_factory.mktemp("fvit-head-cache")))
        toy = create_backbone("toy")
        torch.manual_seed(0)
        model = det.PlainFViT(toy, config)
        background = toy.encode_text(["background"], model.templates)[0]
        with torch.no_grad():
            model.roi_head.bbox_head.classifier.background.copy_(background)
        return det.save_head(tmp_path_factory.mktemp("fvit-head") / "fvit_head.safetensors",
                             model.state_dict(), toy, config)
