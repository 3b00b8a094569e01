"""tools/model_converters/fvit2ovdense.py: a CLIM / F-ViT checkpoint (wusize/CLIM ``ovdet``, OV-COCO OpenAI
ViT-B/16) into an open_clip backbone file and an F-ViT head file with the class embeddings it was trained
against (``ovdense.heads.fvit.StoredText``).

The checkpoint is synthetic: CLIM's FVLM state dict written key by key from its layout (the design note
``clim-fvit-notes.md`` §3.1; checked against the model CLIM's own config builds when its mirror is here),
random tensors, saved with ``torch.save`` as ``{'state_dict': ...}``. The head's tensors are checked
against the checkpoint's under the key map written out here; with the CLIM mirror
(``OVDENSE_CLIM_REPO``, default ``/work/.mirror/wusize+CLIM/repo``) and mmdet, CLIM's own ``FVLM.predict``
on the same weights and input gives ``Detector``'s detections. Refusals are one line each.
"""

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_clim import CLIM_CONFIG, clim_checkout, import_clim
from tool_runs import load_tool, run_cli

from ovdense.errors import OvdenseError
from ovdense.heads import fvit as det

ROOT = Path(__file__).resolve().parent.parent
CLIM_TEXT = "ovdet/data/metadata/coco_openai_vitb16_hand_craft.npy"
# COCO 2017's categories by id (mmdet's CocoDataset.METAINFO), and OVR-CNN's 48 base classes: written out
# here, not read from the converter
COCO = (
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
# CLIM's class_weight (the OV-COCO config, l.5-12): 1 for the 48 base classes, in COCO order
CLIM_BASE_MASK = [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1,
                  1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1,
                  0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1]
BOX = "roi_head.bbox_head."
# OVR-CNN's 17 novel classes (the other 15 of COCO's 80 are in neither split)
OV_COCO_NOVEL = ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
                 "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors")


def clim_layout() -> dict[str, tuple[int, ...]]:
    """CLIM's FVLM (OV-COCO, OpenAI ViT-B/16) state dict: every key and shape (note §3.1)."""
    W, D, L, C = 768, 512, 12, 256  # tower width, joint space, blocks, FPN channels
    shapes: dict[str, tuple[int, ...]] = {}
    v = "backbone.visual."
    shapes.update({v + "class_embedding": (W,), v + "positional_embedding": (197, W), v + "proj": (W, D),
                   v + "conv1.weight": (W, 3, 16, 16)})
    for name in ("ln_pre", "ln_post"):
        shapes[f"{v}{name}.weight"] = shapes[f"{v}{name}.bias"] = (W,)
    for i in range(L):
        b = f"{v}transformer.resblocks.{i}."
        for name in ("ln_1", "ln_2"):
            shapes[f"{b}{name}.weight"] = shapes[f"{b}{name}.bias"] = (W,)
        shapes.update({b + "attn.in_proj_weight": (3 * W, W), b + "attn.in_proj_bias": (3 * W,),
                       b + "attn.out_proj.weight": (W, W), b + "attn.out_proj.bias": (W,),
                       b + "mlp.c_fc.weight": (4 * W, W), b + "mlp.c_fc.bias": (4 * W,),
                       b + "mlp.c_proj.weight": (W, 4 * W), b + "mlp.c_proj.bias": (W,)})

    def bn(prefix: str, n: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (n,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    for conv in ("backbone.interpolate1.0", "backbone.interpolate1.3", "backbone.interpolate2.0"):
        shapes[conv + ".weight"], shapes[conv + ".bias"] = (W, W, 2, 2), (W,)
    bn("backbone.interpolate1.1", W)
    for i in range(4):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (C, W, 1, 1)
        bn(f"neck.lateral_convs.{i}.bn", C)
        shapes[f"neck.fpn_convs.{i}.conv.weight"] = (C, C, 3, 3)
        bn(f"neck.fpn_convs.{i}.bn", C)
    for i in range(2):
        shapes[f"rpn_head.rpn_conv.{i}.conv.weight"] = (C, C, 3, 3)
        shapes[f"rpn_head.rpn_conv.{i}.conv.bias"] = (C,)
    shapes.update({"rpn_head.rpn_cls.weight": (3, C, 1, 1), "rpn_head.rpn_cls.bias": (3,),
                   "rpn_head.rpn_reg.weight": (12, C, 1, 1), "rpn_head.rpn_reg.bias": (12,)})
    for i in range(4):
        shapes[f"{BOX}shared_convs.{i}.conv.weight"] = (C, C, 3, 3)
        bn(f"{BOX}shared_convs.{i}.bn", C)
    for name, shape in (("shared_fcs.0", (1024, C * 49)), ("shared_fcs.1", (1024, 1024)),
                        ("cls_fcs.0", (1024, 1024)), ("reg_fcs.0", (1024, 1024)), ("fc_cls", (D, 1024)),
                        ("fc_reg", (4, 1024))):
        shapes[f"{BOX}{name}.weight"], shapes[f"{BOX}{name}.bias"] = shape, shape[:1]
    shapes.update({BOX + "cls_temp": (), BOX + "bg_embedding.weight": (D, 1), BOX + "bg_embedding.bias": (D,),
                   BOX + "cls_embeddings": (80, D)})
    return shapes


NAS_CELLS_WITH_CONV = ("gp_64_4", "sum_44_4", "sum_43_3", "sum_34_4", "sum_55_5", "sum_77_7", "gp_75_6")


def lvis_layout(rows: int = 1203) -> dict[str, tuple[int, ...]]:
    """CLIM's OV-LVIS FVLM (mmdet's NASFPN, 7 stages, and a class-agnostic FCNMaskHead with SyncBN; the
    rest as the OV-COCO model) written out key by key: mmcv's merge cells hold a ReLU → 3×3 conv (with
    bias) → BN ``out_conv``, except ``gp_43_5`` and ``gp_54_7``, which have none."""
    W, D, C = 768, 512, 256
    shapes = {k: v for k, v in clim_layout().items() if not k.startswith("neck.")}

    def bn(prefix: str, n: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (n,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    for i in range(4):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (C, W, 1, 1)
        bn(f"neck.lateral_convs.{i}.bn", C)
    shapes["neck.extra_downsamples.0.0.conv.weight"] = (C, C, 1, 1)
    bn("neck.extra_downsamples.0.0.bn", C)
    for stage in range(7):
        for cell in NAS_CELLS_WITH_CONV:
            prefix = f"neck.fpn_stages.{stage}.{cell}.out_conv"
            shapes[prefix + ".conv.weight"], shapes[prefix + ".conv.bias"] = (C, C, 3, 3), (C,)
            bn(prefix + ".bn", C)
    for i in range(4):
        shapes[f"roi_head.mask_head.convs.{i}.conv.weight"] = (C, C, 3, 3)
        bn(f"roi_head.mask_head.convs.{i}.bn", C)
    mask = "roi_head.mask_head."
    shapes.update({mask + "upsample.weight": (C, C, 2, 2), mask + "upsample.bias": (C,),
                   mask + "conv_logits.weight": (1, C, 1, 1), mask + "conv_logits.bias": (1,),
                   BOX + "cls_embeddings": (rows, D)})
    return shapes


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for ``layout``: weights ~ N(0, 1/fan_in) (fan_in: all but the first dimension),
    LayerNorm and BN scales and BN statistics spread (so a BN/key mix-up changes the output), CLIM's
    temperature 50, unit-norm class embeddings."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(0, dtype=torch.long)
        elif key == BOX + "cls_temp":
            value = torch.tensor(50.0)
        elif key == BOX + "cls_embeddings":
            value = F.normalize(torch.randn(shape, generator=g), dim=-1)
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("running_var") or key.endswith(("bn.weight", "interpolate1.1.weight")):
            value = 0.5 + torch.rand(shape, generator=g)  # U[0.5, 1.5]
        elif ".ln_" in key and key.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            value = torch.randn(shape, generator=g) * torch.Size(shape[1:]).numel() ** -0.5
        else:
            value = 0.02 * torch.randn(shape, generator=g)
        state[key] = value
    for name in ("cls_fcs.0", "fc_cls"):  # rows of zero mean: the common part of ReLU'd inputs cancels, so
        weight = state[f"{BOX}{name}.weight"]  # region embeddings differ and several classes win
        state[f"{BOX}{name}.weight"] = weight - weight.mean(dim=1, keepdim=True)
    return state


def ovdense_key(key: str) -> str | None:
    """The note's Appendix A map, written out: a CLIM head key's name in the ovdense head file (``None``:
    not a head tensor under its own name)."""
    if key.startswith("backbone.visual.") or key in (BOX + "cls_embeddings", BOX + "bg_embedding.weight",
                                                      BOX + "bg_embedding.bias"):
        return None
    if key == BOX + "cls_temp":
        return BOX + "classifier.temperature"
    if key.startswith("backbone.interpolate1."):
        return "backbone.pyramid.up4." + key[len("backbone.interpolate1."):]
    if key.startswith("backbone.interpolate2.0."):
        return "backbone.pyramid.up2." + key[len("backbone.interpolate2.0."):]
    return key


def image() -> np.ndarray:
    """A 180×240 toy scene (not square: the position embedding is resized to a 14×18 grid at 288 px)."""
    from ovdense.data.synthetic import SceneConfig, render_scene

    return render_scene(np.random.default_rng([5, 27]), SceneConfig(size=(180, 240))).image


# --------------------------------------------------------------------------------------------
# The converted files


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The synthetic checkpoint (``{'state_dict': ...}``), a CLIP file in CLIM's fork's training layout
    (``{'epoch', 'name', 'state_dict'}``, ``module.`` prefix: a random text tower, the checkpoint's
    visual tower with one tensor changed), both written with ``torch.save``; then the converter's
    ``main``: its exit code and printed lines."""
    import open_clip

    folder = tmp_path_factory.mktemp("clim")
    state = random_state(clim_layout())
    torch.save({"state_dict": state}, folder / "ovdet_openai_vitb16_ov_coco_clim.pth")
    torch.manual_seed(1)
    clip = open_clip.create_model("ViT-B-16").state_dict()  # random text tower
    clip.update({"visual." + k[len("backbone.visual."):]: v.clone() for k, v in state.items()
                 if k.startswith("backbone.visual.")})
    clip["visual.ln_post.bias"] += 0.5
    torch.save({"epoch": 3, "name": "clim", "state_dict": {"module." + k: v for k, v in clip.items()}},
               folder / "openai_vitb16_coco_clim.pt")
    out = folder / "out"
    converter = load_tool("model_converters/fvit2ovdense")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = converter.main([str(folder / "ovdet_openai_vitb16_ov_coco_clim.pth"), str(out),
                               "--clip", str(folder / "openai_vitb16_coco_clim.pt")])
    assert code == 0
    return dict(state=state, clip=clip, out=out, printed=printed.getvalue(),
                backbone_file=out / "backbone.safetensors", head=out / "fvit-head.safetensors")


@pytest.fixture(scope="module")
def backbone(converted, tmp_path_factory):
    """The converted backbone, as ``ovdense detect --pretrained FILE`` builds it (a file: exact GELU)."""
    from ovdense import create_backbone

    return create_backbone("ViT-B-16", pretrained=str(converted["backbone_file"]),
                           cache_dir=tmp_path_factory.mktemp("text-cache"))


def test_head_and_backbone_hold_the_checkpoints_tensors(converted, backbone):
    from safetensors.torch import load_file

    state, clip = converted["state"], converted["clip"]
    head, config = det.load_head(converted["head"], backbone)
    want = {ovdense_key(k): v for k, v in state.items() if ovdense_key(k) is not None}
    want[BOX + "classifier.background"] = (state[BOX + "bg_embedding.weight"][:, 0]
                                           + state[BOX + "bg_embedding.bias"])  # Linear(1, D) at input 1
    assert set(head) == set(want)
    for key, value in want.items():
        assert torch.equal(head[key], value.reshape(head[key].shape)), key
    # CLIM's settings: BN, FC 1024, nms_pre 1000, α 0.1, β 0.8, T 75, the 48 base classes
    box = config["roi_head"]["bbox_head"]
    assert box["fc_out_channels"] == 1024
    assert (box["alpha"], box["beta"], box["vlm_temperature"]) == (0.1, 0.8, 75.0)
    assert box["norm_cfg"]["type"] == config["neck"]["norm_cfg"]["type"] == "BN"
    assert config["pyramid"]["norm"] == "batch" and config["test_cfg"]["rpn"]["nms_pre"] == 1000
    assert config["test_cfg"]["rcnn"] == dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.4),
                                              max_per_img=100)
    assert config["classes"] == [c for c, base in zip(COCO, CLIM_BASE_MASK) if base]
    # the stored text: CLIM's buffer with the 80 COCO names, float32 as it was
    stored = det.load_stored_text(converted["head"], backbone)
    assert stored.names == list(COCO) and torch.equal(stored.embeddings, state[BOX + "cls_embeddings"])
    # the backbone file: the checkpoint's visual tower, the CLIP file's text tower
    written = load_file(str(converted["backbone_file"]))
    visual = {k: v for k, v in state.items() if k.startswith("backbone.visual.")}
    assert set(written) == set(clip) and len(visual) == 152
    for key, value in written.items():
        source = state["backbone." + key] if key.startswith("visual.") else clip[key]
        assert torch.equal(value, source.reshape(value.shape)), key
    assert not torch.equal(written["visual.ln_post.bias"], clip["visual.ln_post.bias"])
    assert ("note: the --clip file's visual tower differs from the checkpoint's (1 of 152 tensors, "
            "max |Δ| 0.5)" in converted["printed"])
    assert backbone.model.visual.transformer.resblocks[0].mlp.gelu.__class__ is torch.nn.GELU  # not QuickGELU


def test_stored_rows_for_stored_names_and_the_backbones_text_for_others(converted, backbone):
    classes = ["person", "kettle", "dog", "traffic light"]
    detector = det.Detector(backbone, classes, converted["head"], image_size=288)
    rows = converted["state"][BOX + "cls_embeddings"]
    assert detector.text_sources == ["stored", "encoded", "stored", "stored"]
    for k, row in ((0, 0), (2, 16), (3, 9)):  # person, dog, traffic light: their COCO rows
        assert torch.equal(detector.text[k].cpu(), rows[row])
    torch.testing.assert_close(detector.text[1], backbone.encode_text(["kettle"], "imagenet80")[0])
    assert detector.seen.tolist() == [True, False, False, False]  # dog is novel, traffic light neither


def test_a_stored_text_round_trips_and_old_heads_store_none(toy, fvit_head, tmp_path):
    """On the toy: a head saved with stored rows (float16 head, float32 rows) gives them to those names;
    heads without (the conftest head, the shipped toy head, unchanged) encode every class."""
    from ovdense.backbone.clip import ASSETS

    state, config = det.load_head(fvit_head, toy)
    rows = F.normalize(torch.randn(2, toy.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    stored = det.StoredText(["zebra", "red circle"], rows, source="a test")
    path = det.save_head(tmp_path / "stored.safetensors", state, toy, config, dtype=torch.float16,
                         stored_text=stored)
    loaded, loaded_config = det.load_head(path, toy)
    assert set(loaded) == set(state) and loaded_config == config  # the stored rows are no model tensor
    again = det.load_stored_text(path, toy)
    assert again.names == ["zebra", "red circle"] and again.source == "a test"
    assert torch.equal(again.embeddings, rows)  # float32, not rounded to float16
    classes = ["red circle", "blue star", "zebra"]
    detector = det.Detector(toy, classes, path, score_threshold=0.0)
    assert detector.text_sources == ["stored", "encoded", "stored"]
    assert torch.equal(detector.text[0], rows[1]) and torch.equal(detector.text[2], rows[0])
    torch.testing.assert_close(detector.text[1], toy.encode_text(["blue star"], detector.model.templates)[0])
    assert len(detector.predict(image()).boxes) > 0
    for old in (fvit_head, ASSETS / det.TOY_HEAD_FILE):
        assert det.load_stored_text(old, toy) is None
        plain = det.Detector(toy, classes, old)
        assert plain.stored_text is None and plain.text_sources == ["encoded"] * 3
        torch.testing.assert_close(plain.text, toy.encode_text(classes, plain.model.templates))
    with pytest.raises(OvdenseError, match=r"one row per name"):
        det.StoredText(["a", "b"], rows[:1])


def test_the_cli_runs_the_converted_files(converted, backbone, tmp_path, capsys, env_cache):
    classes = ["person", "kettle", "dog"]
    argv = ["detect", tmp_path / "scene.png", "--model", "ViT-B-16", "--pretrained",
            converted["backbone_file"], "--head-checkpoint", converted["head"], "--classes",
            ",".join(classes), "--image-size", "288", "--score-threshold", "0", "--out", tmp_path / "out"]
    from PIL import Image

    Image.fromarray(image()).save(tmp_path / "scene.png")
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "2 of 3 classes take the text embeddings stored in the head file" in stdout
    report = json.loads((tmp_path / "out" / "scene.json").read_text())
    want = det.Detector(backbone, classes, converted["head"], score_threshold=0.0,
                        image_size=288).predict(tmp_path / "scene.png")
    assert report["classes"] == classes and len(report["detections"]) == len(want.scores) > 0
    for found, box, score, k in zip(report["detections"], want.boxes, want.scores, want.class_ids):
        x1, y1, x2, y2 = box
        np.testing.assert_allclose(found["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
        assert found["category_id"] == int(k) and found["score"] == pytest.approx(float(score), abs=1e-6)


# --------------------------------------------------------------------------------------------
# Against CLIM's own model


@pytest.fixture(scope="module")
def clim_tree(tmp_path_factory) -> Path:
    """CLIM's detector, its open_clip fork and the OV-COCO text file, from the mirror, or skip."""
    pytest.importorskip("mmcv.ops", reason="needs compiled mmcv ops: python tools/misc/build_mmcv.py")
    pytest.importorskip("mmdet", reason="needs mmdet 3.3: pip install -e '.[mm]'")
    for name in ("timm", "transformers"):  # CLIM's open_clip fork imports them
        pytest.importorskip(name, reason=f"CLIM's open_clip fork imports {name}")
    return clim_checkout(tmp_path_factory.mktemp("clim-tree"),
                         ("src/open_clip", "ovdet/ovdet", "ovdet/configs", CLIM_TEXT))


def test_detections_equal_clims_own_predict(clim_tree, converted, backbone):
    """CLIM's FVLM built from its OV-COCO config, the synthetic checkpoint loaded strictly (so the layout
    written above is CLIM's), and ``Detector`` on the converted files with the 80 COCO names (the stored
    rows; base/novel by name = CLIM's ``class_weight``), on the same input tensor: the same detections."""
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import_clim(clim_tree)
    cfg = Config.fromfile(str(clim_tree / CLIM_CONFIG))
    cfg.model.backbone.pretrained = None
    cfg.model.roi_head.bbox_head.cls_embeddings_path = str(clim_tree / CLIM_TEXT)
    assert cfg.model.roi_head.bbox_head.loss_cls.class_weight == CLIM_BASE_MASK + [0.6]
    init_default_scope("mmdet")
    clim = MODELS.build(cfg.model).eval()
    assert {k: tuple(v.shape) for k, v in clim.state_dict().items()} == clim_layout()
    clim.load_state_dict(converted["state"], strict=True)

    detector = det.Detector(backbone, list(COCO), converted["head"], score_threshold=0.0, image_size=288)
    assert detector.text_sources == ["stored"] * 80
    rgb = image()
    x, meta = detector.preprocess(rgb)  # 1, 3, 224, 288: a 216×288 image, zero-padded
    shape = tuple(x.shape[-2:])
    sample = DetDataSample(metainfo=dict(meta, batch_input_shape=shape, pad_shape=shape))
    with torch.no_grad():
        want = clim.predict(x, [sample], rescale=True)[0].pred_instances
    got = detector.predict(rgb)
    assert len(got.scores) == len(want.scores) > 10 and len(set(got.class_ids.tolist())) > 3
    # two detections of one class whose scores differ by float rounding may come in either order: pair
    # each of ours with CLIM's of the same label and score (1e-4) whose box is nearest
    boxes, scores, labels = want.bboxes.numpy(), want.scores.numpy(), want.labels.numpy()
    free = list(range(len(scores)))
    for box, score, label in zip(got.boxes, got.scores, got.class_ids):
        same = [j for j in free if labels[j] == label and abs(scores[j] - score) <= 1e-4]
        assert same, (box, score, label)
        j = min(same, key=lambda j: np.abs(boxes[j] - box).max())
        np.testing.assert_allclose(box, boxes[j], atol=1e-2, rtol=0)
        free.remove(j)


# --------------------------------------------------------------------------------------------
# Refusals


def skeleton() -> dict[str, torch.Tensor]:
    """CLIM's key layout with one-element tensors, but for the shapes the layout check reads."""
    state = {k: torch.zeros(1) for k in clim_layout()}
    state[BOX + "shared_fcs.0.weight"] = torch.zeros(1024, 1)
    state["backbone.visual.proj"] = torch.zeros(1, 512)
    state[BOX + "cls_embeddings"] = torch.zeros(80, 512)
    return state


class NotATensor:
    pass


def _gn(state):
    out = {}
    for k, v in state.items():
        if ".bn." in k and not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            out[k.replace(".bn.", ".gn.")] = v
        elif ".bn." not in k:
            out[k] = v
    return out


REFUSALS = {
    "pickle": (lambda s: {"state_dict": s, "meta": NotATensor()},
               r"does not load with torch\.load\(weights_only=True\).*re-save its weights alone.*"
               r"'state_dict'"),
    "group norm": (lambda s: {"state_dict": _gn(s)}, r"GroupNorm \(neck\.fpn_convs\.0\.gn\.bias\)"),
    "fc 512": (lambda s: {"state_dict": {**s, BOX + "shared_fcs.0.weight": torch.zeros(512, 1)}},
               r"fc_out_channels is 512 \(roi_head\.bbox_head\.shared_fcs\.0\.weight \[512, 1\]\), "
               r"CLIM's box head has 1024"),
    "no cls_embeddings": (lambda s: {"state_dict": {k: v for k, v in s.items() if "cls_embeddings" not in k}},
                          r"no roi_head\.bbox_head\.cls_embeddings"),
    "nasfpn without masks": (
        lambda s: {"state_dict": {**s, "neck.fpn_stages.0.gp_64_4.out_conv.conv.weight": torch.zeros(1)}},
        r"a NAS-FPN neck without a mask head: CLIM publishes an FPN box model \(OV-COCO\) and a NAS-FPN "
        r"mask model \(OV-LVIS\)"),
    "fpn with masks": (
        lambda s: {"state_dict": {**s, "roi_head.mask_head.conv_logits.weight": torch.zeros(1)}},
        r"an FPN neck with a mask head"),
    "lvis without class files": (
        lambda s: {"state_dict": {**{k: torch.zeros(1) for k in lvis_layout()},
                                  **{k: v for k, v in s.items() if k.startswith(("backbone.visual.proj", BOX))
                                     and not k.endswith("cls_embeddings")},
                                  BOX + "cls_embeddings": torch.zeros(1203, 512)}},
        r"CLIM's OV-LVIS model \(1203 class embeddings\): give the names of its rows and its training "
        r"classes: --class-names .*lvis_v1_all_classes\.txt --training-classes .*lvis_v1_base_classes\.txt"),
    "resnet": (lambda s: {"state_dict": {**{k: v for k, v in s.items() if ".resblocks." not in k},
                                         "backbone.visual.layer1.0.conv1.weight": torch.zeros(1)}},
               r"not a CLIP ViT"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line(case, tmp_path, capsys):
    converter = load_tool("model_converters/fvit2ovdense")
    converter.check_layout(skeleton())  # the skeleton itself passes: each refusal is its one change
    make, message = REFUSALS[case]
    path = tmp_path / "checkpoint.pth"
    torch.save(make(skeleton()), path)
    code = converter.main([str(path), str(tmp_path / "out"), "--clip", str(tmp_path / "no-clip.pt")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written


# --------------------------------------------------------------------------------------------
# CLIM's OV-LVIS model (NAS-FPN, masks)


def _lvis_base(rows: int) -> list[bool]:
    return [i % 3 != 0 for i in range(rows)]  # any fixed split: the converter takes it from the files


@pytest.fixture(scope="module")
def converted_lvis(tmp_path_factory, converted):
    """A synthetic OV-LVIS checkpoint (``lvis_layout``, random; the visual tower is the OV-COCO
    fixture's, so ``--clip`` can be its CLIP file), and the two class files as lvis_v1_ovd.py writes
    them: 1203 names and the base ones (here every third class is "rare"). The neck's BN statistics are
    spread as the layout's others; the NAS-FPN's output is then large, which this test does not mind
    (tests/test_fvit_official_lvis.py compares the detector with CLIM's on calibrated weights)."""
    folder = tmp_path_factory.mktemp("clim-lvis")
    state = random_state(lvis_layout(), seed=3)
    state.update({k: v for k, v in converted["state"].items() if k.startswith("backbone.visual.")})
    torch.save({"state_dict": state}, folder / "ovdet_openai_vitb16_ov_lvis_clim.pth")
    names = [f"category {i}" for i in range(1203)]
    base = [n for n, b in zip(names, _lvis_base(1203)) if b]
    (folder / "lvis_v1_all_classes.txt").write_text("\n".join(names) + "\n")
    (folder / "lvis_v1_base_classes.txt").write_text("\n".join(base) + "\n")
    converter = load_tool("model_converters/fvit2ovdense")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = converter.main([str(folder / "ovdet_openai_vitb16_ov_lvis_clim.pth"), str(folder / "out"),
                               "--clip", str(converted["out"].parent / "openai_vitb16_coco_clim.pt"),
                               "--class-names", str(folder / "lvis_v1_all_classes.txt"),
                               "--training-classes", str(folder / "lvis_v1_base_classes.txt")])
    assert code == 0
    return dict(state=state, names=names, base=base, folder=folder, printed=printed.getvalue(),
                backbone_file=folder / "out" / "backbone.safetensors",
                head=folder / "out" / "fvit-head.safetensors")


def test_lvis_head_holds_the_checkpoints_tensors(converted_lvis, backbone):
    """The OV-LVIS head: every CLIM tensor under its ovdense name (the NAS-FPN and the mask head by their
    own names), CLIM's OV-LVIS settings, the 1203 stored rows under their names, the 802 training
    classes of the class file; the backbone file equals the OV-COCO one (the same visual tower and CLIP
    file) and so the same ``backbone`` loads the head."""
    state = converted_lvis["state"]
    head, config = det.load_head(converted_lvis["head"], backbone)
    want = {ovdense_key(k): v for k, v in state.items() if ovdense_key(k) is not None}
    want[BOX + "classifier.background"] = (state[BOX + "bg_embedding.weight"][:, 0]
                                           + state[BOX + "bg_embedding.bias"])
    assert set(head) == set(want)
    assert sum(k.startswith("neck.fpn_stages.") for k in head) == 7 * 7 * 7  # 7 stages, 7 convs, 7 tensors
    for key, value in want.items():
        assert torch.equal(head[key], value.reshape(head[key].shape)), key
    assert config["neck"] == dict(type="NASFPN", in_channels=[768] * 4, out_channels=256, num_outs=5,
                                  stack_times=7, norm_cfg=dict(type="BN", requires_grad=True))
    box, mask = config["roi_head"]["bbox_head"], config["roi_head"]["mask_head"]
    assert (box["alpha"], box["beta"], box["vlm_temperature"]) == (0.35, 0.65, 50.0)
    assert box["fc_out_channels"] == 1024
    assert mask["class_agnostic"] and mask["norm_cfg"]["type"] == "BN" and mask["num_convs"] == 4
    assert config["roi_head"]["mask_roi_extractor"]["roi_layer"]["output_size"] == 14
    assert config["test_cfg"]["rpn"]["nms_pre"] == 2000
    assert config["test_cfg"]["rcnn"] == dict(score_thr=0.0001, nms=dict(type="nms", iou_threshold=0.5),
                                              max_per_img=300, mask_thr_binary=0.5)
    assert config["classes"] == converted_lvis["base"] and len(config["classes"]) == 802
    stored = det.load_stored_text(converted_lvis["head"], backbone)
    assert stored.names == converted_lvis["names"]
    assert torch.equal(stored.embeddings, state[BOX + "cls_embeddings"])
    assert "OV-LVIS model (mask_rcnn_nasfpn_openai_vitb16_clim_bs64_ov_lvis_4x.py)" \
        in converted_lvis["printed"]
    assert "tools/test.py configs/ovdet/fvit_vitb16_ovlvis_clim.py" in converted_lvis["printed"]
    detector = det.Detector(backbone, ["category 1", "category 3", "kettle"], converted_lvis["head"],
                            score_threshold=0.0, image_size=288)
    assert detector.text_sources == ["stored", "stored", "encoded"]
    assert detector.seen.tolist() == [True, False, False]
    result = detector.predict(image())
    assert result.masks is not None and result.masks.shape == (len(result.scores), 180, 240)


def test_lvis_layout_is_clims(clim_tree_lvis, converted_lvis):
    """With the mirror: CLIM's OV-LVIS model, built from its own config, has exactly ``lvis_layout``'s
    keys and shapes, and takes the synthetic checkpoint strictly."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import_clim(clim_tree_lvis)
    cfg = Config.fromfile(str(clim_tree_lvis / CLIM_LVIS_CONFIG))
    cfg.model.backbone.pretrained = None
    init_default_scope("mmdet")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(clim_tree_lvis / "ovdet")  # its text rows' and class weights' paths
        clim = MODELS.build(cfg.model)
    assert {k: tuple(v.shape) for k, v in clim.state_dict().items()} == lvis_layout()
    clim.load_state_dict(converted_lvis["state"], strict=True)


CLIM_LVIS_CONFIG = ("ovdet/configs/clip_based/openai_vitb16/"
                    "mask_rcnn_nasfpn_openai_vitb16_clim_bs64_ov_lvis_4x.py")


@pytest.fixture(scope="module")
def clim_tree_lvis(tmp_path_factory) -> Path:
    pytest.importorskip("mmcv.ops", reason="needs compiled mmcv ops: python tools/misc/build_mmcv.py")
    pytest.importorskip("mmdet", reason="needs mmdet 3.3: pip install -e '.[mm]'")
    for name in ("timm", "transformers"):
        pytest.importorskip(name, reason=f"CLIM's open_clip fork imports {name}")
    metadata = "ovdet/data/metadata/"
    return clim_checkout(tmp_path_factory.mktemp("clim-tree-lvis"),
                         ("src/open_clip", "ovdet/ovdet", "ovdet/configs",
                          metadata + "lvis_openai_vitb16_hand_craft.npy",
                          metadata + "lvis_v1_train_cat_norare_info.json"))


# --------------------------------------------------------------------------------------------
# tools/test.py on the converted files


def test_tools_test_runs_the_converted_files_with_clims_protocol(converted, backbone, tmp_path):
    """``tools/test.py configs/ovdet/fvit_vitb16_ovcoco_clim.py --cfg-options model.clip.pretrained=BACKBONE
    model.head_checkpoint=HEAD`` (no .pth) on a COCO-layout val set of three 640 × 640 images: the mm
    path loads the converted head and its 80 stored text rows, and its detections (the metric's dumped
    json) are ``Detector``'s on the same files (the same 640 input: the config pads to 640 × 640, the
    Detector to a multiple of 32). The ground truth is Detector's own top detections, so the reported
    base and novel AP50 are high but not 1 and equal what pycocotools computes on Detector's detections
    alone. (Ground truth: every other of Detector's best 24 per image, so the ones between are false
    positives, and a 10 px "person" or "dog" that nothing finds.)"""
    pytest.importorskip("mmdet", reason="needs mmdet 3.3 (pip install -e '.[mm]')")
    pytest.importorskip("mmcv.ops", reason="needs compiled mmcv ops")
    from PIL import Image
    from pycocotools.coco import COCO as CocoApi
    from pycocotools.cocoeval import COCOeval

    from ovdense.data.synthetic import SceneConfig, render_scene

    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    detector = det.Detector(backbone, list(COCO), converted["head"], score_threshold=0.0, image_size=640)
    base = {c for c, b in zip(COCO, CLIM_BASE_MASK) if b}
    images, annotations, predicted = [], [], []
    for image_id in (1, 2, 3):
        rgb = render_scene(np.random.default_rng([7, image_id]), SceneConfig(size=(640, 640))).image
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rgb).save(root / "val2017" / name, quality=95)
        images.append(dict(id=image_id, file_name=name, height=640, width=640))
        found = detector.predict(root / "val2017" / name)
        for box, score, k in zip(found.boxes, found.scores, found.class_ids):
            x1, y1, x2, y2 = (float(v) for v in box)
            predicted.append(dict(image_id=image_id, category_id=int(k) + 1, bbox=[x1, y1, x2 - x1, y2 - y1],
                                  score=float(score)))
        objects = [(box, int(k) + 1) for box, k in zip(found.boxes[1:24:2], found.class_ids[1:24:2])]
        objects.append(((600.0, 600.0, 610.0, 610.0), COCO.index("person" if image_id < 3 else "dog") + 1))
        for box, category in objects:  # every other of the best 24 detections, and one object missed
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=category,
                                    bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), iscrowd=0))
    assert {COCO[a["category_id"] - 1] in base for a in annotations} == {True, False}
    assert any(COCO[a["category_id"] - 1] in OV_COCO_NOVEL for a in annotations)
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.write_text(json.dumps(dict(images=images, annotations=annotations,
                                        categories=[dict(id=i + 1, name=n) for i, n in enumerate(COCO)])))
    tool = load_tool("test")
    metrics = tool.evaluate([str(ROOT / "configs" / "ovdet" / "fvit_vitb16_ovcoco_clim.py"),
                             "--work-dir", str(tmp_path / "work"), "--cfg-options",
                             f"model.clip.pretrained={converted['backbone_file']}",
                             f"model.head_checkpoint={converted['head']}",
                             f"model.clip.cache_dir={tmp_path / 'cache'}",
                             f"test_dataloader.dataset.data_root={root}/",
                             "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False",
                             f"test_evaluator.ann_file={ann_file}",
                             f"test_evaluator.outfile_prefix={tmp_path / 'dump' / 'pred'}"])
    dumped = json.loads((tmp_path / "dump" / "pred.bbox.json").read_text())
    assert len(dumped) == len(predicted) > 30
    key = lambda d: (d["image_id"], d["category_id"], round(d["score"], 3))  # noqa: E731
    for ours, theirs in zip(sorted(predicted, key=key), sorted(dumped, key=key)):
        assert ours["image_id"] == theirs["image_id"] and ours["category_id"] == theirs["category_id"]
        assert abs(ours["score"] - theirs["score"]) <= 1e-4
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], atol=2e-2)
    gt = CocoApi(str(ann_file))
    expected, present = {}, {a["category_id"] for a in annotations}
    for split, names in (("base", base), ("novel", set(OV_COCO_NOVEL))):
        ids = [i + 1 for i, n in enumerate(COCO) if n in names and i + 1 in present]
        run = COCOeval(gt, gt.loadRes(predicted), "bbox")
        run.params.catIds = ids
        run.evaluate(), run.accumulate()
        precision = run.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all areas, 100 detections
        expected[split] = float(np.mean(precision[precision > -1]))
    print(f"tools/test.py on the converted files: base AP50 {metrics['coco/base_ap50']:.4f}, novel AP50 "
          f"{metrics['coco/novel_ap50']:.4f}; pycocotools on Detector's: {expected['base']:.4f}, "
          f"{expected['novel']:.4f}")
    assert 0.2 < expected["base"] < 0.99 and 0.2 < expected["novel"] < 0.99
    assert metrics["coco/base_ap50"] == pytest.approx(expected["base"], abs=1e-3)
    assert metrics["coco/novel_ap50"] == pytest.approx(expected["novel"], abs=1e-3)


def test_the_mm_model_takes_converted_heads_and_refuses_the_wrong_one(converted, converted_lvis, tmp_path):
    """``OvdenseFViT(head_checkpoint=...)`` built from CLIM's OV-LVIS config takes its converted head strictly
    (mmdet's NASFPN and mask head under the converter's keys) with the stored rows, keeps them after
    ``init_weights`` (a training run's start), and refuses the other model's head in one error."""
    pytest.importorskip("mmdet", reason="needs mmdet 3.3 (pip install -e '.[mm]')")
    pytest.importorskip("mmcv.ops", reason="needs compiled mmcv ops")
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from safetensors.torch import load_file

    import ovdense.mm.detection  # noqa: F401 - registers OvdenseFViT

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(ROOT / "configs" / "ovdet" / "fvit_vitb16_ovlvis_clim.py"),
                          import_custom_modules=False)
    cfg.model.clip = dict(name="ViT-B-16", pretrained=str(converted_lvis["backbone_file"]),
                          cache_dir=str(tmp_path / "cache"))
    cfg.model.classes, cfg.model.test_classes = converted_lvis["base"], converted_lvis["names"]
    box = cfg.model.roi_head.bbox_head
    box.num_classes = len(converted_lvis["base"])  # the synthetic split's 802
    box.loss_cls.class_weight = [1.0] * box.num_classes + [0.9]
    cfg.model.head_checkpoint = str(converted_lvis["head"])
    model = MODELS.build(cfg.model)
    head = {k: v for k, v in load_file(str(converted_lvis["head"])).items() if k != det.STORED_TEXT_KEY}
    state = model.state_dict()
    assert set(head) == set(state)
    model.init_weights()  # mmdet's init would redraw the NAS-FPN and heads: the file's weights come back
    assert all(torch.equal(model.state_dict()[k], v) for k, v in head.items())
    assert model.stored_text.names == converted_lvis["names"]
    model._use_vocabulary(converted_lvis["names"][:4])
    stored = converted_lvis["state"][BOX + "cls_embeddings"][:4]
    assert torch.equal(model.roi_head.bbox_head.text, stored)
    cfg.model.head_checkpoint = str(converted["head"])  # the OV-COCO head: other classes and neck
    with pytest.raises(OvdenseError, match=r"trained on 48 classes"):
        MODELS.build(cfg.model)


def test_a_whole_mmengine_training_checkpoint_converts(converted, tmp_path):
    """The synthetic state inside a checkpoint laid out as mmengine's ``Runner.save_checkpoint`` writes one
    (CLIM trains with mmengine): ``meta``, ``state_dict`` (an ``OrderedDict``), ``message_hub`` (a real
    ``MessageHub``'s state: ``HistoryBuffer``s of NumPy arrays, which ``weights_only`` alone refuses),
    ``optimizer`` and ``param_schedulers``, saved by mmengine's ``save_checkpoint``. It converts, with no
    re-save, into the same head file; the refused-object case is ``test_refusals_are_one_line``'s
    "pickle"."""
    import collections

    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint
    from safetensors.torch import load_file

    hub = MessageHub.get_instance("clim-training")
    for step in range(3):
        hub.update_scalar("train/loss", float(np.float32(1.0 / (step + 1))))
        hub.update_scalar("train/lr", np.float64(1e-4))
    hub.update_info("iter", 3)
    parameter = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW([parameter])
    parameter.sum().backward()
    optimizer.step()
    meta = dict(epoch=3, iter=3, seed=0, experiment_name="clim", mmengine_version="0.10",
                dataset_meta=dict(classes=COCO), cfg="model = dict(type='FVLM')")
    checkpoint = dict(meta=meta, state_dict=collections.OrderedDict(converted["state"]),
                      message_hub=hub.state_dict(), optimizer=optimizer.state_dict(),
                      param_schedulers=[dict(start_factor=0.001, last_epoch=3, base_lrs=[1e-4])])
    path = tmp_path / "epoch_3.pth"
    save_checkpoint(checkpoint, str(path))
    with pytest.raises(Exception, match="Unsupported global: GLOBAL mmengine.logging.history_buffer"):
        torch.load(path, map_location="cpu", weights_only=True)  # what a plain weights_only load says
    converter = load_tool("model_converters/fvit2ovdense")
    clip = converted["out"].parent / "openai_vitb16_coco_clim.pt"
    with contextlib.redirect_stdout(io.StringIO()):
        assert converter.main([str(path), str(tmp_path / "out"), "--clip", str(clip)]) == 0
    again = load_file(str(tmp_path / "out" / "fvit-head.safetensors"))
    before = load_file(str(converted["head"]))
    assert set(again) == set(before) and all(torch.equal(again[k], before[k]) for k in before)
