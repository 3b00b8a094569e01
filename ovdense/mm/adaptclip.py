"""AdaptCLIP's training (Gao et al., AAAI 2026; gaobb/AdaptCLIP ``train.py``) on mmengine:
``AnomalyPairDataset`` pairs each image of an anomaly dataset (MVTec AD or VisA layout) with one normal
image of its category, ``OvdenseAdaptClip`` trains the three adapters on the frozen backbone with the
official losses (``ovdense/train/adaptclip.py``), and ``ExportAdaptClipHook`` writes the head file that
``AdaptClip(backbone, head_checkpoint=PATH)``, ``ovdense anomaly --method adaptclip`` and
``ovdense anomaly-eval`` read.

The published protocol trains on one dataset's **test** split (every image, normal and anomalous, with
its mask) and evaluates on another dataset: MVTec AD → VisA and VisA → MVTec AD; the categories of the
evaluation dataset are never seen. ``split="test"`` is therefore the default here, as in the official
``Dataset(mode="train")``, which reads ``meta.json``'s ``test`` entries and draws the paired normal image
from its ``train`` entries.

Exact resume: ``SeededInfiniteSampler`` + ``SeededIterBasedTrainLoop`` (``ovdense/mm/training.py``): the
paired normal image of each sample derives from ``(seed, draw)`` alone. Several processes
(``torchrun … --launcher pytorch``) train under ``MMDistributedDataParallel``. Batch-norm statistics
are each process's own batch (the official trains on one GPU); set ``sync_bn`` in the config to share them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, MODELS
from PIL import Image

from ovdense.anomaly import adaptclip as ac
from ovdense.backbone.clip import ClipBackbone, create_backbone
from ovdense.data.anomaly_datasets import iter_mvtec, iter_visa, mvtec_categories, visa_categories
from ovdense.errors import OvdenseError
from ovdense.io import load_image
from ovdense.mm.training import derive_seed
from ovdense.train import adaptclip as training

_PAIR = 0xADA9  # derive_seed stream of a sample's paired normal image
LAYOUTS = {"mvtec": (mvtec_categories, iter_mvtec), "visa": (visa_categories, iter_visa)}


@DATASETS.register_module()
class AnomalyPairDataset:
    """The images of an anomaly dataset as AdaptCLIP training samples: ``inputs`` the image
    ``[3, S, S]`` in ``[0, 1]`` (bicubic to ``image_size``, as the official transform),
    ``data_samples`` ``{"prompts": [K, 3, S, S]`` (K normal training images of the category, drawn with
    replacement), ``"mask": [S, S]`` (the mask resized bilinearly, then ``> 0.5``, as the official target
    transform), ``"label": 0 or 1}``.

    Args:
        root: the dataset's folder (MVTec AD: holding ``bottle/``, …; VisA: holding ``split_csv/``).
        layout: ``"mvtec"`` or ``"visa"``.
        split: the images trained on (``"test"``, the published protocol; ``"train"``: normal only).
        categories: the categories used (default: all).
        exclude_defects: MVTec defect folders left out (a held-out defect kind).
        image_size: the square side (518 for ViT-L/14@336).
        shots: normal images paired with each sample (1, the official).
    Keys are ``(index, draw, seed)`` from ``SeededInfiniteSampler``; a plain integer is ``(i, i, 0)``.
    """

    def __init__(self, root: str, layout: str = "mvtec", split: str = "test",
                 categories: Sequence[str] | None = None,
                 exclude_defects: Sequence[str] = (), image_size: int = 518, shots: int = 1):
        if layout not in LAYOUTS:
            raise OvdenseError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        if shots < 1:
            raise OvdenseError(f"shots must be ≥ 1, got {shots}")
        list_categories, iterate = LAYOUTS[layout]
        available = list_categories(root)
        categories = list(categories or available)
        unknown = sorted(set(categories) - set(available))
        if unknown:
            raise OvdenseError(f"categories {unknown} are not in {root}; it has {available}")
        self.samples = [s for c in categories for s in iterate(root, c, split)
                        if s.defect not in exclude_defects]
        self.normals = {c: [s.image for s in iterate(root, c, "train")] for c in categories}
        empty = [c for c, images in self.normals.items() if not images]
        if not self.samples or empty:
            raise OvdenseError(f"{root}: no {split} images to train on" if not self.samples else
                               f"{root}: categories {empty} have no normal training images to pair with")
        self.image_size, self.shots = int(image_size), int(shots)
        self.metainfo = dict(layout=layout, split=split, categories=categories)

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, path) -> torch.Tensor:
        S = self.image_size
        rgb = np.asarray(Image.fromarray(load_image(path)).resize((S, S), Image.BICUBIC))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255

    def __getitem__(self, key) -> dict:
        index, draw, seed = (key, key, 0) if isinstance(key, int) else key
        sample = self.samples[index]
        rng = random.Random(derive_seed(seed, _PAIR, draw))
        normals = self.normals[sample.category]
        prompts = torch.stack([self._image(normals[rng.randrange(len(normals))]) for _ in range(self.shots)])
        S = self.image_size
        if sample.mask is None:
            mask = torch.zeros(S, S)
        else:
            with Image.open(sample.mask) as pil:
                binary = Image.fromarray(((np.asarray(pil.convert("L")) > 0) * 255).astype(np.uint8))
            resized = np.asarray(binary.resize((S, S), Image.BILINEAR), dtype=np.float32) / 255
            mask = torch.from_numpy((resized > 0.5).astype(np.float32))
        return dict(inputs=self._image(sample.image),
                    data_samples=dict(prompts=prompts, mask=mask, label=sample.label))


@MODELS.register_module()
class OvdenseAdaptClip(BaseModel):
    """AdaptCLIP's adapters (``head``, this model's only module) trained on the frozen backbone (kept
    outside the module tree: never in a checkpoint or the optimizer).

    Args:
        clip: ``create_backbone`` arguments (``name``, ``pretrained``, …).
        head: ``AdaptClipConfig`` fields (``image_size``, ``taps``, …).
    """

    def __init__(self, clip: Mapping, head: Mapping | None = None, data_preprocessor=None, init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        backbone = clip if isinstance(clip, ClipBackbone) else create_backbone(**dict(clip))
        fields = dict(head or {})
        if "taps" in fields:
            fields["taps"] = tuple(fields["taps"])
        self.head = ac.AdaptClipHead(backbone, ac.AdaptClipConfig(**fields))
        self._backbone = (backbone,)
        self.register_buffer("static", ac.static_text(backbone), persistent=False)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self) -> ClipBackbone:
        return self._backbone[0]

    def forward(self, inputs: Sequence[torch.Tensor], data_samples: Mapping | None = None,
                mode: str = "loss"):
        """``inputs``: images ``[3, S, S]`` in ``[0, 1]``; ``data_samples``: ``{"prompts": [[K, 3, S, S]],
        "mask": [[S, S]], "label": [int]}`` (``pseudo_collate`` of ``AnomalyPairDataset``'s samples)."""
        if mode != "loss":
            raise OvdenseError(f"OvdenseAdaptClip only trains (mode 'loss'), got mode {mode!r}: evaluate the "
                               "exported head with ovdense anomaly-eval --method adaptclip")
        if len(inputs) < 2:
            raise OvdenseError("AdaptCLIP's adapters hold batch norms: each process needs at least 2 "
                               "images a batch (train_dataloader.batch_size ≥ 2)")
        queries = (torch.stack(list(inputs)) - self.mean) / self.std
        prompts = torch.stack(list(data_samples["prompts"]))  # B, K, 3, S, S
        prompts = (prompts - self.mean[:, None]) / self.std[:, None]
        masks = torch.stack(list(data_samples["mask"])).to(queries.device)
        labels = torch.as_tensor(list(data_samples["label"]), device=queries.device)
        return training.losses(self.backbone, self.head, self.static, queries, prompts.to(queries.device),
                               masks, labels)


@HOOKS.register_module()
class ExportAdaptClipHook(Hook):
    """After training (process 0): ``WORK_DIR/filename``, the adapters (``adaptclip.save_head``)."""

    priority = "LOW"

    def __init__(self, filename: str = "adaptclip_head.safetensors"):
        self.filename = filename

    def after_train(self, runner) -> None:
        from mmengine.dist import is_main_process
        from mmengine.model import is_model_wrapper

        if not is_main_process():
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        path = ac.save_head(Path(runner.work_dir) / self.filename, model.head, model.backbone)
        runner.logger.info(f"AdaptCLIP adapters: {path}")

