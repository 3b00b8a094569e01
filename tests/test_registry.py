"""The head registry (ovdense/registry.py): every registered name builds through ``create_head`` on
the toy backbone and gives what its own class gives; every result keeps the one protocol
(``to_json``, ``overlay``, ``save``); the command line's ``--method``, ``ovdense methods`` and the
demo's menus are the registry's names, so a new entry cannot be left out of one of them."""

import importlib
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tool_runs import run_cli, tiny_sam

import ovdense
from ovdense import registry
from ovdense.errors import OvdenseError
from ovdense.heads import fvit
from ovdense.heads.results import HeadResult
from ovdense.registry import HEADS, KIND_ARGUMENTS, create_head, get_head, list_heads

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_CLASSES = ["background", "purple triangle, violet triangle", "blue circle"]
DETECT_CLASSES = ["purple triangle", "blue circle"]
SAM_OPTIONS = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OVDENSE_CACHE", str(tmp_path_factory.mktemp("registry-cache")))
        yield ovdense.create_backbone("toy")


@pytest.fixture(scope="module")
def sam():
    return tiny_sam()


@pytest.fixture(scope="module")
def rgb():
    from ovdense.data.synthetic import SceneConfig, render_scene

    return render_scene(np.random.default_rng([25, 1]), SceneConfig(size=(64, 80))).image


def build(name, toy, sam, fvit_head, rgb, tiny_backbone, tmp_path):
    """``create_head(name, ...)`` and the same head built by its own class (on the toy backbone;
    a method that needs more blocks than the toy's 6, ITACLIP, on the tiny 12-block one)."""
    from ovdense.anomaly.winclip import WinClip
    from ovdense.heads.sam_clip import SamClipSegmenter
    from ovdense.heads.san import SanSegmenter
    from ovdense.heads.training_free import Segmenter

    entry = HEADS[name]
    if entry.training_free:
        from ovdense.backbone.protocols import METHOD_INFO

        blocks = len(toy.model.visual.transformer.resblocks)
        backbone = tiny_backbone if any(i >= blocks - 1 for i in METHOD_INFO[name].capture) else toy
        extra = {}
        if "vfm" in METHOD_INFO[name].needs:
            from ovdense.backbone.vfm import create_vfm

            extra["vfm"] = create_vfm("dino_vitb16", "random")
        return (create_head(name, backbone, SEGMENT_CLASSES, **extra),
                Segmenter(backbone, name, SEGMENT_CLASSES, **extra))
    if name == "san":
        return create_head(name, toy, SEGMENT_CLASSES), SanSegmenter(toy, SEGMENT_CLASSES)
    if name == "clipseg":
        from ovdense.heads.clipseg import ClipSegSegmenter

        return create_head(name, toy, SEGMENT_CLASSES), ClipSegSegmenter(toy, SEGMENT_CLASSES)
    if name == "cliper":
        from ovdense.heads.cliper import CliperSegmenter

        return create_head(name, toy, SEGMENT_CLASSES), CliperSegmenter(toy, SEGMENT_CLASSES)
    if name == "clipdinoiser":
        from ovdense.heads.clipdinoiser import ClipDinoiserHead, ClipDinoiserSegmenter, save_head

        head = tmp_path.with_name(tmp_path.name + "-head") / "clipdinoiser_head.safetensors"
        save_head(head, ClipDinoiserHead(toy), toy)
        return (create_head(name, toy, SEGMENT_CLASSES, head_checkpoint=head),
                ClipDinoiserSegmenter(toy, SEGMENT_CLASSES, head_checkpoint=head))
    if name == "sam-clip":
        return (create_head(name, toy, SEGMENT_CLASSES, sam=sam, **SAM_OPTIONS),
                SamClipSegmenter(toy, sam, SEGMENT_CLASSES, **SAM_OPTIONS))  # the earlier argument order
    if name == "fvit":
        return (create_head(name, toy, DETECT_CLASSES, head_checkpoint=fvit_head, score_threshold=0.0),
                fvit.Detector(toy, DETECT_CLASSES, fvit_head, score_threshold=0.0))
    if name == "winclip":
        return create_head(name, toy, "ring"), WinClip(toy, "ring")
    if name == "winclip+":
        own = WinClip(toy, "ring")
        own.set_references([rgb[::-1].copy()])
        return create_head(name, toy, "ring", references=[rgb[::-1].copy()]), own
    if name == "adaptclip":
        from ovdense.anomaly.adaptclip import AdaptClip, AdaptClipConfig, AdaptClipHead, save_head

        head = tmp_path.with_name(tmp_path.name + "-head") / "adaptclip_head.safetensors"
        save_head(head, AdaptClipHead(toy, AdaptClipConfig(image_size=128, sigma=1.0)), toy)
        return (create_head(name, toy, "ring", head_checkpoint=head, references=[rgb[::-1].copy()]),
                AdaptClip(toy, "ring", head_checkpoint=head, references=[rgb[::-1].copy()]))
    raise AssertionError(f"a registered head without a test: {name}; add it to build()")


def predict(head, rgb):
    result = head.predict(rgb)
    return result[0] if isinstance(result, list) else result


@pytest.mark.parametrize("name", list_heads())
def test_every_head_builds_by_name_and_equals_its_own_class(name, toy, sam, fvit_head, rgb, tmp_path,
                                                            tiny_backbone):
    entry = HEADS[name]
    by_name, own = build(name, toy, sam, fvit_head, rgb, tiny_backbone, tmp_path)
    assert type(by_name) is type(own) is entry.load()
    got, want = predict(by_name, rgb), predict(own, rgb)
    arrays = {"segmentation": ("labels", "scores"), "detection": ("boxes", "scores", "class_ids"),
              "anomaly": ("map",)}[entry.kind]
    for field in arrays:
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert isinstance(got, HeadResult), type(got)
    save, overlay = got.save, got.overlay
    json.dumps(got.to_json())  # JSON-ready
    drawn = overlay(rgb)
    assert drawn.dtype == np.uint8 and drawn.ndim == 3 and drawn.shape[2] == 3
    assert drawn.shape[0] >= rgb.shape[0] and drawn.shape[1] >= rgb.shape[1]
    written = save(tmp_path, "scene", rgb)
    names = [f"scene{suffix}" for suffix in entry.outputs]
    if name == "clipseg":  # _prob_0.png stands for one probability map per class
        names[3:3] = [f"scene_prob_{k}.png" for k in range(1, len(got.classes))]
    assert [p.name for p in written] == names  # the JSON last
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert entry.outputs[-1].endswith(".json")
    report = json.loads((tmp_path / f"scene{entry.outputs[-1]}").read_text(encoding="utf-8"))
    if name == "clipseg":
        assert [c.pop("probability_map") for c in report["classes"]] == names[2:-1]
    if name == "sam-clip":
        assert report == json.loads(json.dumps(got.to_coco("scene")))
    else:
        assert report == json.loads(json.dumps(got.to_json()))
    if entry.kind == "segmentation":
        from ovdense.io import overlay as io_overlay

        if name != "sam-clip":  # SAM + CLIP draws the masks' outlines on top
            np.testing.assert_array_equal(drawn, io_overlay(rgb, got.labels, got.classes))
        assert type(got).OUTPUTS == entry.outputs


def test_results_keep_the_cli_json_key_order(toy, rgb):
    """``to_json(**info)`` places what the caller adds where ``ovdense segment`` writes it."""
    result = create_head("maskclip", toy, SEGMENT_CLASSES).predict(rgb)
    report = result.to_json(seconds=1.0, image="x.png", pretrained=None, model="toy")
    assert list(report) == ["image", "size", "method", "model", "pretrained", "settings", "classes",
                            "seconds"]
    assert report["method"] == "maskclip" and report["classes"][1]["synonyms"] == ["purple triangle",
                                                                                   "violet triangle"]


def test_sam_clip_takes_classes_second_and_keeps_its_earlier_order(toy, sam, rgb):
    from ovdense.heads.sam_clip import SamClipSegmenter

    new = SamClipSegmenter(toy, SEGMENT_CLASSES, sam=sam, **SAM_OPTIONS).predict(rgb)
    old = SamClipSegmenter(toy, sam, SEGMENT_CLASSES, **SAM_OPTIONS).segment(rgb)
    by_keyword = SamClipSegmenter(toy, sam=sam, classes=SEGMENT_CLASSES, **SAM_OPTIONS).segment(rgb)
    np.testing.assert_array_equal(new.labels, old.labels)
    np.testing.assert_array_equal(by_keyword.labels, old.labels)
    masks_only = SamClipSegmenter(toy, SEGMENT_CLASSES, method="vanilla")  # no SAM: given masks only
    assert masks_only.generator is None


def test_unknown_names_and_wrong_calls_are_one_error(toy):
    with pytest.raises(OvdenseError) as error:
        create_head("no-such-head", toy, ["a"])
    message = str(error.value)
    assert "unknown method 'no-such-head'" in message and all(name in message for name in HEADS)
    with pytest.raises(OvdenseError, match="unknown method 'fvit'; choose from: vanilla"):
        get_head("fvit", "segmentation")
    with pytest.raises(OvdenseError, match="set by the head's name"):
        create_head("clearclip", toy, ["a"], method="sclip")
    with pytest.raises(OvdenseError, match=r"winclip\+ needs references"):
        create_head("winclip+", toy, "ring")
    with pytest.raises(OvdenseError, match="positional"):
        create_head("clearclip", toy, ["a"], "extra")
    with pytest.raises(OvdenseError, match="given twice"):
        create_head("clearclip", toy, ["a"], classes=["b"])
    with pytest.raises(OvdenseError, match="unknown kind"):
        list_heads("tracking")


def test_the_table_is_complete_and_torch_free():
    assert set(HEADS) >= {"vanilla", "maskclip", "sclip", "clearclip", "naclip", "cliptrase", "itaclip",
                          "san", "sam-clip", "fvit", "winclip", "winclip+"}
    assert list_heads() == list(HEADS) == ovdense.list_heads()
    assert sorted({HEADS[n].kind for n in HEADS}) == sorted(KIND_ARGUMENTS)
    assert [n for n in HEADS if HEADS[n].training_free] == ovdense.list_methods()
    assert ovdense.HEADS is HEADS and ovdense.create_head is create_head
    for name, entry in HEADS.items():
        assert entry.name == name and entry.summary and entry.paper and entry.outputs, name
        module, _, attribute = entry.target.partition(":")
        assert module.startswith("ovdense.") and attribute, name
    for kind, name in registry.DEFAULT_HEADS.items():
        assert HEADS[name].kind == kind
    probe = ("import sys, ovdense\nnames = ovdense.list_heads()\nentry = ovdense.HEADS['san']\n"
             "print(len(names), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert done.stdout.split() == [str(len(HEADS)), "False"], done.stderr


# --------------------------------------------------------------------------------------------
# The command line and the demo read the registry


def methods_listed(capsys) -> list[str]:
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in HEADS]


def accepted(name, tmp_path, capsys) -> bool:
    """Whether ``segment --method name`` gets past the method's check (to the device's)."""
    image = tmp_path / "in.png"
    if not image.exists():
        from PIL import Image

        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    code, _, err = run_cli(["segment", image, "--classes", "a", "--method", name, "--out", tmp_path / "o",
                            "--device", "nowhere"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    if "unknown method" in err:
        assert f"choose from: {', '.join(list_heads('segmentation'))}" in err
        return False
    assert "--device 'nowhere' is not a device" in err, err
    return True


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("ovdense_demo_app_registry", ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_cli_methods_and_demo_list_the_registry(toy, sam, fvit_head, app, tmp_path, capsys):
    assert methods_listed(capsys) == list_heads()
    assert [n for n in list_heads() if accepted(n, tmp_path, capsys)] == list_heads("segmentation")
    from ovdense.anomaly import adaptclip
    from ovdense.backbone.vfm import create_vfm
    from ovdense.heads.clipdinoiser import ClipDinoiserHead, save_head

    clipdinoiser_head = save_head(tmp_path / "clipdinoiser_head.safetensors", ClipDinoiserHead(toy), toy)
    adapters = adaptclip.AdaptClipHead(toy, adaptclip.AdaptClipConfig(image_size=128))
    adaptclip_head = adaptclip.save_head(tmp_path / "adaptclip_head.safetensors", adapters, toy)
    heads = app.Heads(toy, sam, vfm=create_vfm("dino_vitb16", "random"), fvit_head=fvit_head,
                      clipdinoiser_head=clipdinoiser_head, adaptclip_head=adaptclip_head)
    assert heads.methods == list_heads("segmentation")
    assert heads.available("detection") == list_heads("detection")
    assert heads.available("anomaly") == list_heads("anomaly")
    # without SAM, a VFM or a head that does not ship for the toy: the rest
    runnable = [n for n in list_heads("segmentation")
                if not HEADS[n].needs and (not HEADS[n].trained or HEADS[n].shipped_checkpoint(toy))]
    assert app.Heads(toy).methods == runnable and "clearclip" in runnable and "san" in runnable
    args = app._parse_args([])
    for name in list_heads():
        assert hasattr(args, f"{name}_head") == HEADS[name].trained, name


def test_a_new_entry_appears_in_the_cli_methods_and_demo(toy, app, tmp_path, capsys, monkeypatch):
    """One entry, no other change: ``--method`` takes it, ``ovdense methods`` lists it, the demo
    offers it and builds it."""
    new = replace(HEADS["maskclip"], name="maskclip-again", title="MaskCLIP again")
    monkeypatch.setitem(registry._HEADS, new.name, new)
    assert "maskclip-again" in list_heads("segmentation")
    assert accepted("maskclip-again", tmp_path, capsys)
    assert "maskclip-again" in methods_listed(capsys)
    heads = app.Heads(toy)
    assert "maskclip-again" in heads.methods
    rgb = np.zeros((32, 40, 3), np.uint8)
    shown = app.segment_image(heads, rgb, [("a",), ("b",)], "maskclip-again")
    want = app.segment_image(heads, rgb, [("a",), ("b",)], "maskclip")
    np.testing.assert_array_equal(shown.label_map, want.label_map)


def test_every_registered_option_is_a_flag_of_its_command():
    """A head's ``options`` are the command-line destinations its command reads for it: each must
    exist in that subcommand's parser, or every run of the command would fail on it."""
    import argparse

    from ovdense.cli.parser import _build_parser

    parser = _build_parser()
    commands = {"segmentation": "segment", "detection": "detect", "anomaly": "anomaly"}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, entry in HEADS.items():
        dests = {a.dest for a in sub.choices[commands[entry.kind]]._actions}
        missing = [option for option in entry.options if option not in dests]
        assert not missing, (name, missing)


def test_a_trained_kind_of_entry_without_a_table_is_listed(capsys, monkeypatch):
    """An entry that is not training-free and has no defaults table (``table=None``) still prints
    in ``ovdense methods``."""
    new = replace(HEADS["san"], name="another-san", title="another SAN", table=None)
    monkeypatch.setitem(registry._HEADS, new.name, new)
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    line = next(row for row in out.splitlines() if row.startswith("another-san "))
    assert line.split()[1:5] == ["-", "-", "-", "-"]


def test_detect_and_anomaly_take_the_method_by_name(toy, fvit_head, tmp_path, capsys):
    """``detect --method`` and ``anomaly --method`` build the head the registry names: the default
    head named explicitly writes the same files as the default; a head that needs references
    without ``--reference`` (or one that takes none, with it) is one error before any model."""
    from ovdense.data.synthetic import SceneConfig, render_scene
    from ovdense.io import write_image

    image = tmp_path / "scene.png"
    write_image(image, render_scene(np.random.default_rng(4), SceneConfig(size=(64, 64))).image)
    base = ["detect", str(image), "--model", "toy", "--classes", "red circle,blue star",
            "--head-checkpoint", str(fvit_head), "--score-threshold", "0"]
    code, _, err = run_cli([*base, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, _, err = run_cli([*base, "--method", "fvit", "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert (tmp_path / "a" / "scene.json").read_bytes() == (tmp_path / "b" / "scene.json").read_bytes()

    normal = tmp_path / "normal"
    normal.mkdir()
    good = render_scene(np.random.default_rng(5), SceneConfig(size=(64, 64))).image
    write_image(normal / "good.png", good)
    base = ["anomaly", str(image), "--model", "toy", "--object", "circle"]
    code, _, err = run_cli([*base, "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    code, _, err = run_cli([*base, "--method", "winclip", "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    zero_shot = [(tmp_path / out / "scene_anomaly.npy").read_bytes() for out in ("c", "d")]
    assert zero_shot[0] == zero_shot[1]
    assert run_cli([*base, "--reference", str(normal), "--out", str(tmp_path / "e")], capsys)[0] == 0
    assert run_cli([*base, "--method", "winclip+", "--reference", str(normal), "--out", str(tmp_path / "f")],
                   capsys)[0] == 0
    few_shot = [(tmp_path / out / "scene_anomaly.npy").read_bytes() for out in ("e", "f")]
    assert few_shot[0] == few_shot[1]
    code, _, err = run_cli([*base, "--method", "winclip+", "--out", str(tmp_path / "g")], capsys)
    assert code != 0 and "--method winclip+ needs --reference" in err
    code, _, err = run_cli([*base, "--method", "winclip", "--reference", str(normal),
                            "--out", str(tmp_path / "h")], capsys)
    assert code != 0 and "--method winclip takes no --reference" in err and "winclip+" in err
