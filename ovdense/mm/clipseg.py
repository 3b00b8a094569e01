"""CLIPSeg (Lüddecke & Ecker, CVPR 2022) on mmengine: ``ClipSegPromptDataset``, which turns any
segmentation dataset into prompted training pairs, and ``OvdenseCLIPSeg``, the mmseg segmentor
that trains the decoder on them and segments a vocabulary (or one phrase per image) at test time.

The segmentor holds the frozen backbone outside its registered modules (never in ``state_dict()``,
an optimizer or a checkpoint) and ``head``, the ``ovdense.heads.clipseg.ClipSegHead`` — all that
CLIPSeg trains.

Training follows the official recipe (timojl/clipseg ``training.py`` and ``datasets/phrasecut.py``
``PhraseCut.__getitem__``, the ``rd64-uni`` row of ``experiments/phrasecut.yaml``). The dataset
wrapper plans each sample's prompt from ``(seed, draw)`` alone (``SeededInfiniteSampler``'s keys),
so the plan does not depend on which process loads the sample, on its batch, or on a resume:

* with probability ``negative_prob`` (0.2) a class the (cropped) image does not show, its target
  empty; otherwise a class it shows (label 0 excluded when ``skip_background``: a phrase names a
  thing), its target the class's pixels; label-255 pixels stay ignored;
* the text prompt: the class's name in a template drawn from ``templates`` (the official
  ``shuffle+`` list by default);
* the visual prompt, as the official ``with_visual``: another sample of the *dataset* that shows
  the class (the official code: another sample with the same phrase), loaded through
  ``support_pipeline`` under its own seed — by default the whole image resized to fit the input
  (the official ``load_sample`` takes the largest square that keeps ≥ 5 % of the mask, the whole
  image where it is square) — and redrawn up to ``support_tries`` times if it lost the class;
  its image and the class's mask; the segmentor engineers it (``crop_blur_highlight``,
  ``engineer_prompt``) after normalising it as the batch, and mixes the two vectors as the
  official ``mix``: ``w·text + (1 − w)·visual``, ``w ~ U(0, mix_text_max)``; with no such sample,
  the text alone. Departure: the official code may pick the query sample itself as its own
  support; here it is always another sample.
* the loss: binary cross-entropy with logits, averaged over each image's non-ignored pixels, then
  over the images (so a batch split over processes gives the gradient of one process).

Inference (``predict``): ``ClipSegSegmenter`` over this head and the test vocabulary (each class
prompted by its words in the backbone's template or as written): the most probable class, class 0
where none reaches its ``bg_threshold``; a test sample whose metainfo names a ``phrase`` (a
phrase-grounding layout, ``ovdense/mm/phrasecut.py``) gets that phrase's probability
``seg_logits [1, H, W]`` and ``pred_sem_seg = p ≥ 0.5``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dataset import Compose
from mmengine.registry import DATASETS
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from PIL import Image
from tqdm import tqdm

from ovdense.backbone.clip import create_backbone
from ovdense.backbone.prompts import Vocabulary
from ovdense.errors import OvdenseError
from ovdense.heads import clipseg as clipseg_head
from ovdense.io import write_bytes
from ovdense.mm.san import IGNORE_INDEX, FrozenBackboneSegmentor, _check_input, _to_rgb, _vocabulary
from ovdense.mm.training import derive_seed, seeded_global_rng

# the official prompt list "shuffle+" (models/clipseg.py get_prompt_list)
SHUFFLE_PLUS = ("a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}.",
                "a cropped photo of a {}.", "a good photo of a {}.", "a photo of one {}.",
                "a bad photo of a {}.", "a photo of the {}.")

# stream tags of derive_seed: the query's pipeline (SeededDataset's), the plan, each support try
_QUERY, _PLAN, _SUPPORT = 0xDA7A, 0xC11B, 0x5077


# --------------------------------------------------------------------------------------------
# Training pairs


@DATASETS.register_module()
class ClipSegPromptDataset:
    """Prompted training pairs for CLIPSeg from any segmentation dataset (see the module docstring).

    Args:
        dataset: the dataset or its config. Its ``metainfo["classes"]`` names class ids (label
            order); a loaded sample's metainfo may map its label values to class ids
            (``label_classes``, e.g. ``[0, phrase_id]`` for a phrase's binary mask), else label
            ``k`` is class ``k``. ``dataset.images_of_class()`` (class id → indices), where the
            dataset offers it, says which samples can lend a visual prompt; otherwise every label
            map (``seg_map_path``) is read once at start (``index_file`` keeps the result).
        templates: training templates; None: the official ``shuffle+`` list.
        negative_prob: the share of prompts naming a class that is absent (official 0.2).
        mix_text_max: the text weight's upper bound in the text/visual mix (official 0.5);
            ``None``: text prompts only.
        text_only_prob: the share of prompts given by their text alone although a visual prompt
            could be drawn (official: 0, where PhraseCut's phrases with no other sample are the
            text-only share; a semantic dataset's class names always have other samples, and a
            decoder that never sees a text-only vector fails on text at inference — the toy
            world: novel text IoU 25.4 % with 0, see docs/clipseg.md).
        skip_background: class 0 is background, never a prompt.
        support_pipeline: the transforms a support sample goes through (ending in
            ``PackSegInputs``); None: the dataset's own pipeline (random crops lose small objects:
            more redraws).
        support_tries: how many times a support sample is redrawn when it lost the class.
        index_file: a JSON file caching the class → samples index read from the label maps.

    Keys are ``SeededInfiniteSampler``'s ``(index, draw, seed)``; a plain integer ``k`` is
    ``(k, k, 0)``. Each sample comes back with ``gt_sem_seg`` the binary target (1 the prompt's
    pixels, 0 the rest, 255 ignored), metainfo ``draw``, ``seed`` and ``clipseg_prompt`` (``cls``,
    ``text``, ``negative``, ``weight`` — the text's share —, ``support`` — the support sample's
    index or ``None``), and, with a support, ``support_inputs`` (its ``uint8 [3, h, w]`` image as
    the pipeline packs it) and ``support_mask`` (``bool [h, w]``).
    """

    def __init__(self, dataset, templates: Sequence[str] | None = None, negative_prob: float = 0.2,
                 mix_text_max: float | None = 0.5, text_only_prob: float = 0.0, skip_background: bool = True,
                 support_pipeline: Sequence | None = None, support_tries: int = 5,
                 index_file: str | None = None):
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, Mapping) else dataset
        self.support_pipeline = Compose(support_pipeline) if support_pipeline is not None else None
        self.names = tuple(self.dataset.metainfo["classes"])
        self.templates = tuple(templates) if templates is not None else SHUFFLE_PLUS
        if not 0 <= negative_prob < 1:
            raise OvdenseError(f"negative_prob must be in [0, 1), got {negative_prob}")
        if mix_text_max is not None and not 0 <= mix_text_max <= 1:
            raise OvdenseError(f"mix_text_max must be in [0, 1] or None, got {mix_text_max}")
        if not 0 <= text_only_prob <= 1:
            raise OvdenseError(f"text_only_prob must be in [0, 1], got {text_only_prob}")
        self.negative_prob = float(negative_prob)
        self.text_only_prob = float(text_only_prob)
        self.mix_text_max = mix_text_max
        self.first = 1 if skip_background else 0
        if len(self.names) <= self.first:
            raise OvdenseError(f"the dataset names {len(self.names)} class(es): nothing to prompt")
        self.support_tries = int(support_tries)
        self.index = self._class_index(index_file)

    @property
    def metainfo(self) -> dict:
        return self.dataset.metainfo

    def __len__(self) -> int:
        return len(self.dataset)

    def _class_index(self, index_file: str | None) -> dict[int, list[int]]:
        if hasattr(self.dataset, "images_of_class"):
            return {int(c): list(v) for c, v in self.dataset.images_of_class().items()}
        infos = [self.dataset.get_data_info(i) for i in range(len(self.dataset))]
        paths = [info["seg_map_path"] for info in infos]
        if index_file is not None and os.path.isfile(index_file):
            with open(index_file) as f:
                cached = json.load(f)
            if cached.get("seg_maps") == paths:
                return {int(c): v for c, v in cached["index"].items()}
        index: dict[int, list[int]] = {}
        for i, info in enumerate(tqdm(infos, desc="indexing label maps", disable=len(infos) < 1000)):
            labels = np.unique(np.asarray(Image.open(info["seg_map_path"])))
            if info.get("label_map"):  # a class subset: mmseg's LoadAnnotations maps old → new
                labels = np.unique([info["label_map"].get(int(x), int(x)) for x in labels])
            if info.get("reduce_zero_label"):
                labels = labels[(labels != 0) & (labels != IGNORE_INDEX)] - 1
            for label in labels.tolist():
                if label != IGNORE_INDEX:
                    index.setdefault(int(label), []).append(i)
        if index_file is not None:
            write_bytes(index_file, json.dumps({"seg_maps": paths, "index": index}).encode())
        return index

    def _load(self, index: int, seed: int, support: bool = False) -> dict:
        with seeded_global_rng(seed):
            if support and self.support_pipeline is not None:
                return self.support_pipeline(self.dataset.get_data_info(index))
            return self.dataset[index]

    @staticmethod
    def _classes_of(data: dict) -> tuple[torch.Tensor, np.ndarray]:
        """A sample's label map ``[H, W]`` and its labels' class ids (``lookup[label]``)."""
        sample = data["data_samples"]
        gt = sample.gt_sem_seg.data[0]  # H, W
        mapping = sample.metainfo.get("label_classes")
        top = int(gt[gt != IGNORE_INDEX].max()) if bool((gt != IGNORE_INDEX).any()) else 0
        lookup = np.arange(max(top + 1, 1)) if mapping is None else np.asarray(mapping, dtype=np.int64)
        if top >= len(lookup):
            raise OvdenseError(f"{sample.metainfo.get('seg_map_path', 'a label map')} has label {top} but "
                               f"its label_classes name {len(lookup)} labels")
        return gt, lookup

    def _mask(self, gt: torch.Tensor, lookup: np.ndarray, cls: int) -> torch.Tensor:
        labels = torch.as_tensor(np.nonzero(lookup == cls)[0], dtype=gt.dtype)
        return torch.isin(gt, labels)  # H, W

    def __getitem__(self, key) -> dict:
        index, draw, seed = (key, key, 0) if isinstance(key, int) else (int(k) for k in key)
        data = self._load(index, derive_seed(seed, _QUERY, draw))
        sample = data["data_samples"]
        gt, lookup = self._classes_of(data)
        labels = [int(x) for x in torch.unique(gt).tolist() if x != IGNORE_INDEX]
        present = sorted({int(lookup[x]) for x in labels} - set(range(self.first)))
        if present and max(present) >= len(self.names):
            raise OvdenseError(f"a label map shows class {max(present)} but the dataset names "
                               f"{len(self.names)} classes: the class file must list every class in "
                               "label order")
        rng = np.random.default_rng(derive_seed(seed, _PLAN, draw))
        absent = len(self.names) - self.first - len(present)
        negative = (not present or rng.random() < self.negative_prob) and absent > 0
        if not present and not negative:
            raise OvdenseError(f"sample {index} shows no class that can be a prompt, and no class is "
                               "absent from it")
        if negative:  # uniform over the absent classes
            while True:
                cls = int(rng.integers(self.first, len(self.names)))
                if cls not in present:
                    break
        else:
            cls = int(present[rng.integers(len(present))])
        text = self.templates[int(rng.integers(len(self.templates)))].format(self.names[cls])
        support, support_data, support_mask = None, None, None
        others = [i for i in self.index.get(cls, ()) if i != index]
        text_only = self.text_only_prob > 0 and rng.random() < self.text_only_prob
        if others and self.mix_text_max is not None and not text_only:
            for attempt in range(self.support_tries):
                j = int(others[rng.integers(len(others))])
                candidate = self._load(j, derive_seed(seed, _SUPPORT, draw, attempt), support=True)
                mask = self._mask(*self._classes_of(candidate), cls)
                if bool(mask.any()):
                    support, support_data, support_mask = j, candidate, mask
                    break
        weight = float(rng.uniform(0.0, self.mix_text_max)) if support is not None else 1.0
        target = torch.zeros_like(gt) if negative else self._mask(gt, lookup, cls).to(gt.dtype)
        target[gt == IGNORE_INDEX] = IGNORE_INDEX
        sample.gt_sem_seg = PixelData(data=target[None])  # 1, H, W
        sample.set_metainfo(dict(draw=draw, seed=seed, clipseg_prompt=dict(
            cls=cls, text=text, negative=bool(negative), weight=weight, support=support)))
        if support is not None:
            sample.support_inputs = support_data["inputs"]  # 3, h, w (uint8, as packed)
            sample.support_mask = support_mask  # h, w
        return data


# --------------------------------------------------------------------------------------------
# The segmentor


@MODELS.register_module()
class OvdenseCLIPSeg(FrozenBackboneSegmentor):
    """CLIPSeg on ovdense's shared backbone (see the module docstring); trains on
    ``ClipSegPromptDataset``'s samples.

    Args:
        backbone: ``create_backbone`` arguments.
        test_classnames: the vocabulary ``predict`` segments (a class file or a list); None: test
            samples name their own ``phrase``.
        head: ``ClipSegConfig`` fields that differ from its defaults.
        head_checkpoint: a head written by ``ovdense.heads.clipseg.save_head`` instead of a new one.
        test_templates: the inference templates; None: ``ClipSegSegmenter``'s default.
        data_preprocessor: defaults to ``SanDataPreprocessor`` with ImageNet's (or the
            backbone's, ``head.normalisation="clip"``) mean and std.
    """

    def __init__(
        self,
        backbone: Mapping,
        test_classnames: str | Sequence[str] | None = None,
        head: Mapping | None = None,
        head_checkpoint: str | None = None,
        test_templates=None,
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
        self.test_vocabulary = None if test_classnames is None else _vocabulary(test_classnames)
        self.test_templates = test_templates
        self.train_cfg = dict(train_cfg or {})
        self.test_cfg = dict(test_cfg or {})
        self._segmenter: clipseg_head.ClipSegSegmenter | None = None

    @property
    def num_classes(self) -> int:
        return len(self.test_vocabulary) if self.test_vocabulary is not None else 2

    # ----------------------------------------------------------------------------------------
    # Training

    def prompt_vectors(self, data_samples: list[SegDataSample]) -> torch.Tensor:
        """Each sample's prompt vector ``[B, D_joint]``: its text's, mixed with its support's
        engineered image prompt where it has one."""
        plans = [sample.metainfo.get("clipseg_prompt") for sample in data_samples]
        if any(p is None for p in plans):
            raise OvdenseError("OvdenseCLIPSeg trains on prompted samples: wrap the training dataset in "
                               "dict(type='ClipSegPromptDataset', dataset=...)")
        S = self.head.config.image_size
        with torch.no_grad():
            cond = clipseg_head.text_prompt_vectors(self.backbone, [p["text"] for p in plans])  # B, D
            visual = [b for b, p in enumerate(plans) if p["support"] is not None]
            if visual:
                supports = []
                for b in visual:
                    sample = data_samples[b]
                    image = sample.support_inputs.to(cond.device)
                    if self.data_preprocessor.bgr_to_rgb:
                        image = image.flip(0)
                    x = self.data_preprocessor.normalise(image)  # 3, h, w
                    h, w = x.shape[-2:]
                    if h > S or w > S:
                        raise OvdenseError(f"a support crop is {h} x {w}, larger than the head's input {S}: "
                                           f"crop the training images to {S}")
                    x = F.pad(x, (0, S - w, 0, S - h))  # 3, S, S (zeros: the mean colour)
                    mask = F.pad(sample.support_mask.to(cond.device), (0, S - w, 0, S - h))  # S, S
                    supports.append(clipseg_head.engineer_prompt(x, mask))  # 3, S, S
                images = torch.stack(supports).to(self.backbone.dtype)  # V, 3, S, S
                vectors = self.head.image_prompt_vectors(self.backbone, images).float()  # V, D
                weights = torch.tensor([plans[b]["weight"] for b in visual], device=cond.device)[:, None]
                cond[visual] = weights * cond[visual] + (1 - weights) * vectors
        return cond

    def loss(self, inputs: torch.Tensor, data_samples: list[SegDataSample]) -> dict[str, torch.Tensor]:
        """Binary cross-entropy of each image's prompt (``inputs`` ``[B, 3, S, S]`` normalised)."""
        S = self.head.config.image_size
        if tuple(inputs.shape[-2:]) != (S, S):
            raise OvdenseError(f"training crops are {tuple(inputs.shape[-2:])}, the head's input is "
                               f"{S} x {S}: crop to {S} and pad to it (data_preprocessor size_divisor={S})")
        cond = self.prompt_vectors(data_samples)
        with torch.no_grad():
            taps = self.head.taps(self.backbone, inputs.to(self.backbone.dtype))
        g = S // self.backbone.patch_size
        logits = self.head([t.float() for t in taps], cond, (g, g)).float()  # B, S', S'
        if logits.shape[-1] != S:
            logits = F.interpolate(logits[:, None], (S, S), mode="bilinear", align_corners=False)[:, 0]
        gt = torch.stack([sample.gt_sem_seg.data[0] for sample in data_samples])  # B, S, S
        valid = (gt != IGNORE_INDEX).float()
        target = (gt == 1).float()
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
        per_image = per_pixel.sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1.0)  # B
        return {"loss_bce": per_image.mean()}

    # ----------------------------------------------------------------------------------------
    # Inference

    def segmenter(self) -> clipseg_head.ClipSegSegmenter:
        if self._segmenter is None or self._segmenter.cond.device != self.backbone.device:
            if self.test_vocabulary is None:
                raise OvdenseError("OvdenseCLIPSeg has no test vocabulary: set model.test_classnames, or "
                                   "test on samples that name their phrase (a phrase-grounding dataset)")
            self._segmenter = clipseg_head.ClipSegSegmenter(
                self.backbone, self.test_vocabulary, head=self.head, templates=self.test_templates)
        return self._segmenter

    def phrase_probability(self, rgb: np.ndarray, phrase: str) -> torch.Tensor:
        """The probability ``[1, H, W]`` of one phrase on one image, the phrase as written (the
        official PhraseCut evaluation)."""
        words = Vocabulary((phrase,), (phrase,), (0,))  # as written: commas do not split a phrase
        segmenter = clipseg_head.ClipSegSegmenter(self.backbone, words, head=self.head, templates="{}",
                                                  bg_threshold=None)
        logits = segmenter.prompt_logits(rgb)  # 1, S, S
        return F.interpolate(logits[None], rgb.shape[:2], mode="bilinear", align_corners=False)[0].sigmoid()

    def encode_decode(self, inputs, batch_img_metas=None) -> torch.Tensor:
        segmenter = self.segmenter()
        return torch.stack([segmenter.probabilities(_to_rgb(image)) for image in inputs])

    def predict(self, inputs, data_samples: list[SegDataSample] | None = None) -> list[SegDataSample]:
        """``pred_sem_seg`` ``[1, H, W]`` and ``seg_logits`` (the class probabilities ``[C, H, W]``,
        or the phrase's ``[1, H, W]``) at each image's original size."""
        if data_samples is None:
            data_samples = [SegDataSample() for _ in range(len(inputs))]
        for image, sample in zip(inputs, data_samples):
            _check_input(image, sample, "OvdenseCLIPSeg")
            rgb = _to_rgb(image)
            phrase = sample.metainfo.get("phrase")
            if phrase is not None:
                probs = self.phrase_probability(rgb, str(phrase)).to(image.device)  # 1, H, W
                pred = (probs >= 0.5).long()
            else:
                probs = self.segmenter().probabilities(rgb).to(image.device)  # C, H, W
                pred = probs.argmax(0, keepdim=True)
            sample.set_data({"seg_logits": PixelData(data=probs), "pred_sem_seg": PixelData(data=pred)})
        self.head.train(self.training)
        return data_samples

    def _forward(self, inputs, data_samples=None):
        return self.head.taps(self.backbone, inputs)

    def extract_feat(self, inputs):
        return self._forward(inputs)
