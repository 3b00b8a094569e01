"""CLIP-DINOiser's training (Wysoczańska et al., ECCV 2024) on mmengine: ``ImageNetSubsetDataset``
draws the official 1000 ImageNet images and augments them, ``OvdenseClipDinoiser`` trains the two
convolutions of ``ovdense/heads/clipdinoiser.py`` (``ClipDinoiserHead``) on the frozen CLIP against
its two frozen teachers, and ``ExportClipDinoiserHeadHook`` writes the head file that
``ovdense segment --method clipdinoiser --head-checkpoint`` reads.

Official code: wysoczanska/clip_dinoiser at a954aae, ``train.py`` (``main``, ``do_train``),
``configs/clip_dinoiser.yaml`` (``train``), ``models/clip_dinoiser/clip_dinoiser.py`` (``cd.py``:
``forward_pass``, ``get_dino_corrs``, ``get_found_preds``) and valeoai/FOUND at 1ad22ba ``model.py``
(``FoundModel``). Per iteration, on images ``x [B, 3, S, S]`` in ``[0, 1]`` (S = 448, h = w = S/16)::

    c        = CLIP's block L−3 ``ln_2`` tap                         [B, W, h, w]   (frozen)
    bkg, A   = head(c);  A = max(A, 0)                                [B, 1, h, w], [B, hw, hw]
    F        = DINO ViT-B/16 last-block value tokens, L2-normalised   [B, 768, hw]   (cd.py:122-162)
    T_dino   = (FᵀF ≥ 0.2)                                            [B, hw, hw]
    k        = DINO ViT-S/8 last-block key tokens                     [B, 384, 2h, 2w]
    T_found  = resize(sigmoid(decoder(k)), (h, w)) > 0.5              [B, 1, h, w]   (cd.py:177-190)
    loss     = BCEWithLogits(A, T_dino) + BCEWithLogits(bkg, T_found)  (means; train.py:65-79)

Exact resume: ``SeededInfiniteSampler`` + ``SeededIterBasedTrainLoop`` (``ovdense/mm/training.py``);
each sample's augmentation is torchvision's own transforms run under the global generators seeded
from ``(seed, draw)``. Departures from the official recipe are listed in
``configs/clipdinoiser/clipdinoiser_train_imagenet.py`` and ``docs/clipdinoiser_training.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, MODELS
from torch import nn

from ovdense.backbone.clip import ClipBackbone, create_backbone
from ovdense.backbone.vfm import create_vfm
from ovdense.errors import OvdenseError, checkpoint_error_text
from ovdense.heads.clipdinoiser import ClipDinoiserConfig, ClipDinoiserHead, save_head
from ovdense.io import load_image
from ovdense.mm.training import derive_seed, global_share, seeded_global_rng

_AUGMENT = 0xC11D  # derive_seed stream of a sample's augmentation
#: torchvision.datasets.folder.IMG_EXTENSIONS (what ImageFolder lists)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOUND_DECODER = "data/weights/decoder_weights.pt"  # valeoai/FOUND; clip_dinoiser: models/FOUND/...
GAMMA = 0.2  # configs/clip_dinoiser.yaml: gamma (the DINO correlation threshold)
FOUND_THRESHOLD = 0.5  # train.py:73


def image_folder(root: str | os.PathLike) -> list[tuple[str, int]]:
    """``torchvision.datasets.ImageFolder(root).samples``: ``(path, class index)`` for the sorted
    class folders, each walked in sorted order (``folder.make_dataset``), image extensions only."""
    root = Path(root)
    if not root.is_dir():
        raise OvdenseError(f"image folder not found: {root} (the ImageNet layout: ROOT/train/<wnid>/*.JPEG)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    samples = []
    for index, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples += [(os.path.join(folder, f), index) for f in sorted(files)
                        if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise OvdenseError(f"{root} holds no images in class folders (the ImageNet layout: "
                           "ROOT/train/<wnid>/*.JPEG)")
    return samples


def official_subset(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``train.py:203-205`` after ``np.random.seed(seed)``: ``size`` indices of ``count`` images
    drawn uniformly **with replacement** (``np.random.choice``), the same indices the official run takes."""
    return np.random.RandomState(seed).choice(np.arange(count), size)


@DATASETS.register_module()
class ImageNetSubsetDataset:
    """CLIP-DINOiser's training images: ``size`` draws with replacement (``official_subset``) from
    the ImageFolder ``data_root/split``, each augmented as ``train.py:156-157``: ``ToTensor →
    Resize(image_size) → RandomCrop(image_size) → RandomHorizontalFlip(0.5) → ColorJitter(0.5)``
    (brightness only), torchvision's transforms run under the global generators seeded from
    ``(seed, draw)``. ``inputs``: ``[3, S, S]`` RGB in ``[0, 1]``; labels are not used.

    Args:
        data_root, split: the images are ``data_root/split/<class>/*`` (ImageNet's ``train``).
        size: the number of draws (``ds_size``, 1000); ``None``: every image, in order.
        subset_seed: the seed of ``np.random.seed`` before the draws (the config's ``seed``, 0).
        image_size: ``im_size`` (448).
        antialias: the tensor ``Resize``'s antialias; ``False`` as torchvision 0.13.1, the version
            the official README installs (0.17 and later default to ``True``).
    Keys are ``(index, draw, seed)`` from ``SeededInfiniteSampler``; a plain integer is ``(i, i, 0)``.
    """

    def __init__(self, data_root: str, split: str = "train", size: int | None = 1000, subset_seed: int = 0,
                 image_size: int = 448, antialias: bool = False):
        self.samples = image_folder(Path(data_root, split))
        self.indices = (np.arange(len(self.samples)) if size is None
                        else official_subset(len(self.samples), int(size), subset_seed))
        self.image_size, self.antialias = int(image_size), bool(antialias)
        self.metainfo = dict(images=len(self.samples), draws=len(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    def transform(self):
        import torchvision.transforms as T

        S = self.image_size
        return T.Compose([T.ToTensor(), T.Resize(S, antialias=self.antialias), T.RandomCrop(S),
                          T.RandomHorizontalFlip(p=0.5), T.ColorJitter(0.5)])

    def __getitem__(self, key) -> dict:
        index, draw, seed = (key, key, 0) if isinstance(key, int) else key
        path, label = self.samples[int(self.indices[index])]
        rgb = np.array(load_image(path))  # H, W, 3 uint8 (a writable copy for ToTensor)
        with seeded_global_rng(derive_seed(seed, _AUGMENT, draw)):
            x = self.transform()(rgb)  # 3, S, S
        return dict(inputs=x, data_samples=dict(label=label, draw=int(draw)))


def load_found_decoder(path: str | os.PathLike, width: int = 384) -> nn.Conv2d:
    """FOUND's trained decoder (``FoundModel.decoder``: ``Conv2d(384, 1, 1)``) from its
    ``decoder_weights.pt`` (``{"decoder": {"weight": [1, 384, 1, 1], "bias": [1]}}``,
    ``decoder_save_weights``), read as tensors only, frozen.

    Raises:
        OvdenseError: a missing or unreadable file, or one that is not FOUND's decoder.
    """
    file = Path(path) if path is not None else None
    if file is None or not file.is_file():
        raise OvdenseError(f"FOUND's decoder weights not found: {file}; it is {FOUND_DECODER} of "
                           f"valeoai/FOUND (also models/FOUND/{FOUND_DECODER} in wysoczanska/clip_dinoiser); "
                           "pass its path as model.found.decoder")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's wrong file
        raise OvdenseError(f"{file} is not a readable weights file ({checkpoint_error_text(e)})") from e
    state = state.get("decoder", state) if isinstance(state, dict) else state
    decoder = nn.Conv2d(width, 1, (1, 1))
    shapes = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else None
    if shapes != {k: tuple(v.shape) for k, v in decoder.state_dict().items()}:
        raise OvdenseError(f"{file} is not FOUND's decoder (Conv2d({width}, 1, 1): weight "
                           f"[1, {width}, 1, 1], bias [1]); it holds {shapes}")
    decoder.load_state_dict({k: v.float() for k, v in state.items()})
    return decoder.eval().requires_grad_(False)


def dino_target(values: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """``get_dino_corrs`` + ``train.py:76``: ``values [B, C, h, w]`` (DINO's last-block value tokens)
    L2-normalised per token, their cosines ``[B, hw, hw]``, 1 where ``≥ gamma`` (``corrs[corrs < γ] = 0``
    then ``> 0``; a cosine of exactly 0 with γ ≤ 0 stays 0, as the official)."""
    feats = values.flatten(2)  # B, C, hw
    feats = feats / feats.norm(dim=1, keepdim=True)  # cd.py:158 (no epsilon, as the official)
    corrs = feats.transpose(1, 2) @ feats  # B, hw, hw
    corrs = torch.where(corrs < gamma, torch.zeros_like(corrs), corrs)
    return (corrs > 0).float()


def found_target(keys: torch.Tensor, decoder: nn.Module, grid: tuple[int, int], antialias: bool = False,
                 threshold: float = FOUND_THRESHOLD) -> torch.Tensor:
    """``get_found_preds(x, resize=grid) > 0.5`` (``cd.py:177-190``, ``train.py:72-73``): FOUND's
    decoder on the ViT-S/8 keys ``[B, 384, h', w']``, sigmoid, resized bilinearly to ``grid``
    (``T.functional.resize``; antialias off as torchvision 0.13.1), thresholded: ``[B, 1, h, w]``."""
    import torchvision.transforms.functional as TF

    preds = torch.sigmoid(decoder(keys)).float()  # B, 1, h', w'
    preds = TF.resize(preds, list(grid), antialias=antialias)  # B, 1, h, w
    return (preds > threshold).float()


@MODELS.register_module()
class OvdenseClipDinoiser(BaseModel):
    """CLIP-DINOiser's student and teachers. Only ``head`` (``obj_proj``, ``bkg_decoder``) is this
    model's state: the CLIP and both teachers are frozen and kept outside the module tree (never in a
    checkpoint or the optimizer), moved to the inputs' device on first use.

    Args:
        clip: ``create_backbone`` arguments (official: ``ViT-B-16``, ``laion2b_s34b_b88k``).
        head: ``ClipDinoiserConfig`` fields (``tap`` −3, ``proj_dim`` 256, ``kernel`` 3).
        dino: ``create_vfm`` arguments of the correlation teacher (``dino_vitb16``, the official
            ``dino_vitbase16_pretrain.pth``) and ``kind``, its last-block tokens (``"v"``).
        found: ``create_vfm`` arguments of FOUND's encoder (``dino_vits8``), ``kind`` (``"k"``) and
            ``decoder``, the path of FOUND's ``decoder_weights.pt``.
        gamma: the DINO correlation threshold (0.2).
        antialias: the FOUND map's resize (``False``, torchvision 0.13.1).
    """

    def __init__(self, clip: Mapping, dino: Mapping, found: Mapping, head: Mapping | None = None,
                 gamma: float = GAMMA, antialias: bool = False, data_preprocessor=None, init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        backbone = clip if isinstance(clip, ClipBackbone) else create_backbone(**dict(clip))
        self.head = ClipDinoiserHead(backbone, ClipDinoiserConfig(**dict(head or {})))
        dino, found = dict(dino), dict(found)
        self.dino_kind, self.found_kind = dino.pop("kind", "v"), found.pop("kind", "k")
        decoder_path = found.pop("decoder", None)
        dino_vfm = create_vfm(**dino)
        found_vfm = create_vfm(**found)
        decoder = load_found_decoder(decoder_path, found_vfm.width)
        self._frozen = (backbone, dino_vfm, found_vfm, decoder)  # a tuple: not this model's modules
        for part in self._frozen[1:]:
            part.eval().requires_grad_(False)
        self.gamma, self.antialias = float(gamma), bool(antialias)

    @property
    def backbone(self) -> ClipBackbone:
        return self._frozen[0]

    def _place(self, device: torch.device) -> None:
        backbone, dino, found, decoder = self._frozen
        if backbone.device != device:
            backbone.model.to(device).requires_grad_(False)
        for part in (dino, found, decoder):
            part.to(device)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teachers' targets for images ``x [B, 3, H, W]`` in ``[0, 1]`` (multiples of both
        teachers' patches): DINO ``[B, hw, hw]`` and FOUND ``[B, 1, h, w]`` on the CLIP ``grid``."""
        _, dino, found, decoder = self._frozen
        values = dino.last_block_qkv(x, self.dino_kind)  # B, 768, h, w
        if tuple(values.shape[-2:]) != tuple(grid):
            raise OvdenseError(f"the DINO teacher's grid {tuple(values.shape[-2:])} is not the CLIP grid "
                               f"{grid}: use a teacher with CLIP's patch size ({self.backbone.patch_size})")
        keys = found.last_block_qkv(x, self.found_kind)  # B, 384, h', w'
        return dino_target(values, self.gamma), found_target(keys, decoder, grid, self.antialias)

    def student(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_pass`` (``cd.py:255-271``) with ``A[A < 0] = 0`` (``train.py:70``): ``bkg
        [B, 1, h, w]`` and ``A [B, hw, hw]``; the CLIP pass runs without gradients."""
        with torch.no_grad():
            _, c = self.head.features(self.backbone, self.backbone.normalize(x).to(self.backbone.dtype))
        bkg, A = self.head(c)  # B, 1, h, w; B, hw, hw
        return bkg, A.clamp(min=0.0)

    def forward(self, inputs: Sequence[torch.Tensor], data_samples=None, mode: str = "loss"):
        """``inputs``: the images ``[3, S, S]`` in ``[0, 1]`` (``ImageNetSubsetDataset``)."""
        if mode != "loss":
            raise OvdenseError(f"OvdenseClipDinoiser only trains (mode 'loss'), got mode {mode!r}: "
                               "segment with the exported head (ovdense segment --method clipdinoiser "
                               "--head-checkpoint)")
        x = torch.stack(list(inputs)).float()  # B, 3, S, S
        self._place(x.device)
        p = self.backbone.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise OvdenseError(f"training images must be a multiple of CLIP's patch ({p} px), got "
                               f"{tuple(x.shape[-2:])}")
        bkg, A = self.student(x)
        dino, found = self.targets(x, tuple(bkg.shape[-2:]))
        loss_dino = F.binary_cross_entropy_with_logits(A.float(), dino)
        loss_found = F.binary_cross_entropy_with_logits(bkg.float().flatten(-2), found.flatten(-2))
        # DDP averages over processes; each process's loss is a mean over its own images
        share = global_share(len(x), x.device)
        return dict(loss_dino=loss_dino * share, loss_found=loss_found * share)


@HOOKS.register_module()
class ExportClipDinoiserHeadHook(Hook):
    """After training (process 0): ``WORK_DIR/filename``, the head file (``heads.clipdinoiser.save_head``)."""

    priority = "LOW"

    def __init__(self, filename: str = "clipdinoiser_head.safetensors"):
        self.filename = filename

    def after_train(self, runner) -> None:
        from mmengine.dist import is_main_process
        from mmengine.model import is_model_wrapper

        if not is_main_process():
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        path = save_head(os.path.join(runner.work_dir, self.filename), model.head, model.backbone)
        runner.logger.info(f"CLIP-DINOiser head: {path} (ovdense segment --method clipdinoiser "
                           f"--head-checkpoint {path})")
