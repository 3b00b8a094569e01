"""CLIPSelf (Wu et al., ICLR 2024) on mmengine: ``ClipSelfDataset`` turns the images of a COCO-format
file into CLIPSelf samples (the student's image, its regions, the teacher's crops), ``OvdenseCLIPSelf``
trains the backbone's own blocks on them (``ovdense/train/clipself.py`` has the method and the
official files it follows), and ``ExportClipSelfHook`` writes the α-merged backbone that
``create_backbone(NAME, pretrained=PATH)`` and every head, CLI command and config load.

Exact resume: ``SeededInfiniteSampler`` + ``SeededIterBasedTrainLoop`` (``ovdense/mm/training.py``);
each sample's grid, cell order and crops derive from ``(seed, draw)`` alone, never from the worker or
the batch that loads it. Several processes (``torchrun … --launcher pytorch``) train under
``MMDistributedDataParallel``, whose gradients are averaged over the processes. The official
``CLIPSelf.__call__`` unwraps its DDP model (``model.module``) before the forward, so its backward
never passes DDP's reducer and, as far as we can read, each process steps on its own gradients;
ovdense keeps the wrapper and synchronises them.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, MODELS

from ovdense.backbone.clip import ClipBackbone, create_backbone
from ovdense.errors import OvdenseError
from ovdense.io import load_image, write_bytes
from ovdense.mm.training import derive_seed, global_share
from ovdense.train import clipself as cs

_REGIONS = 0xC5E1  # derive_seed stream of a sample's regions
MODES = ("grid", "proposals")
WEIGHTS_FORMAT = "ovdense-clipself-backbone"


@DATASETS.register_module()
class ClipSelfDataset:
    """The images of a COCO-format file (``images[].file_name``; ``annotations[].bbox`` for the
    proposals) as CLIPSelf samples: ``inputs`` the student's image ``[3, S, S]`` in ``[0, 1]`` (long
    side ``image_size``, zero pixels bottom-right), ``data_samples`` ``{"boxes": [K, 4]`` normalised,
    ``"crops": [K, 3, c, c]`` in ``[0, 1]}`` — the model normalises both with the backbone's mean and
    std, as the official transforms do after ``ToTensor``.

    Args:
        ann_file: the COCO-format file (COCO's ``instances_train2017.json``: its labels are not used;
            its boxes are the ``proposals`` mode's regions, or those of another file's proposals).
        data_root, img_prefix: the images are ``data_root/img_prefix/file_name``.
        mode: ``"grid"`` ("image patches", ``cs.grid_regions``) or ``"proposals"``
            (``cs.proposal_regions``).
        image_size, crop_size: the student's long side (1024 for B/16, 896 for L/14 in the paper) and
            the teacher's input (the tower's native size).
        max_split, max_boxes, crop_scale, min_box, max_box: as ``cs.grid_regions`` /
            ``cs.proposal_regions``.
    Keys are ``(index, draw, seed)`` from ``SeededInfiniteSampler``; a plain integer is ``(i, i, 0)``.
    """

    def __init__(self, ann_file: str, data_root: str = "", img_prefix: str = "", mode: str = "grid",
                 image_size: int = cs.IMAGE_SIZE, crop_size: int = 224, max_split: int = cs.MAX_SPLIT,
                 max_boxes: int = cs.MAX_BOXES, crop_scale: float = 1.0, min_box: int = cs.MIN_BOX,
                 max_box: int = cs.MAX_BOX):
        if mode not in MODES:
            raise OvdenseError(f"mode must be one of {MODES}, got {mode!r}")
        path = Path(data_root, ann_file) if data_root and not os.path.isabs(ann_file) else Path(ann_file)
        if not path.is_file():
            raise OvdenseError(f"COCO-format file not found: {path}")
        try:
            coco = json.loads(path.read_text())
            images = [(int(i["id"]), str(i["file_name"])) for i in coco["images"]]
        except (ValueError, KeyError, TypeError) as e:
            raise OvdenseError(f"{path} is not a COCO-format file (images[].id, file_name): {e}") from e
        if not images:
            raise OvdenseError(f"{path} lists no images")
        boxes: dict[int, list] = {image_id: [] for image_id, _ in images}
        for ann in coco.get("annotations", []):
            if ann.get("image_id") in boxes and not ann.get("iscrowd", 0):
                boxes[ann["image_id"]].append([float(v) for v in ann["bbox"]])
        self.images = images
        self.boxes = boxes
        self.root = Path(data_root, img_prefix)
        self.mode, self.image_size, self.crop_size = mode, int(image_size), int(crop_size)
        grid = dict(max_split=max_split, max_boxes=max_boxes, crop_scale=crop_scale)
        self.options = grid if mode == "grid" else dict(max_boxes=max_boxes, min_box=min_box, max_box=max_box)
        self.metainfo = dict(mode=mode)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        index, draw, seed = (key, key, 0) if isinstance(key, int) else key
        image_id, file_name = self.images[index]
        rgb = load_image(self.root / file_name)
        rng = random.Random(derive_seed(seed, _REGIONS, draw))
        unit = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), size=self.image_size, crop_size=self.crop_size)
        if self.mode == "grid":
            regions = cs.grid_regions(rgb, rng, **unit, **self.options)
        else:
            regions = cs.proposal_regions(rgb, self.boxes[image_id], rng, **unit, **self.options)
        return dict(inputs=regions.image, data_samples=dict(boxes=regions.boxes, crops=regions.crops))


@MODELS.register_module()
class OvdenseCLIPSelf(BaseModel):
    """The backbone's image tower trained by CLIPSelf: ``student`` (its blocks trainable) and
    ``teacher`` (a frozen copy of the weights it started from) are this model's modules; the text
    tower stays outside (the backbone object, never in a checkpoint or the optimizer).

    Args:
        clip: ``create_backbone`` arguments (``name``, ``pretrained``, …).
        alpha: the student's share of the saved weights (default: 0.7 for 12 blocks, 0.95 for 24,
            the official scripts'; else 0.7).
    """

    def __init__(self, clip: Mapping, alpha: float | None = None, data_preprocessor=None, init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        backbone = clip if isinstance(clip, ClipBackbone) else create_backbone(**dict(clip))
        visual = backbone.model.visual
        self.method = cs.CLIPSelf(visual, backbone.name)
        self._backbone = (backbone,)  # a tuple: the text tower is not this model's
        depth = len(visual.transformer.resblocks)
        self.alpha = float(alpha) if alpha is not None else cs.ALPHA.get(depth, 0.7)
        if not 0.0 <= self.alpha <= 1.0:
            raise OvdenseError(f"alpha must lie in [0, 1], got {alpha}")
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self) -> ClipBackbone:
        return self._backbone[0]

    def forward(self, inputs: Sequence[torch.Tensor], data_samples: Mapping | None = None,
                mode: str = "loss"):
        """``inputs``: the images ``[3, S, S]`` in ``[0, 1]``; ``data_samples``: ``{"boxes": [[K_i, 4]],
        "crops": [[K_i, 3, c, c]]}`` (``pseudo_collate`` of ``ClipSelfDataset``'s samples)."""
        if mode != "loss":
            raise OvdenseError(f"OvdenseCLIPSelf only trains (mode 'loss'), got mode {mode!r}: evaluate the "
                               "refined backbone with tools/eval_region_recognition.py or any head")
        images = (torch.stack(list(inputs)) - self.mean) / self.std  # B, 3, S, S
        boxes = list(data_samples["boxes"])
        crops = (torch.cat(list(data_samples["crops"])) - self.mean) / self.std  # R, 3, c, c
        # the loss averages this process's regions; weighted by their share of the global batch, DDP's
        # mean over processes is the mean over all regions, as one process with the global batch
        share = global_share(len(crops), images.device)
        return dict(loss_cosine=self.method(images, boxes, crops) * share)

    def refined_state(self) -> dict[str, torch.Tensor]:
        """The whole open_clip model's state with the image tower α-merged (``cs.ensemble``)."""
        merged = self.method.merged(self.alpha)
        state = {k: v.detach().cpu() for k, v in self.backbone.model.state_dict().items()}
        state.update({f"visual.{k}": v.detach().cpu() for k, v in merged.items()})
        return state


def save_refined(path: str | os.PathLike, model: OvdenseCLIPSelf) -> Path:
    """Write the refined backbone as safetensors (atomically): the whole open_clip state dict, which
    ``create_backbone(model.backbone.name, pretrained=path)`` loads; the metadata names the format,
    the base model and α."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.refined_state().items()}
    metadata = dict(format=WEIGHTS_FORMAT, base=model.backbone.name, alpha=str(model.alpha))
    return write_bytes(path, save(state, metadata=metadata))


@HOOKS.register_module()
class ExportClipSelfHook(Hook):
    """After training (process 0): ``WORK_DIR/filename``, the α-merged backbone (``save_refined``)."""

    priority = "LOW"

    def __init__(self, filename: str = "clipself_backbone.safetensors"):
        self.filename = filename

    def after_train(self, runner) -> None:
        from mmengine.dist import is_main_process
        from mmengine.model import is_model_wrapper

        if not is_main_process():
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        path = save_refined(os.path.join(runner.work_dir, self.filename), model)
        runner.logger.info(f"refined backbone: {path} (alpha {model.alpha})")
