"""Convert a published CLIM / F-ViT detector (wusize/CLIM ``ovdet``, mmdet 3.x, OpenAI CLIP ViT-B/16)
into ovdense files: an open_clip backbone file and an F-ViT head file with the class embeddings it was
trained against.

    # OV-COCO (Faster R-CNN, FPN; README: novel AP50 29.7)
    python tools/model_converters/fvit2ovdense.py ovdet_openai_vitb16_ov_coco_clim.pth weights/clim-ovcoco \
        --clip openai_vitb16_coco_clim.pt
    # OV-LVIS (Mask R-CNN, NAS-FPN; README: mask APr 24.3); the two class files come from
    # tools/data/dataset_converters/lvis_v1_ovd.py
    python tools/model_converters/fvit2ovdense.py ovdet_openai_vitb16_ov_lvis_clim.pth weights/clim-ovlvis \
        --clip openai_vitb16_cc3m_clim.pt --class-names data/lvis_v1/annotations/lvis_v1_all_classes.txt \
        --training-classes data/lvis_v1/annotations/lvis_v1_base_classes.txt
    ovdense detect photo.jpg --model ViT-B-16 --pretrained weights/clim-ovcoco/backbone.safetensors \
        --head-checkpoint weights/clim-ovcoco/fvit-head.safetensors --classes "person,dog,frisbee,kettle"

The checkpoint is CLIM's ``FVLM`` state dict: a whole mmengine training checkpoint (``meta``,
``state_dict``, ``message_hub``, ``optimizer``, …, as CLIM's training writes it), ``{'state_dict': ...}``
or bare; ``.safetensors``, or a ``.pth`` read with ``torch.load(weights_only=True)`` only
(``ovdense.io.read_checkpoint``: the message hub's ``HistoryBuffer``s come back as inert placeholders,
and no code of the file runs). Its layout is checked
first, and names the model (``check_layout``): a ViT ``backbone.visual.*``, the simple pyramid
(``backbone.interpolate1/2``), BatchNorm (CLIM's SyncBN) in the pyramid, neck and box convs, box-head
FCs of 1024 and the buffer ``roi_head.bbox_head.cls_embeddings``; then either an FPN and no mask head
(CLIM's OV-COCO model, ``faster_rcnn_fpn_openai_vitb16_clim_bs64_ov_coco_3e.py``) or a NAS-FPN and a
class-agnostic mask head (its OV-LVIS model, ``mask_rcnn_nasfpn_openai_vitb16_clim_bs64_ov_lvis_4x.py``).
CLIM's RN50x64 models (ResNet) are refused: ovdense's F-ViT runs on ViTs.

Written into OUT:

* ``backbone.safetensors``: an open_clip ``ViT-B-16`` state dict, the checkpoint's visual tower (what
  the detector was trained with; CLIM-refined) and the text tower of ``--clip`` (a CLIP file: OpenAI's
  ViT-B/16 as open_clip stores it, or CLIM's ``openai_vitb16_{coco,cc3m}_clim.pt``; or an open_clip tag
  such as ``openai``). Loaded from a file, ovdense builds it with exact GELU, which is what CLIM's
  detector runs (its open_clip fork gives QuickGELU only to the ``openai`` tag).
* ``fvit-head.safetensors``: the head (``backbone.interpolate1.*`` → ``backbone.pyramid.up4.*``,
  ``backbone.interpolate2.0.*`` → ``backbone.pyramid.up2.*``, ``cls_temp`` →
  ``classifier.temperature``, background = ``bg_embedding.weight[:, 0] + bg_embedding.bias``, the rest
  — NAS-FPN and mask head included — by name) with the model's own test settings (``PRESETS``), its
  training vocabulary (OV-COCO: the 48 base classes; OV-LVIS: the 866 frequent and common ones), and
  ``cls_embeddings`` stored with their names (``ovdense.heads.fvit.StoredText``: COCO's 80, or LVIS's
  1203 as ``lvis_v1_ovd.py`` writes them): ``Detector`` and ``OvdenseFViT(head_checkpoint=...)`` use
  those rows for those names and encode any other word with the backbone.

``tools/test.py`` evaluates the converted files with CLIM's protocol, no ``.pth`` needed::

    python tools/test.py configs/ovdet/fvit_vitb16_ovcoco_clim.py --cfg-options \
        model.clip.pretrained=weights/clim-ovcoco/backbone.safetensors \
        model.head_checkpoint=weights/clim-ovcoco/fvit-head.safetensors
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import torch

#: COCO 2017's 80 categories, sorted by id: the rows of CLIM's ``coco_openai_vitb16_hand_craft.npy``.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
#: The 48 OV-COCO base classes (OVR-CNN's split; CLIM's ``class_weight`` 1), in COCO order.
OV_COCO_BASE = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
    "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
    "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza",
    "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster",
    "refrigerator", "book", "clock", "vase", "toothbrush",
)

BOX = "roi_head.bbox_head."
CLS_EMBEDDINGS = BOX + "cls_embeddings"
FC_WIDTH = 1024
#: the checkpoint's keys renamed for ovdense (prefix → prefix); the rest keep their names
RENAMES = (("backbone.interpolate1.", "backbone.pyramid.up4."),
           ("backbone.interpolate2.0.", "backbone.pyramid.up2."))


#: what each published model is: its layout's neck and mask head, the config it comes from, its test
#: settings (CLIM's merged config: the model file on mmdet's faster-/mask-rcnn_r50_fpn.py base) and the
#: ovdense config that evaluates it
PRESETS = {
    "ov-coco": dict(neck="FPN", masks=False, rows=80,
                    clim_config="faster_rcnn_fpn_openai_vitb16_clim_bs64_ov_coco_3e.py",
                    ovdense_config="configs/ovdet/fvit_vitb16_ovcoco_clim.py",
                    alpha=0.1, beta=0.8, vlm_temperature=75.0, rpn_nms_pre=1000,
                    rcnn=dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.4), max_per_img=100)),
    "ov-lvis": dict(neck="NASFPN", masks=True, rows=1203,
                    clim_config="mask_rcnn_nasfpn_openai_vitb16_clim_bs64_ov_lvis_4x.py",
                    ovdense_config="configs/ovdet/fvit_vitb16_ovlvis_clim.py",
                    alpha=0.35, beta=0.65, vlm_temperature=50.0, rpn_nms_pre=2000,
                    rcnn=dict(score_thr=0.0001, nms=dict(type="nms", iou_threshold=0.5), max_per_img=300,
                              mask_thr_binary=0.5)),
}
LVIS_CLASS_FILES = ("give the names of its rows and its training classes: --class-names "
                    "data/lvis_v1/annotations/lvis_v1_all_classes.txt --training-classes "
                    "data/lvis_v1/annotations/lvis_v1_base_classes.txt (both written by "
                    "tools/data/dataset_converters/lvis_v1_ovd.py from lvis_v1_train.json)")


class ConversionError(Exception):
    """The file is not a CLIM / F-ViT checkpoint this converter reads."""


def _resave_hint(path: Path) -> str:
    out = path.with_name(path.stem + "_state_dict.pth")
    return (f"in a trusted environment re-save its weights alone: python -c \"import torch; "
            f"c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'state_dict': c['state_dict']}}, '{out}')\" and convert {out}")


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``.safetensors`` file or of a ``torch.load(weights_only=True)`` file
    (a whole mmengine checkpoint or ``{'state_dict': ...}``, or bare; a ``module.`` prefix is dropped;
    ``ovdense.io.read_checkpoint``).

    Raises:
        ConversionError: the file does not load so, or holds more than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            checkpoint = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's wrong file
            raise ConversionError(f"{path} is not a safetensors file ({type(e).__name__})") from e
    else:
        from ovdense.io import read_checkpoint

        try:
            checkpoint = read_checkpoint(path)  # weights_only; mmengine's message hub as placeholders
        except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as e:
            found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))  # the object that stops it
            reason = found.group(0) if found else type(e).__name__
            raise ConversionError(f"{path} does not load with torch.load(weights_only=True) "
                                  f"({reason}): it holds more than tensors (an mmengine checkpoint's "
                                  f"meta or message_hub?); {_resave_hint(path)}") from e
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ConversionError(f"{path} holds no state dict")
    others = sorted(k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ConversionError(f"{path}: its state dict holds non-tensor entries ({others[:3]}); "
                              f"{_resave_hint(path)}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}


def _shape(state: dict, key: str) -> list[int]:
    return list(state[key].shape)


def check_layout(state: dict[str, torch.Tensor]) -> str:
    """Refuse, with one line naming the mismatch, anything but the layout of CLIM's ViT FVLM; return
    which of its published models it is (a ``PRESETS`` key): an FPN and no mask head is the OV-COCO
    model, a NAS-FPN (``neck.fpn_stages.*``) and a mask head the OV-LVIS model.

    Raises:
        ConversionError: the first mismatch found.
    """
    if not any(k.startswith("backbone.visual.") for k in state):
        raise ConversionError("no backbone.visual.* keys: not a CLIM / F-ViT detector checkpoint (an ovdense "
                              "head file loads as it is; a CLIP file is --clip)")
    if "backbone.visual.transformer.resblocks.0.attn.in_proj_weight" not in state:
        raise ConversionError("the backbone is not a CLIP ViT (no backbone.visual.transformer.resblocks.*; "
                              "CLIM's RN50x64 models are ResNets): ovdense's F-ViT runs on ViTs only")
    nas = any(k.startswith("neck.fpn_stages.") for k in state)
    if "neck.lateral_convs.0.conv.weight" not in state:
        raise ConversionError("no FPN or NAS-FPN neck (neck.lateral_convs.0.conv.weight)")
    if not nas and "neck.fpn_convs.0.conv.weight" not in state:
        raise ConversionError("the neck is neither mmdet's FPN (neck.fpn_convs.*) nor its NASFPN "
                              "(neck.fpn_stages.*)")
    if "backbone.interpolate1.0.weight" not in state or "backbone.interpolate2.0.weight" not in state:
        raise ConversionError("no simple pyramid (backbone.interpolate1.*, backbone.interpolate2.0.*): not "
                              "CLIM's CLIPViT backbone")
    group = sorted(k for k in state if ".gn." in k)
    if group:
        raise ConversionError(f"the norm layers are GroupNorm ({group[0]}), not CLIM's SyncBN/BatchNorm "
                              f"(.bn.* with running statistics); this converter reads CLIM's layout only")
    for key in ("backbone.interpolate1.1.running_var", "neck.lateral_convs.0.bn.running_var",
                BOX + "shared_convs.0.bn.running_var"):
        if key not in state:
            raise ConversionError(f"no {key}: the norm layers are not CLIM's SyncBN/BatchNorm")
    width = state[BOX + "shared_fcs.0.weight"].shape[0] if BOX + "shared_fcs.0.weight" in state else None
    if width != FC_WIDTH:
        shape = _shape(state, BOX + "shared_fcs.0.weight") if width is not None else "absent"
        raise ConversionError(f"fc_out_channels is {width} ({BOX}shared_fcs.0.weight {shape}), CLIM's box "
                              f"head has {FC_WIDTH}; this converter reads CLIM's published layout only")
    if CLS_EMBEDDINGS not in state:
        raise ConversionError(f"no {CLS_EMBEDDINGS}: the class text embeddings CLIM's head was trained "
                              "against (a buffer in every FVLM checkpoint) are missing, and ovdense cannot "
                              "recompute them (CLIM's prompts); give the checkpoint as CLIM saved it")
    if BOX + "bg_embedding.weight" not in state:
        raise ConversionError(f"no {BOX}bg_embedding.weight: only CLIM's learned background "
                              "(bg_embedding='learn') converts")
    masks = any(k.startswith("roi_head.mask_head.") for k in state)
    if masks != nas:
        found = ("a NAS-FPN neck without a mask head" if nas else "an FPN neck with a mask head")
        raise ConversionError(f"{found}: CLIM publishes an FPN box model (OV-COCO) and a NAS-FPN mask "
                              "model (OV-LVIS), and this converter reads those two")
    if masks and "roi_head.mask_head.convs.0.bn.running_var" not in state:
        raise ConversionError("no roi_head.mask_head.convs.0.bn.running_var: the mask head's norm is not "
                              "CLIM's SyncBN/BatchNorm")
    dim = state["backbone.visual.proj"].shape[1]
    if state[CLS_EMBEDDINGS].dim() != 2 or state[CLS_EMBEDDINGS].shape[1] != dim:
        raise ConversionError(f"{CLS_EMBEDDINGS} is {_shape(state, CLS_EMBEDDINGS)}, not [C, {dim}] "
                              "(the visual tower's joint space)")
    return "ov-lvis" if nas else "ov-coco"


def stack_times(state: dict[str, torch.Tensor]) -> int:
    """The NAS-FPN's number of stages (``neck.fpn_stages.<i>.*``; CLIM's OV-LVIS model: 7)."""
    return 1 + max(int(k.split(".")[2]) for k in state if k.startswith("neck.fpn_stages."))


def convert_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's tensors under ovdense's keys (``PlainFViT`` / ``OvdenseFViT``): everything but the
    visual tower, the class embeddings (stored apart) and the background's ``Linear(1, D)``, which
    becomes its value at input 1, ``weight[:, 0] + bias`` (both sides L2-normalise it at use)."""
    skip = {CLS_EMBEDDINGS, BOX + "cls_temp", BOX + "bg_embedding.weight", BOX + "bg_embedding.bias"}
    head = {}
    for key, value in state.items():
        if key.startswith(("backbone.visual.", "data_preprocessor.")) or key in skip:
            continue
        for old, new in RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        head[key] = value
    if BOX + "cls_temp" in state:  # a fixed temperature (learn_cls_temp=False) is no tensor: "missing"
        head[BOX + "classifier.temperature"] = state[BOX + "cls_temp"].reshape(())
    weight, bias = state[BOX + "bg_embedding.weight"], state[BOX + "bg_embedding.bias"]  # D, 1 and D
    head[BOX + "classifier.background"] = weight[:, 0] + bias  # D: Linear(1, D) at input 1
    return head


def head_config(training_classes, preset: str = "ov-coco", stages: int = 7) -> dict:
    """The head file's config (``PlainFViT``; what ``OvdenseFViT.head_config`` holds) for one of CLIM's
    published ViT-B/16 models (``PRESETS``): its model config merged with mmdet's
    ``faster-rcnn_r50_fpn.py`` (OV-COCO) or ``mask-rcnn_r50_fpn.py`` (OV-LVIS) base, with BN for CLIM's
    SyncBN (identical in eval). ``stages``: the NAS-FPN's (OV-LVIS)."""
    settings = PRESETS[preset]
    bn = dict(type="BN", requires_grad=True)
    coder = dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4)
    if settings["neck"] == "NASFPN":
        neck = dict(type="NASFPN", in_channels=[768] * 4, out_channels=256, num_outs=5, stack_times=stages,
                    norm_cfg=bn)
    else:
        neck = dict(type="FPN", in_channels=[768] * 4, out_channels=256, num_outs=5, norm_cfg=bn)
    roi_head = dict(
        type="OvdenseFViTRoIHead",
        bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                out_channels=256, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(type="OvdenseFViTBBoxHead", in_channels=256, conv_out_channels=256,
                       fc_out_channels=FC_WIDTH, roi_feat_size=7, num_classes=len(training_classes),
                       num_shared_convs=4, num_shared_fcs=2, num_cls_fcs=1, num_reg_fcs=1, norm_cfg=bn,
                       reg_class_agnostic=True, bbox_coder=dict(coder, target_stds=[0.1, 0.1, 0.2, 0.2]),
                       alpha=settings["alpha"], beta=settings["beta"],
                       vlm_temperature=settings["vlm_temperature"], temperature=50.0))
    if settings["masks"]:
        roi_head["mask_roi_extractor"] = dict(
            type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
            out_channels=256, featmap_strides=[4, 8, 16, 32])
        roi_head["mask_head"] = dict(type="FCNMaskHead", num_convs=4, in_channels=256, conv_out_channels=256,
                                     num_classes=len(training_classes), class_agnostic=True, norm_cfg=bn)
    return dict(
        classes=list(training_classes),
        templates="imagenet80",  # for words outside the stored rows (ovdense's choice)
        method="maskclip", indices=[3, 5, 7, 11], pyramid=dict(norm="batch"),
        neck=neck,
        rpn_head=dict(type="RPNHead", in_channels=256, feat_channels=256, num_convs=2,
                      anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                            strides=[4, 8, 16, 32, 64]),
                      bbox_coder=dict(coder, target_stds=[1.0] * 4),
                      loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0)),
        roi_head=roi_head,
        test_cfg=dict(rpn=dict(nms_pre=settings["rpn_nms_pre"], max_per_img=1000,
                               nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
                      rcnn=dict(settings["rcnn"])),
    )


def merge_backbone(state: dict[str, torch.Tensor], clip: dict[str, torch.Tensor], reference: dict
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An open_clip state dict of the checkpoint's visual tower and ``clip``'s text tower (every
    key of ``reference``, the open_clip model's own state dict, with its shape), float32; and the
    notes to print (the visual towers compared, keys of ``clip`` left out).

    Raises:
        ConversionError: a key is missing, or a shape differs from the model's.
    """
    visual = {"visual." + k[len("backbone.visual."):]: v for k, v in state.items()
              if k.startswith("backbone.visual.")}
    extra = sorted(k for k in visual if k not in reference)
    if extra:
        raise ConversionError(f"backbone.{extra[0]} is not a key of the model's visual tower: not this "
                              "--model")
    merged = {**{k: v for k, v in clip.items() if not k.startswith("visual.") and k in reference}, **visual}
    for key, value in merged.items():
        want = list(reference[key].shape)
        if list(value.shape) != want and not (key == "logit_scale" and value.numel() == 1):
            where = f"backbone.{key}" if key.startswith("visual.") else f"the CLIP file's {key}"
            raise ConversionError(f"{where} is {list(value.shape)}, the model's {want}: not this --model")
    missing = sorted(set(reference) - set(merged))
    if missing:
        where = "the checkpoint's visual tower" if missing[0].startswith("visual.") else "the --clip file"
        raise ConversionError(f"{where} lacks {len(missing)} keys of the model ({missing[:3]}); give a whole "
                              "CLIP (OpenAI's ViT-B/16 as open_clip stores it, or CLIM's "
                              "openai_vitb16_coco_clim.pt)")
    merged = {k: (v.float() if v.is_floating_point() else v).reshape(reference[k].shape).contiguous()
              for k, v in merged.items()}
    notes = []
    theirs = {k: clip[k].float() for k in visual if k in clip and clip[k].shape == visual[k].shape}
    if theirs:
        differ = [k for k in theirs if not torch.equal(theirs[k], visual[k].float())]
        if differ:
            delta = max((theirs[k] - visual[k].float()).abs().max().item() for k in differ)
            notes.append(f"the --clip file's visual tower differs from the checkpoint's ({len(differ)} of "
                         f"{len(visual)} tensors, max |Δ| {delta:.3g}): the backbone file takes the "
                         "checkpoint's, which the detector was trained with")
        else:
            notes.append("the --clip file's visual tower equals the checkpoint's")
    ignored = sorted(k for k in clip if not k.startswith("visual.") and k not in reference)
    if ignored:
        notes.append(f"left out {len(ignored)} keys of the --clip file that the model does not have "
                     f"({ignored[:3]})")
    return merged, notes


def read_clip(spec: str, model: str) -> dict[str, torch.Tensor]:
    """``--clip``: a CLIP file (safetensors or ``weights_only=True``), or an open_clip tag of ``model``."""
    if Path(spec).is_file():
        return load_state(spec)
    from ovdense import create_backbone

    return create_backbone(model, pretrained=spec).model.state_dict()


def convert(checkpoint: str | Path, out_dir: str | Path, clip: str, model: str = "ViT-B-16",
            class_names=None, training_classes=None, dtype: torch.dtype | None = None
            ) -> tuple[Path, Path, list[str]]:
    """Check and convert ``checkpoint``; write ``OUT/backbone.safetensors`` and
    ``OUT/fvit-head.safetensors``. Returns both paths and the notes to print.

    Args:
        class_names: the names of the ``cls_embeddings`` rows (OV-COCO default: COCO's 80, in id order;
            OV-LVIS: needed, the 1203 names in category-id order).
        training_classes: the head's training vocabulary (OV-COCO default: the 48 base classes;
            OV-LVIS: needed, the 866 frequent and common classes).
    Raises:
        ConversionError, OvdenseError: with one line saying what is wrong.
    """
    from safetensors.torch import save

    from ovdense import create_backbone
    from ovdense.heads.fvit import PlainFViT, StoredText, key_mismatch, save_head
    from ovdense.io import write_bytes

    checkpoint = Path(checkpoint)
    state = load_state(checkpoint)
    try:
        preset = check_layout(state)
    except ConversionError as e:
        raise ConversionError(f"{checkpoint}: {e}") from None
    rows = state[CLS_EMBEDDINGS].shape[0]
    if preset == "ov-lvis" and (class_names is None or training_classes is None):
        raise ConversionError(f"{checkpoint} is CLIM's OV-LVIS model ({rows} class embeddings): "
                              f"{LVIS_CLASS_FILES}")
    names = list(class_names) if class_names is not None else list(COCO_CLASSES)
    if len(names) != rows:
        raise ConversionError(f"{checkpoint}: {CLS_EMBEDDINGS} has {rows} rows, the class names "
                              f"{len(names)}: give --class-names FILE (one name per row, in the rows' order)")
    training = list(training_classes) if training_classes is not None else list(OV_COCO_BASE)
    unknown = sorted(set(training) - set(names))
    if unknown:
        raise ConversionError(f"training classes not among the class names: {unknown[:3]}")
    reference = create_backbone(model, pretrained=None).model.state_dict()
    backbone_state, notes = merge_backbone(state, read_clip(clip, model), reference)
    del reference
    out = Path(out_dir)
    backbone_path = write_bytes(out / "backbone.safetensors", save(backbone_state))
    del backbone_state
    backbone = create_backbone(model, pretrained=str(backbone_path))  # strict; GELU (a file)
    config = head_config(training, preset, stack_times(state) if PRESETS[preset]["neck"] == "NASFPN" else 7)
    detector = PlainFViT(backbone, config)
    head, expected = convert_head(state), detector.state_dict()
    missing, unexpected, wrong = key_mismatch(head, expected)
    wrong = [f"{k} {list(head[k].shape)}" for k in wrong]
    if missing or unexpected or wrong:
        raise ConversionError(f"{checkpoint} does not fit CLIM's {preset.upper()} F-ViT (ovdense's names): "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}")
    detector.load_state_dict(head, strict=True)
    stored = StoredText(names, state[CLS_EMBEDDINGS],
                        source=f"{CLS_EMBEDDINGS} of {checkpoint.name} (CLIM: ovdet/tools/"
                               "generate_text_embeddings.py, 63 hand-crafted templates)")
    head_path = save_head(out / "fvit-head.safetensors", detector.state_dict(), backbone, config, dtype=dtype,
                          stored_text=stored)
    notes.append(f"CLIM's {preset.upper()} model ({PRESETS[preset]['clim_config']}): {len(training)} "
                 f"training classes, {rows} stored class embeddings; evaluate it: python tools/test.py "
                 f"{PRESETS[preset]['ovdense_config']} --cfg-options model.clip.pretrained={backbone_path} "
                 f"model.head_checkpoint={head_path}")
    return backbone_path, head_path, notes


def _read_names(path: str | None) -> list[str] | None:
    if path is None:
        return None
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="CLIM's detector checkpoint (.pth or .safetensors)")
    parser.add_argument("out_dir", help="folder for backbone.safetensors and fvit-head.safetensors")
    parser.add_argument("--clip", required=True,
                        help="the text tower's CLIP: a file (OpenAI's ViT-B/16 as open_clip stores it, or "
                             "CLIM's openai_vitb16_coco_clim.pt) or an open_clip tag of --model (openai)")
    parser.add_argument("--model", default="ViT-B-16", help="the open_clip model (default ViT-B-16)")
    parser.add_argument("--class-names", default=None,
                        help="a file naming the cls_embeddings rows, one per line (OV-COCO default: COCO's "
                             "80; OV-LVIS: lvis_v1_all_classes.txt of lvis_v1_ovd.py)")
    parser.add_argument("--training-classes", default=None,
                        help="a file of the head's training classes (OV-COCO default: the 48 base classes; "
                             "OV-LVIS: lvis_v1_base_classes.txt of lvis_v1_ovd.py)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="the head file's floating tensors (the stored embeddings stay float32)")
    args = parser.parse_args(argv)
    from ovdense.errors import OvdenseError

    try:
        dtype = torch.float16 if args.dtype == "float16" else None
        backbone_path, head_path, notes = convert(args.checkpoint, args.out_dir, args.clip, args.model,
                                                  _read_names(args.class_names),
                                                  _read_names(args.training_classes), dtype)
    except (ConversionError, OvdenseError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {backbone_path} (open_clip {args.model}: the checkpoint's visual tower, --clip's text "
          "tower)")
    print(f"wrote {head_path}")
    print(f"run: ovdense detect IMAGE --model {args.model} --pretrained {backbone_path} "
          f"--head-checkpoint {head_path} --classes \"person,dog,…\"")

    return 0


if __name__ == "__main__":
    sys.exit(main())
