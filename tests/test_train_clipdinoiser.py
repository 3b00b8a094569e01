"""CLIP-DINOiser's training with tools/train.py on CPU (``ovdense/mm/clipdinoiser.py``,
``configs/clipdinoiser/clipdinoiser_train_imagenet.py``): the official subset and augmentation, the
teachers' targets against the official DINO and FOUND code (mirrors of facebookresearch/dino and
valeoai/FOUND; skipped without them), the loss against the two BCE terms computed here, the optimizer's
groups and schedule, the head file, exact resume after SIGKILL, and the errors for missing teachers.

Runs use a tiny random CLIP (4 blocks, width 32, patch 8) and random ViT-S/8 teachers on 64 px crops of
a synthetic ImageNet folder; the recipe itself (ViT-B/16 CLIP and DINO, 448 px) is the config's."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tool_runs import ROOT, kill_after_checkpoint, run, short_run_options, train_command

from ovdense.errors import OvdenseError

pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

CONFIG = ROOT / "configs" / "clipdinoiser" / "clipdinoiser_train_imagenet.py"
FOUND_REPO = Path("/work/.mirror/valeoai+FOUND/repo")
ITERS = 6
SIZE = 64
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def _found_decoder(path: Path) -> Path:
    """FOUND's ``decoder_weights.pt`` from the mirror, or a random one in its layout."""
    git_dir = FOUND_REPO / ".git" if (FOUND_REPO / ".git").exists() else FOUND_REPO
    result = subprocess.run(["git", f"--git-dir={git_dir}", "show", "HEAD:data/weights/decoder_weights.pt"],
                            capture_output=True)
    if result.returncode == 0:
        path.write_bytes(result.stdout)
    else:
        torch.manual_seed(3)
        torch.save({"decoder": torch.nn.Conv2d(384, 1, 1).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic ImageNet ``train/<wnid>/*.JPEG`` (7 images of several sizes, two classes), the
    tiny CLIP's config and weights file, and FOUND's decoder."""
    from ovdense import create_backbone

    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(80, 96), (72, 100), (96, 64), (64, 64), (90, 120), (70, 70), (100, 80)]):
        folder = root / "imagenet" / "train" / f"n0000000{i % 2 + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.JPEG")
    (root / "tiny.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    backbone = create_backbone(str(root / "tiny.json"), cache_dir=root / "cache")
    torch.save(backbone.model.state_dict(), root / "tiny.pt")
    _found_decoder(root / "decoder_weights.pt")
    return root


def settings(world: Path, cache: Path) -> dict:
    return {
        "model.clip.name": str(world / "tiny.json"),
        "model.clip.pretrained": str(world / "tiny.pt"),
        "model.clip.cache_dir": str(cache),
        "model.dino.name": "dino_vits8",  # the tiny CLIP's patch; the recipe's is dino_vitb16
        "model.dino.weights": "random",
        "model.found.weights": "random",
        "model.found.decoder": str(world / "decoder_weights.pt"),
        "train_dataloader.dataset.data_root": str(world / "imagenet"),
        "train_dataloader.dataset.size": "10",
        "train_dataloader.dataset.image_size": str(SIZE),
        "train_dataloader.batch_size": "2",
        "train_dataloader.num_workers": "0",
        "train_dataloader.persistent_workers": "False",
    }


def build(world, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import DATASETS, MODELS, init_default_scope

    import ovdense.mm  # noqa: F401 - registers the modules

    init_default_scope("mmseg")
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict({k: _value(v) for k, v in settings(world, tmp_path / "cache").items()})
    torch.manual_seed(0)
    return MODELS.build(cfg.model), DATASETS.build(cfg.train_dataloader.dataset), cfg


def _value(text: str):
    return {"False": False, "True": True}.get(text, int(text) if text.isdigit() else text)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    return build(world, tmp_path_factory.mktemp("built"))


def test_the_subset_and_augmentation_are_the_officials(built, world):
    """ImageFolder's listing; ``np.random.seed(0); np.random.choice(range(n), size)`` (with replacement);
    a sample is torchvision's official Compose on ImageFolder's PIL image under the seeded generator."""
    import torchvision
    import torchvision.transforms as T

    from ovdense.mm.clipdinoiser import _AUGMENT
    from ovdense.mm.training import derive_seed

    _, dataset, _ = built
    folder = torchvision.datasets.ImageFolder(str(world / "imagenet" / "train"))
    assert dataset.samples == folder.samples
    np.random.seed(0)
    assert np.array_equal(dataset.indices, np.random.choice(list(range(len(folder))), 10))
    sample = dataset[(4, 17, 5)]
    path, _ = folder.samples[dataset.indices[4]]
    torch.manual_seed(derive_seed(5, _AUGMENT, 17))
    official = T.Compose([T.ToTensor(), T.Resize(SIZE, antialias=False), T.RandomCrop(SIZE),
                          T.RandomHorizontalFlip(p=0.5), T.ColorJitter(0.5)])
    want = official(folder.loader(path))
    assert sample["inputs"].shape == (3, SIZE, SIZE)
    assert torch.equal(sample["inputs"], want)
    assert torch.equal(dataset[(4, 17, 5)]["inputs"], sample["inputs"])
    assert not torch.equal(dataset[(4, 18, 5)]["inputs"], sample["inputs"])


# ------------------------------------------------------------------------------------------------
# The teachers against the official code


@pytest.fixture(scope="module")
def official_dino(tmp_path_factory):
    from official_vfm import import_official_dino

    return import_official_dino(tmp_path_factory.mktemp("dino"))


def _official_qkv_hook(vit, store: dict):
    vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: store.__setitem__("qkv", o))


def test_dino_target_is_the_official_value_correlation(official_dino, tmp_path):
    """DINO ViT-B/16 on 64 × 96 (a 4 × 6 grid): the official hook on ``blocks[-1].attn.qkv``, its
    ``extract_feats("v")`` reshape, per-token normalisation, ``corrs < 0.2 → 0``, ``> 0``."""
    from official_vfm import imagenet, spread

    from ovdense.backbone.vfm import create_vfm
    from ovdense.mm.clipdinoiser import dino_target

    official = official_dino.vit_base(patch_size=16, num_classes=0).eval()
    spread(official, seed=7)
    torch.save(official.state_dict(), tmp_path / "dino_vitbase16_pretrain.pth")
    ours = create_vfm("dino_vitb16", tmp_path / "dino_vitbase16_pretrain.pth")
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    store: dict = {}
    _official_qkv_hook(official, store)
    with torch.no_grad():
        official(imagenet(x))
    B, N, C3 = store["qkv"].shape
    nh = official.blocks[-1].attn.num_heads
    v = store["qkv"].reshape(B, N, 3, nh, C3 // nh // 3).permute(2, 0, 3, 1, 4)[2].transpose(1, 2)
    feats = v[:, 1:].flatten(-2, -1).permute(0, 2, 1)  # B, C, hw (cd.py:155)
    feats = feats / feats.norm(dim=1, keepdim=True)
    corrs = feats.permute(0, 2, 1) @ feats  # B, hw, hw
    values = ours.last_block_qkv(x, "v")
    assert values.shape == (2, 768, 4, 6)
    got = values.flatten(2) / values.flatten(2).norm(dim=1, keepdim=True)
    torch.testing.assert_close(got.transpose(1, 2) @ got, corrs, atol=1e-4, rtol=0)
    # random towers make most tokens alike: also a threshold at the median, so both labels occur
    for gamma in (0.2, float(corrs.median())):
        want = corrs.clone()
        want[want < gamma] = 0.0  # cd.py:160
        want = (want > 0).float()  # train.py:76
        target = dino_target(values, gamma)
        near = (corrs - gamma).abs() < 1e-4  # float rounding may flip these
        assert torch.equal(target[~near], want[~near]), gamma
    assert 0.2 < float(want.mean()) < 0.8


@pytest.fixture(scope="module")
def official_found(official_dino, tmp_path_factory):
    """valeoai/FOUND's ``model.py`` (with ``bkg_seg``, ``misc``, ``bilateral_solver``) from the
    mirror, its ``dino.vision_transformer`` the official DINO's."""
    from official_clim import mirror_checkout

    tree = mirror_checkout(FOUND_REPO, tmp_path_factory.mktemp("found"),
                           ("model.py", "bkg_seg.py", "misc.py", "bilateral_solver.py"), "FOUND mirror")
    package = types.ModuleType("dino")
    package.vision_transformer = official_dino
    saved = {k: sys.modules.get(k) for k in ("dino", "dino.vision_transformer", "model", "misc", "bkg_seg",
                                              "bilateral_solver")}
    sys.modules["dino"], sys.modules["dino.vision_transformer"] = package, official_dino
    sys.path.insert(0, str(tree))
    try:
        import model as found_model
    except ImportError as e:
        pytest.skip(f"FOUND's model.py does not import here: {e}")
    finally:
        sys.path.remove(str(tree))
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return found_model


def test_found_target_is_the_officials(official_found, official_dino, world, tmp_path, monkeypatch):
    """``FoundModel()`` built as the official (ViT-S/8, the hub weights replaced by random ones, no
    CUDA), its decoder loaded from ``decoder_weights.pt``; ``get_found_preds(x, resize=grid) > 0.5`` on
    64 × 96 (an 8 × 12 FOUND grid) resized to the CLIP ViT-B/16 grid 4 × 6 (bilinear, no antialias)."""
    import torchvision.transforms.functional as TF
    from official_vfm import imagenet, spread

    from ovdense.backbone.vfm import create_vfm
    from ovdense.mm.clipdinoiser import found_target, load_found_decoder

    donor = official_dino.vit_small(patch_size=8, num_classes=0)
    spread(donor, seed=11)
    state = donor.state_dict()
    torch.save(state, tmp_path / "dino_deitsmall8_300ep_pretrain.pth")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: dict(state))
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    found = official_found.FoundModel()
    found.decoder.load_state_dict(  # decoder_load_weights (the file holds CUDA tensors)
        torch.load(world / "decoder_weights.pt", map_location="cpu", weights_only=True)["decoder"])
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        preds, *_ = found.forward_step(imagenet(x), for_eval=True)
        preds = TF.resize(torch.sigmoid(preds).float(), [4, 6], antialias=False)  # tv 0.13.1's default
    ours = create_vfm("dino_vits8", tmp_path / "dino_deitsmall8_300ep_pretrain.pth")
    decoder = load_found_decoder(world / "decoder_weights.pt")
    keys = ours.last_block_qkv(x, "k")
    with torch.no_grad():
        mine = F.interpolate(torch.sigmoid(decoder(keys)), size=(4, 6), mode="bilinear", align_corners=False)
        target = found_target(keys, decoder, (4, 6))
    torch.testing.assert_close(mine, preds, atol=1e-4, rtol=0)
    near = (preds - 0.5).abs() < 1e-4
    assert torch.equal(target[~near], (preds > 0.5).float()[~near])


# ------------------------------------------------------------------------------------------------
# The model, the optimizer, the errors


def test_the_loss_is_the_two_bce_terms(built):
    """The model's loss against BCE(clamp(A, 0), cos ≥ 0.2) + BCE(bkg, FOUND > 0.5) computed here from
    the head's outputs and the teachers' raw tokens and decoder."""
    from mmengine.dataset import pseudo_collate

    model, dataset, _ = built
    batch = pseudo_collate([dataset[(i, i, 0)] for i in range(2)])
    losses = model(**batch, mode="loss")
    backbone, dino, found, decoder = model._frozen
    x = torch.stack(batch["inputs"])
    with torch.no_grad():
        _, c = model.head.features(backbone, backbone.normalize(x))
        bkg, A = model.head(c)
        grid = bkg.shape[-2:]
        v = dino.last_block_qkv(x, "v").flatten(2)  # B, C, hw
        v = v / v.norm(dim=1, keepdim=True)
        dino_t = ((v.transpose(1, 2) @ v) >= 0.2).float()
        k = found.last_block_qkv(x, "k")
        found_t = (F.interpolate(torch.sigmoid(decoder(k)), size=grid, mode="bilinear",
                                 align_corners=False) > 0.5).float()
        bce = torch.nn.BCEWithLogitsLoss()
        want_dino = bce(torch.where(A < 0, torch.zeros_like(A), A).flatten(-2), dino_t.flatten(-2))
        want_found = bce(bkg.flatten(-2), found_t.flatten(-2))
    torch.testing.assert_close(losses["loss_dino"].detach(), want_dino, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses["loss_found"].detach(), want_found, atol=1e-6, rtol=1e-6)
    assert 0 < float(dino_t.mean()) < 1
    (losses["loss_dino"] + losses["loss_found"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert [n for n, _ in model.named_parameters()] == ["head.bkg_decoder.weight", "head.bkg_decoder.bias",
                                                        "head.obj_proj.weight", "head.obj_proj.bias"]


@pytest.mark.filterwarnings("ignore:Detected call of")  # stepping the scheduler alone, on purpose
def test_optimizer_groups_and_schedule_are_the_officials(built):
    """AdamW: obj_proj at 5e-5, bkg_decoder at 1e-2, weight decay 0.01, torch's betas and eps; only
    the head's parameters; the lr ×0.1 from iteration 5000 (the official MultiStepLR stepped per
    iteration: iterations 0…4999 at the base rate)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    model, _, cfg = built
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    optimizer = wrapper.optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        want = 1e-2 if name.startswith("head.bkg_decoder.") else 5e-5
        assert group["lr"] == pytest.approx(want, rel=1e-12), name
        assert group["weight_decay"] == 0.01 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4
    scheduler = PARAM_SCHEDULERS.build(dict(cfg.param_scheduler[0]), default_args=dict(optimizer=wrapper))
    lrs = {}
    for t in range(5002):
        lrs[t] = sorted(g["lr"] for g in optimizer.param_groups)
        scheduler.step()
    assert lrs[4999] == pytest.approx([5e-5, 5e-5, 1e-2, 1e-2])
    assert lrs[5000] == pytest.approx([5e-6, 5e-6, 1e-3, 1e-3])
    from mmengine.config import Config

    recipe = Config.fromfile(str(CONFIG))  # the config as shipped (the tests shrink it)
    assert recipe.train_cfg.max_iters == 6300 and recipe.train_dataloader.batch_size == 16
    data = recipe.train_dataloader.dataset
    assert (data.size, data.subset_seed, data.image_size, data.antialias) == (1000, 0, 448, False)
    assert (recipe.model.dino.name, recipe.model.dino.kind) == ("dino_vitb16", "v")
    assert (recipe.model.found.name, recipe.model.found.kind) == ("dino_vits8", "k")
    assert recipe.model.gamma == 0.2 and recipe.model.clip.pretrained == "laion2b_s34b_b88k"


def test_missing_teachers_are_refused_in_one_line(world, tmp_path):
    from ovdense.mm.clipdinoiser import ImageNetSubsetDataset, OvdenseClipDinoiser, load_found_decoder

    clip = dict(name=str(world / "tiny.json"), cache_dir=str(tmp_path))
    found = dict(name="dino_vits8", weights="random", decoder=str(world / "decoder_weights.pt"))
    with pytest.raises(OvdenseError, match="dino_vitbase16_pretrain.pth"):
        OvdenseClipDinoiser(clip=clip, dino=dict(name="dino_vitb16", weights=None), found=found)
    with pytest.raises(OvdenseError, match="dino_deitsmall8_300ep_pretrain.pth"):
        OvdenseClipDinoiser(clip=clip, dino=dict(name="dino_vits8", weights="random"),
                            found=dict(found, weights=None))
    with pytest.raises(OvdenseError, match="decoder_weights.pt"):
        OvdenseClipDinoiser(clip=clip, dino=dict(name="dino_vits8", weights="random"),
                            found=dict(found, decoder=None))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(OvdenseError, match="not a readable weights file"):
        load_found_decoder(tmp_path / "bad.pt")
    torch.save({"decoder": torch.nn.Conv2d(768, 1, 1).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(OvdenseError, match="is not FOUND's decoder"):
        load_found_decoder(tmp_path / "other.pt")
    with pytest.raises(OvdenseError, match="image folder not found"):
        ImageNetSubsetDataset(str(tmp_path / "none"))


# ------------------------------------------------------------------------------------------------
# tools/train.py


def options(world, cache: Path) -> list[str]:
    return short_run_options(ITERS, settings(world, cache), {})


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted run of ITERS iterations, checkpoints every 2."""
    work = tmp_path_factory.mktemp("reference")
    run(train_command(CONFIG, work, options(world, work / "cache")), cwd=work, check=True)
    return work


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_the_head_file_is_written_and_loads(world, reference):
    """``clipdinoiser_head.safetensors`` loads through ``load_head`` on the backbone it was trained on,
    with the last checkpoint's weights, and the segmenter runs on it."""
    from ovdense import create_backbone
    from ovdense.heads.clipdinoiser import ClipDinoiserSegmenter, load_head

    backbone = create_backbone(str(world / "tiny.json"), pretrained=str(world / "tiny.pt"),
                               cache_dir=reference / "cache")
    head = load_head(reference / "clipdinoiser_head.safetensors", backbone)
    state = _state(reference / f"iter_{ITERS}.pth")
    assert sorted(state) == sorted(f"head.{k}" for k in head.state_dict())
    for key, value in head.state_dict().items():
        assert torch.equal(value, state[f"head.{key}"]), key
    start = _state(reference / "iter_2.pth")
    assert not torch.equal(state["head.bkg_decoder.weight"], start["head.bkg_decoder.weight"])
    segmenter = ClipDinoiserSegmenter(backbone, ["background", "thing"], head=head, short_side=64,
                                      window=(64, 32), templates=["{}"])
    result = segmenter.predict(np.zeros((64, 80, 3), np.uint8))
    assert result.labels.shape == (64, 80)


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(world, reference, tmp_path):
    work = tmp_path / "killed"
    opts = options(world, work / "cache")
    kill_after_checkpoint(train_command(CONFIG, work, opts), tmp_path, work / "iter_2.pth", 240)
    assert not (work / f"iter_{ITERS}.pth").exists(), "killed too late: the run had finished"
    run(train_command(CONFIG, work, opts, "--resume"), cwd=tmp_path, check=True)
    resumed, straight = _state(work / f"iter_{ITERS}.pth"), _state(reference / f"iter_{ITERS}.pth")
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
