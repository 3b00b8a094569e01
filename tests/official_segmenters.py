"""The official code of two segmenters, read from mirrors, for the tests that compare ovdense with it and
for ``tools/benchmarks/segment.py --methods``: CLIPer (linsun449/cliper.code with OpenAI's ``clip``;
tests/test_cliper.py) and CLIP-DINOiser (wysoczanska/clip_dinoiser with open_clip 2.24; tests/
test_clipdinoiser.py). Each ``OVDENSE_*_REPO`` names a mirror (a bare git repository, or a clone); without
it ``mirror_checkout`` / ``checkout_ref`` skip (``pytest.skip``: a caller outside pytest catches
``pytest.skip.Exception``).

Each builder takes the weights of an ovdense backbone (its open_clip model), so that both sides run the
same random weights.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from official_clim import mirror_checkout
from torch import nn

CLIPER_REPO = Path(os.environ.get("OVDENSE_CLIPER_REPO", "/work/.mirror/linsun449+cliper.code/repo"))
OPENAI_CLIP_REPO = Path(os.environ.get("OVDENSE_OPENAI_CLIP_REPO", "/work/.mirror/openai+CLIP/repo"))
CD_REPO = Path(os.environ.get("OVDENSE_CLIPDINOISER_REPO", "/work/.mirror/wysoczanska+clip_dinoiser/repo"))
OC_REPO = Path(os.environ.get("OVDENSE_OPEN_CLIP_REPO", "/work/.mirror/mlfoundations+open_clip/repo"))
OC_TAG = "v2.24.0"  # clip_dinoiser requirements.txt: open_clip_torch==2.24


# --------------------------------------------------------------------------------------------
# CLIPer (linsun449/cliper.code)

#: the names the CLIPer checkout imports (restored afterwards: no other code sees them)
_CLIPER_MODULES = ("clip", "modified_clip", "ovs", "util", "diffusion_model", "texttable")


def _is_cliper(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in _CLIPER_MODULES)


def import_cliper(dest: Path) -> SimpleNamespace:
    """``modified_clip.model``, ``ovs.pipeline`` and ``util.miou`` of the CLIPer mirror with OpenAI's ``clip``
    package of its mirror, stand-ins for ``diffusion_model.stable_diffusion`` (the refinement, off) and
    ``texttable`` (the mIoU table)."""
    mirror_checkout(CLIPER_REPO, dest, ("modified_clip", "ovs", "util"), "OVDENSE_CLIPER_REPO")
    mirror_checkout(OPENAI_CLIP_REPO, dest, ("clip",), "OVDENSE_OPENAI_CLIP_REPO")
    own = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_cliper(name)}
    stable_diffusion = types.ModuleType("diffusion_model.stable_diffusion")
    stable_diffusion.diffusion = None
    sys.modules.update({"diffusion_model": types.ModuleType("diffusion_model"),
                        "diffusion_model.stable_diffusion": stable_diffusion,
                        "texttable": types.SimpleNamespace(Texttable=object)})
    sys.path.insert(0, str(dest))
    try:
        import clip
        import modified_clip.model as model
        import ovs.pipeline as pipeline
        import util.miou as miou
    finally:
        sys.path.remove(str(dest))
        for name in [name for name in sys.modules if _is_cliper(name)]:
            sys.modules.pop(name)
        sys.modules.update(own)
    assert model.clip is clip and pipeline.CLIPer is model.CLIPer
    return SimpleNamespace(clip=clip, model=model, pipeline=pipeline, miou=miou)


def cliper_clip(official: SimpleNamespace, model: nn.Module) -> nn.Module:
    """An open_clip ``CLIP`` (a backbone's ``model``) as OpenAI's ``clip.model.CLIP`` (the official side;
    the key names are the same): the sizes read from its weights and modules, its heads (OpenAI's CLIP
    gives its towers ``width // 64``), its MLP activation (OpenAI's is QuickGELU), its weights (strict)."""
    state = model.state_dict()
    visual, text = model.visual, model.transformer
    width, patch = state["visual.conv1.weight"].shape[0], state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_heads = visual.transformer.resblocks[0].attn.num_heads
    theirs = official.clip.model.CLIP(
        state["visual.proj"].shape[1], grid * patch, len(visual.transformer.resblocks), width, patch,
        state["positional_embedding"].shape[0], state["token_embedding.weight"].shape[0],
        state["ln_final.weight"].shape[0], text.resblocks[0].attn.num_heads, len(text.resblocks))
    if vision_heads != width // 64:
        theirs.visual = official.clip.model.VisionTransformer(
            input_resolution=grid * patch, patch_size=patch, width=width, heads=vision_heads,
            layers=len(visual.transformer.resblocks), output_dim=state["visual.proj"].shape[1])
    for mine, other in zip([*visual.transformer.resblocks, *text.resblocks],
                           [*theirs.visual.transformer.resblocks, *theirs.transformer.resblocks]):
        if type(mine.mlp.gelu).__name__ != type(other.mlp.gelu).__name__:
            other.mlp.gelu = copy.deepcopy(mine.mlp.gelu)
    theirs.load_state_dict(state, strict=True)
    return theirs.eval()


def cliper_config(size: int, crop: int = 0, select_layer: int = -1, thr: float = 0.2, scale: int = 50,
                  **more) -> SimpleNamespace:
    """An official config (``scripts/config/*.yaml`` with ``util/args.py``'s defaults), no refinement."""
    return SimpleNamespace(model_name="ViT-B/16", attn_type="fused-attn", fuse_feature=True, size=size,
                           select_layer=select_layer, logit_scale=scale, sliding_crop_size=crop,
                           attention_thr=thr, **more)


def official_cliper(official: SimpleNamespace, clip_model: nn.Module, cfg, patch: pytest.MonkeyPatch,
                    build=None):
    """A fresh ``CLIPer`` (or ``build(cfg, "cpu")``, e.g. the ``Pipeline``) whose ``clip.load`` returns a
    copy of ``clip_model`` (``CLIPer.modify()`` rebinds the model's forward: one model per instance) with
    OpenAI's preprocessing; ``patch`` keeps ``clip.load`` replaced (undo it when done)."""
    clip = official.clip
    resolution = clip_model.visual.input_resolution
    patch.setattr(clip, "load", lambda name, device="cpu", jit=False, download_root=None: (
        copy.deepcopy(clip_model), clip.clip._transform(resolution)))
    return (build or official.model.CLIPer)(cfg, "cpu")


def cliper_labels(official: SimpleNamespace, pipe, img: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor,
                  size: tuple[int, int], cfg) -> torch.Tensor:
    """The official ``Pipeline`` (no refinement) on ``img [1, 3, H', W']`` and ``main_ovs.py:46-49`` as
    written there, ``cam_to_label`` included, at the image's ``size``: labels ``[1, H, W]``."""
    ori_height, ori_width = size
    pred_mask, final_score = pipe(None, img, fg, bg)
    # main_ovs.py:46-49
    pred_mask = F.interpolate(pred_mask[None], size=(ori_height, ori_width), mode='bilinear')[0]
    pred_mask = pred_mask / (pred_mask.amax((-1, -2), keepdim=True) + 1e-5) * final_score[..., None, None]
    _, arg_mask = official.miou.cam_to_label(pred_mask[None].clone(), cls_label=final_score[None],
                                             bkg_thre=cfg.bkg_thre, cls_thre=cfg.score_threshold,
                                             is_normalize=cfg.is_normalize)
    return arg_mask


# --------------------------------------------------------------------------------------------
# CLIP-DINOiser (wysoczanska/clip_dinoiser)


def checkout_ref(repo: Path, dest: Path, ref: str, paths: tuple[str, ...], variable: str) -> Path:
    """``mirror_checkout`` at ``ref`` (a tag) instead of HEAD, or skip, naming ``variable``."""
    if not repo.is_dir():
        pytest.skip(f"no mirror at {repo} (set {variable})")
    git_dir = repo / ".git" if (repo / ".git").exists() else repo
    result = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "--format=tar", ref, "--", *paths],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"{repo} lacks {ref}:{paths}: {result.stderr.decode(errors='replace').strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        archive.extractall(dest, **safe)
    return dest


class Registry:
    """mmcv 1.x ``Registry`` as ``models/builder.py`` uses it: ``register_module()`` and
    ``build(cfg, default_args)`` (``cfg['type']`` names the class, ``default_args`` fill the rest)."""

    def __init__(self, name, parent=None):
        self.name, self.modules = name, {}

    def register_module(self, name=None, force=False, module=None):
        def register(cls):
            self.modules[name or cls.__name__] = cls
            return cls
        return register

    def build(self, cfg, default_args=None):
        cfg = dict(cfg)
        kind = cfg.pop("type")
        for key, value in (default_args or {}).items():
            cfg.setdefault(key, value)
        return self.modules[kind](**cfg)


def resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None, warning=True):
    """mmseg 0.27 ``mmseg.ops.resize`` (``mmseg/ops/wrappers.py``) without its warning: ``F.interpolate``."""
    return F.interpolate(input, size, scale_factor, mode, align_corners)


def _is_replaced(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ("open_clip", "mmcv", "mmseg", "models"))


def import_clip_dinoiser(dest: Path) -> SimpleNamespace:
    """The official ``models`` package of clip_dinoiser with open_clip 2.24 as ``open_clip``, the
    stand-ins as ``mmcv.utils`` / ``mmseg.ops``, during the import only (pip's open_clip, mmcv and mmseg
    come back after; the official modules keep their own references)."""
    tree = mirror_checkout(CD_REPO, dest / "cd", ("models", "configs"), "OVDENSE_CLIPDINOISER_REPO")
    oc = checkout_ref(OC_REPO, dest / "oc", OC_TAG, ("src/open_clip",), "OVDENSE_OPEN_CLIP_REPO")
    import open_clip as pip_open_clip

    import ovdense.backbone.clip  # noqa: F401 - ovdense binds pip's open_clip first

    own = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_replaced(name)}
    mmcv, mmseg = types.ModuleType("mmcv"), types.ModuleType("mmseg")
    mmcv.utils, mmseg.ops = types.ModuleType("mmcv.utils"), types.ModuleType("mmseg.ops")
    mmcv.utils.Registry, mmseg.ops.resize = Registry, resize
    sys.modules.update({"mmcv": mmcv, "mmcv.utils": mmcv.utils, "mmseg": mmseg, "mmseg.ops": mmseg.ops})
    folders = [str(oc / "src"), str(tree)]
    sys.path[:0] = folders
    try:
        import models  # noqa: F401
        import open_clip as oc224

        names = ("models.builder", "models.maskclip.maskclip", "models.clip_dinoiser.clip_dinoiser",
                 "models.maskclip.utils.prompt_templates")
        found = {name.split(".")[-1]: sys.modules[name] for name in names}  # models.maskclip is rebound (Q16)
    finally:
        for name in [name for name in sys.modules if _is_replaced(name)]:
            sys.modules.pop(name)
        sys.path[:] = [p for p in sys.path if p not in folders]
        sys.modules.update(own)
    import open_clip

    assert open_clip is pip_open_clip and oc224 is not pip_open_clip
    assert oc224.version.__version__ == "2.24.0"
    assert found["maskclip"].create_model_from_pretrained is oc224.create_model_from_pretrained
    return SimpleNamespace(open_clip=oc224, tree=tree, **found)


def clip_dinoiser_clip(off: SimpleNamespace, backbone, config: dict | None = None) -> nn.Module:
    """A backbone's weights in the official open_clip 2.24 ``CLIP`` (the official code needs width 768):
    built from ``config`` (default: pip open_clip's config of ``backbone.name``, e.g. ``ViT-B-16``, or the
    JSON file it names) and loaded strictly."""
    import open_clip

    if config is None and Path(backbone.name).is_file():
        config = json.loads(Path(backbone.name).read_text())
    config = config or open_clip.get_model_config(backbone.name)
    if config is None:
        raise ValueError(f"no open_clip config for {backbone.name!r}: pass config=")
    clip = off.open_clip.CLIP(**config).eval()
    clip.load_state_dict(backbone.model.state_dict(), strict=True)
    return clip


def official_clip_dinoiser(off: SimpleNamespace, clip: nn.Module, class_names, head_state: dict,
                           patch: pytest.MonkeyPatch) -> nn.Module:
    """``build_model(configs/clip_dinoiser.yaml model, class_names)`` as ``main_eval.py:37-47`` builds it,
    with ``checkpoints/last.pt``'s tensors (``head_state``) loaded ``strict=False``; both CLIPs it creates
    are ``clip`` (official open_clip 2.24, width 768: ``cd.py:232``). ``patch`` changes the cwd and
    ``create_model_from_pretrained`` (undo it when done)."""
    from omegaconf import OmegaConf

    patch.setattr(off.maskclip, "create_model_from_pretrained",
                  lambda name, pretrained=None, **kwargs: (copy.deepcopy(clip), None))
    patch.chdir(off.tree)  # configs/maskclip.yaml is read relative to the cwd (cd.py:39)
    config = OmegaConf.load("configs/clip_dinoiser.yaml").model
    model = off.builder.build_model(config, class_names=class_names)
    result = model.load_state_dict(head_state, strict=False)
    assert not result.unexpected_keys and all(k.startswith("clip_backbone.") for k in result.missing_keys)
    return model.eval()


def clip_dinoiser_slide(model, x: torch.Tensor, crop: int, stride: int, ori: tuple[int, int]):
    """mmseg 0.27 ``EncoderDecoder.slide_inference`` with ``DinoCLIP_Infrencer.encode_decode``
    (``clip_dinoiser_eval.py:27-36``): the windows' average ``[1, K, H, W]``; and with ``rescale=True``
    and ``inference``'s softmax, ``[1, K, *ori]``."""
    _, _, H, W = x.shape
    h_grids = max(H - crop + stride - 1, 0) // stride + 1
    w_grids = max(W - crop + stride - 1, 0) // stride + 1
    preds, count = None, x.new_zeros((1, 1, H, W))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, H), min(x1 + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            img = x[:, :, y1:y2, x1:x2]
            with torch.no_grad():
                seg = resize(model(img), size=img.shape[-2:], mode="bilinear", align_corners=False)
            preds = x.new_zeros((1, seg.shape[1], H, W)) if preds is None else preds
            preds += F.pad(seg, (x1, W - x2, y1, H - y2))
            count[:, :, y1:y2, x1:x2] += 1
    preds = preds / count
    return preds, F.softmax(resize(preds, size=ori, mode="bilinear", align_corners=False), dim=1)
