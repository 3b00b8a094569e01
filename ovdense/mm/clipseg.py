"""``OvdenseCLIPSeg``: CLIPSeg (Lüddecke & Ecker, CVPR 2022) as an mmseg segmentor that trains on
mmengine, from semantic segmentation data.

The segmentor holds the frozen backbone outside its registered modules (never in ``state_dict()``,
an optimizer or a checkpoint) and ``head``, the ``ovdense.heads.clipseg.ClipSegHead`` — all that
CLIPSeg trains.

Training (``loss``) follows the official recipe (timojl/clipseg ``training.py`` and
``datasets/phrasecut.py``, the ``rd64-uni`` row of ``experiments/phrasecut.yaml``) with semantic
label maps in place of PhraseCut's phrase/mask pairs: each image of the batch (a crop of
``S × S``, normalised with ImageNet's statistics by ``SanDataPreprocessor``) gets one prompt —

* with probability ``negative_prob`` (0.2) a class that is not in the image, its target empty;
  otherwise a class present in it (background, label 0 when ``skip_background``, excluded: a
  phrase names a thing), its target the class's pixels (label 255 pixels ignored);
* the text prompt: the class name in a template drawn from ``templates`` (the official
  ``shuffle+`` list by default);
* a visual prompt where another image of the batch shows the class: that image and its mask
  through ``engineer_prompt`` (``crop_blur_highlight``), the projected class token; the two are
  mixed as the official ``mix``: ``w·text + (1 − w)·visual``, ``w ~ U(0, mix_text_max)``;
  without one, the text alone;
* the loss: binary cross-entropy with logits over the non-ignored pixels.

Every random choice of an image derives from ``(seed, draw)`` (``SeededDataset``), so a run killed
and resumed makes the same choices as an uninterrupted one. Departure not yet closed: the official
code draws the visual prompt from any sample of the dataset with the same phrase; here it comes
from the same process's batch, so a run on more processes with fewer images each sees fewer
visual prompts and does not reproduce a one-process run.

Inference (``predict``): ``ClipSegSegmenter`` over this head and the test vocabulary (each class
prompted by its words in the backbone's template or as written): the most probable class, class 0
where none reaches its ``bg_threshold``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from ovdense.backbone.clip import create_backbone
from ovdense.errors import OvdenseError
from ovdense.heads import clipseg as clipseg_head
from ovdense.mm.san import IGNORE_INDEX, FrozenBackboneSegmentor, _check_input, _to_rgb, _vocabulary
from ovdense.mm.training import derive_seed

# the official prompt list "shuffle+" (models/clipseg.py get_prompt_list)
SHUFFLE_PLUS = ("a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}.",
                "a cropped photo of a {}.", "a good photo of a {}.", "a photo of one {}.",
                "a bad photo of a {}.", "a photo of the {}.")


@MODELS.register_module()
class OvdenseCLIPSeg(FrozenBackboneSegmentor):
    """CLIPSeg on ovdense's shared backbone (see the module docstring).

    Args:
        backbone: ``create_backbone`` arguments.
        classnames: the training vocabulary (a class file or a list), in label order.
        test_classnames: the vocabulary ``predict`` segments with; None: ``classnames``.
        head: ``ClipSegConfig`` fields that differ from its defaults.
        head_checkpoint: a head written by ``ovdense.heads.clipseg.save_head`` instead of a new one.
        templates: training templates; None: the official ``shuffle+`` list.
        test_templates: the inference templates; None: ``ClipSegSegmenter``'s default.
        negative_prob: the share of prompts naming a class that is absent (official 0.2).
        mix_text_max: the text weight's upper bound in the text/visual mix (official 0.5);
            ``None``: text prompts only.
        skip_background: label 0 is background, never a prompt.
        data_preprocessor: defaults to ``SanDataPreprocessor`` with ImageNet's (or the
            backbone's, ``head.normalisation="clip"``) mean and std.
    """

    def __init__(
        self,
        backbone: Mapping,
        classnames: str | Sequence[str],
        test_classnames: str | Sequence[str] | None = None,
        head: Mapping | None = None,
        head_checkpoint: str | None = None,
        templates: Sequence[str] | None = None,
        test_templates=None,
        negative_prob: float = 0.2,
        mix_text_max: float | None = 0.5,
        skip_background: bool = True,
        data_preprocessor: Mapping | None = None,
        train_cfg: Mapping | None = None,
        test_cfg: Mapping | None = None,
        init_cfg: Mapping | None = None,
    ):
        clip = create_backbone(**dict(backbone))
        if head_checkpoint is not None:
            if head:
                raise OvdenseError("give model.head (a new head's ClipSegConfig) or model.head_checkpoint, "
                                   "not both")
            module = clipseg_head.load_head(head_checkpoint, clip)
        else:
            module = clipseg_head.ClipSegHead(clip, clipseg_head.ClipSegConfig(**dict(head or {})))
        clip_stats = module.config.normalisation == "clip"
        mean = clip.mean if clip_stats else clipseg_head.IMAGENET_MEAN
        std = clip.std if clip_stats else clipseg_head.IMAGENET_STD
        preprocessor = dict(type="SanDataPreprocessor")
        preprocessor.update(data_preprocessor or {})
        preprocessor.setdefault("mean", [255.0 * m for m in mean])
        preprocessor.setdefault("std", [255.0 * s for s in std])
        super().__init__(data_preprocessor=preprocessor, init_cfg=init_cfg)
        self.keep_backbone(clip)
        self.head = module
        self.vocabulary = _vocabulary(classnames)
        self.test_vocabulary = self.vocabulary if test_classnames is None else _vocabulary(test_classnames)
        self.templates = tuple(templates) if templates is not None else SHUFFLE_PLUS
        self.test_templates = test_templates
        if not 0 <= negative_prob < 1:
            raise OvdenseError(f"negative_prob must be in [0, 1), got {negative_prob}")
        self.negative_prob = float(negative_prob)
        self.mix_text_max = mix_text_max
        self.skip_background = skip_background
        self.train_cfg = dict(train_cfg or {})
        self.test_cfg = dict(test_cfg or {})
        self._segmenter: clipseg_head.ClipSegSegmenter | None = None

    # ----------------------------------------------------------------------------------------
    # Training

    def prompts(self, data_samples: list[SegDataSample]) -> list[dict]:
        """Each image's prompt: ``class``, ``text`` (the filled template), ``target_class`` (the
        class whose pixels are the target, ``None`` for a negative), ``support`` (the batch index
        of the image a visual prompt comes from, or ``None``) and ``weight`` (the text's share)."""
        present = []
        for sample in data_samples:
            classes = torch.unique(sample.gt_sem_seg.data).tolist()
            keep = [int(c) for c in classes if c != IGNORE_INDEX and not (self.skip_background and c == 0)]
            if keep and max(keep) >= len(self.vocabulary):
                raise OvdenseError(f"the ground truth has label {max(keep)} but the training vocabulary has "
                                   f"{len(self.vocabulary)} classes: the class file must list every "
                                   "training class in label order")
            present.append(keep)
        first = 1 if self.skip_background else 0
        out = []
        for b, sample in enumerate(data_samples):
            rng = np.random.default_rng(_prompt_seed(sample))
            absent = [c for c in range(first, len(self.vocabulary)) if c not in present[b]]
            negative = (not present[b] or rng.random() < self.negative_prob) and bool(absent)
            if not present[b] and not absent:
                raise OvdenseError("an image shows no class that can be a prompt")
            cls = int(rng.choice(absent if negative else present[b]))
            text = str(rng.choice(self.templates)).format(self.vocabulary.names[cls])
            others = [i for i in range(len(data_samples)) if i != b and cls in present[i]]
            support = int(rng.choice(others)) if others and self.mix_text_max is not None else None
            weight = float(rng.uniform(0.0, self.mix_text_max)) if support is not None else 1.0
            out.append(dict(cls=cls, text=text, target_class=None if negative else cls, support=support,
                            weight=weight))
        return out

    def loss(self, inputs: torch.Tensor, data_samples: list[SegDataSample]) -> dict[str, torch.Tensor]:
        """Binary cross-entropy of each image's prompt (``inputs`` ``[B, 3, S, S]`` normalised)."""
        S = self.head.config.image_size
        if tuple(inputs.shape[-2:]) != (S, S):
            raise OvdenseError(f"training crops are {tuple(inputs.shape[-2:])}, the head's input is "
                               f"{S} x {S}: crop to {S} and pad to it (data_preprocessor size_divisor={S})")
        plan = self.prompts(data_samples)
        with torch.no_grad():
            taps = self.head.taps(self.backbone, inputs.to(self.backbone.dtype))
            text = clipseg_head.text_prompt_vectors(self.backbone, [p["text"] for p in plan])  # B, D
            cond = text.clone()
            visual = [b for b, p in enumerate(plan) if p["support"] is not None]
            if visual:
                supports = []
                for b in visual:
                    other = plan[b]["support"]
                    mask = data_samples[other].gt_sem_seg.data[0] == plan[b]["cls"]  # S, S
                    supports.append(clipseg_head.engineer_prompt(inputs[other], mask))  # 3, S, S
                supports = torch.stack(supports).to(self.backbone.dtype)  # V, 3, S, S
                vectors = self.head.image_prompt_vectors(self.backbone, supports).float()  # V, D
                weights = torch.tensor([plan[b]["weight"] for b in visual], device=cond.device)[:, None]
                cond[visual] = weights * text[visual] + (1 - weights) * vectors
        g = S // self.backbone.patch_size
        logits = self.head([t.float() for t in taps], cond, (g, g)).float()  # B, S', S'
        if logits.shape[-1] != S:
            logits = F.interpolate(logits[:, None], (S, S), mode="bilinear", align_corners=False)[:, 0]
        targets, valid = [], []
        for p, sample in zip(plan, data_samples):
            gt = sample.gt_sem_seg.data[0]  # S, S
            c = p["target_class"]
            targets.append((gt == c).float() if c is not None else torch.zeros_like(gt, dtype=torch.float32))
            valid.append((gt != IGNORE_INDEX).float())
        target, weight = torch.stack(targets), torch.stack(valid)  # B, S, S
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
        return {"loss_bce": loss / weight.sum().clamp_min(1.0)}

    # ----------------------------------------------------------------------------------------
    # Inference

    def segmenter(self) -> clipseg_head.ClipSegSegmenter:
        if self._segmenter is None or self._segmenter.cond.device != self.backbone.device:
            self._segmenter = clipseg_head.ClipSegSegmenter(
                self.backbone, self.test_vocabulary, head=self.head, templates=self.test_templates)
        return self._segmenter

    def encode_decode(self, inputs, batch_img_metas=None) -> torch.Tensor:
        segmenter = self.segmenter()
        return torch.stack([segmenter.probabilities(_to_rgb(image)) for image in inputs])

    def predict(self, inputs, data_samples: list[SegDataSample] | None = None) -> list[SegDataSample]:
        """``pred_sem_seg`` ``[1, H, W]`` and ``seg_logits`` (the class probabilities ``[C, H, W]``)
        at each image's original size."""
        segmenter = self.segmenter()
        if data_samples is None:
            data_samples = [SegDataSample() for _ in range(len(inputs))]
        for image, sample in zip(inputs, data_samples):
            _check_input(image, sample, "OvdenseCLIPSeg")
            probs = segmenter.probabilities(_to_rgb(image)).to(image.device)  # C, H, W
            sample.set_data({"seg_logits": PixelData(data=probs),
                             "pred_sem_seg": PixelData(data=probs.argmax(0, keepdim=True))})
        self.head.train(self.training)
        return data_samples

    def _forward(self, inputs, data_samples=None):
        return self.head.taps(self.backbone, inputs)

    def extract_feat(self, inputs):
        return self._forward(inputs)


def _prompt_seed(sample: SegDataSample) -> int:
    meta = sample.metainfo
    if "draw" in meta:
        return derive_seed(int(meta.get("seed", 0)), 0xC11B, int(meta["draw"]))
    path = str(meta.get("img_path", ""))
    return derive_seed(0xC11B, *path.encode()[-32:])
