"""Every public flag of every ``ovdense`` subcommand in a run that should succeed, its effect checked.

``SUCCEEDING_RUNS`` names, for each flag of each subcommand, the test whose run uses it and checks
what it does; ``test_every_flag_has_a_succeeding_run`` reads the flags from the argparse parsers
of ``ovdense.cli``, so a new flag without such a test (or a test renamed away) fails here. The
runs below cover the flags no other test ran to success: each is compared with the API built with
the option the flag names (``Segmenter``, ``SanSegmenter``, ``Detector``, ``WinClip``,
``evaluate``) and, where the flag changes the output, with the output without it, which must
differ (so a flag the CLI ignored could not pass).

The toy model (``--model toy``, trained on the synthetic world: its labels vary with the options,
a random tiny model's do not) runs segment and detect; anomaly runs on conftest.py's tiny model.
"""

import ast
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovdense import cli
from ovdense.cli import main

TESTS = Path(__file__).resolve().parent
HERE = "test_cli_flags.py"

#: subcommand → flag → the test (``file::name``) whose run uses the flag, succeeds (exit code 0, or
#: 1 where the flag's effect is to skip an image) and checks the flag's effect.
SUCCEEDING_RUNS = {
    "segment": {
        "--classes": "test_cli.py::test_three_outputs_agree",
        "--classes-file": f"{HERE}::test_segment_classes_file_pretrained_and_device",
        "--method": "test_cli.py::test_three_outputs_agree",
        "--model": "test_cli.py::test_three_outputs_agree",
        "--pretrained": f"{HERE}::test_segment_classes_file_pretrained_and_device",
        "--out": "test_cli.py::test_three_outputs_agree",
        "--templates": f"{HERE}::test_segment_flags_reach_the_segmenter",
        "--window": "test_cli.py::test_three_outputs_agree",
        "--short-side": "test_cli.py::test_three_outputs_agree",
        "--logit-scale": f"{HERE}::test_segment_flags_reach_the_segmenter",
        "--bg-threshold": f"{HERE}::test_segment_flags_reach_the_segmenter",
        "--area-threshold": f"{HERE}::test_segment_flags_reach_the_segmenter",
        "--pamr": f"{HERE}::test_segment_flags_reach_the_segmenter",
        "--no-pamr": f"{HERE}::test_segment_flags_reach_the_segmenter",
        "--device": f"{HERE}::test_segment_classes_file_pretrained_and_device",
        "--kernel": f"{HERE}::test_kernel_picks_the_path_and_keeps_the_labels",
        "--max-pixels": "test_cli.py::test_max_pixels_option",
        "--skip-existing": "test_resume_cli.py::test_killed_run_resumes_without_recomputing",
        "--head-checkpoint": f"{HERE}::test_san_head_checkpoint",
        "--image-prompt": "test_clipseg.py::test_cli_image_prompts_name_classes_by_example",
        "--sam-checkpoint": "test_sam_clip.py::test_cli_sam_clip_writes_labels_overlay_and_instances",
        "--sam-model": "test_sam_clip.py::test_cli_clip_method_and_sam_model",
        "--clip-method": "test_sam_clip.py::test_cli_clip_method_and_sam_model",
        "--points-per-side": "test_sam_clip.py::test_cli_sam_proposal_flags",
        "--pred-iou-thresh": "test_sam_clip.py::test_cli_sam_proposal_flags",
        "--stability-score-thresh": "test_sam_clip.py::test_cli_sam_proposal_flags",
        "--box-nms-thresh": "test_sam_clip.py::test_cli_sam_proposal_flags",
        "--min-mask-region-area": "test_sam_clip.py::test_cli_sam_proposal_flags",
        "--unknown-threshold": "test_sam_clip.py::test_cli_unknown_threshold",
        "--crop-area": "test_sam_clip.py::test_cli_crop_area_and_weight",
        "--crop-weight": "test_sam_clip.py::test_cli_crop_area_and_weight",
        "--select-layer": "test_cliper.py::test_cli_cliper_is_the_segmenter",
        "--attention-threshold": "test_cliper.py::test_cli_cliper_is_the_segmenter",
        "--score-threshold": "test_cliper.py::test_cli_cliper_is_the_segmenter",
        "--normalize-maps": "test_cliper.py::test_cli_cliper_is_the_segmenter",
        "--no-normalize-maps": "test_cliper.py::test_cli_cliper_is_the_segmenter",
        "--found-background": "test_clipdinoiser.py::test_cli_clipdinoiser_is_the_segmenter",
        "--no-found-background": "test_clipdinoiser.py::test_cli_clipdinoiser_is_the_segmenter",
        "--vfm": "test_proxyclip.py::test_cli_proxyclip_is_the_segmenter",
        "--vfm-weights": "test_proxyclip.py::test_cli_proxyclip_is_the_segmenter",
    },
    "detect": {
        "--method": "test_registry.py::test_detect_and_anomaly_take_the_method_by_name",
        "--classes": "test_cli_detect.py::test_json_and_overlay_are_the_detectors_prediction",
        "--classes-file": f"{HERE}::test_detect_classes_file_pretrained_device_and_max_pixels",
        "--model": "test_cli_detect.py::test_json_and_overlay_are_the_detectors_prediction",
        "--pretrained": f"{HERE}::test_detect_classes_file_pretrained_device_and_max_pixels",
        "--head-checkpoint": "test_cli_detect.py::test_json_and_overlay_are_the_detectors_prediction",
        "--score-threshold": "test_cli_detect.py::test_json_and_overlay_are_the_detectors_prediction",
        "--image-size": "test_cli_detect.py::test_no_ensemble_gives_the_detectors_own_scores",
        "--no-ensemble": "test_cli_detect.py::test_no_ensemble_gives_the_detectors_own_scores",
        "--out": "test_cli_detect.py::test_json_and_overlay_are_the_detectors_prediction",
        "--device": f"{HERE}::test_detect_classes_file_pretrained_device_and_max_pixels",
        "--max-pixels": f"{HERE}::test_detect_classes_file_pretrained_device_and_max_pixels",
        "--skip-existing": "test_cli_detect.py::test_unreadable_image_is_skipped_and_skip_existing_resumes",
    },
    "anomaly": {
        "--method": "test_registry.py::test_detect_and_anomaly_take_the_method_by_name",
        "--object": "test_cli_anomaly.py::test_anomaly_outputs_agree",
        "--reference": "test_cli_anomaly.py::test_anomaly_outputs_agree",
        "--shots": "test_cli_anomaly.py::test_anomaly_outputs_agree",
        "--model": "test_cli_anomaly.py::test_anomaly_outputs_agree",
        "--pretrained": "test_cli_anomaly.py::test_anomaly_outputs_agree",
        "--prompt-set": "test_cli_anomaly.py::test_anomaly_prompt_set_anomalib",
        "--device": f"{HERE}::test_anomaly_device_and_max_pixels",
        "--out": "test_cli_anomaly.py::test_anomaly_outputs_agree",
        "--max-pixels": f"{HERE}::test_anomaly_device_and_max_pixels",
        "--skip-existing": "test_resume_cli.py::"
                           "test_skip_existing_checks_every_output_and_builds_no_model_when_all_exist",
        "--normal": "test_cli_adaptclip.py::test_anomaly_outputs_agree",
        "--head-checkpoint": "test_cli_adaptclip.py::test_anomaly_outputs_agree",
    },
    "anomaly-eval": {
        "--method": "test_cli_adaptclip.py::test_anomaly_eval_against_sklearn",
        "--head-checkpoint": "test_cli_adaptclip.py::test_anomaly_eval_against_sklearn",
        "--reference-seed": "test_cli_adaptclip.py::test_anomaly_eval_reference_seed",
        "--dataset": "test_cli_anomaly.py::test_anomaly_eval_writes_the_metrics_of_the_predictions",
        "--root": "test_cli_anomaly.py::test_anomaly_eval_writes_the_metrics_of_the_predictions",
        "--shots": "test_cli_anomaly.py::test_anomaly_eval_writes_the_metrics_of_the_predictions",
        "--categories": "test_cli_anomaly.py::test_anomaly_eval_writes_the_metrics_of_the_predictions",
        "--model": "test_cli_anomaly.py::test_anomaly_eval_writes_the_metrics_of_the_predictions",
        "--pretrained": "test_cli_anomaly.py::test_anomaly_eval_writes_the_metrics_of_the_predictions",
        "--prompt-set": f"{HERE}::test_anomaly_eval_prompt_set_device_and_max_pixels",
        "--device": f"{HERE}::test_anomaly_eval_prompt_set_device_and_max_pixels",
        "--out": "test_cli_anomaly.py::test_anomaly_eval_writes_the_metrics_of_the_predictions",
        "--max-pixels": f"{HERE}::test_anomaly_eval_prompt_set_device_and_max_pixels",
    },
    "methods": {},
}
#: (subcommand, flag) → why it needs no succeeding run of its own.
EXEMPT = {}


def parser_flags() -> dict[str, set[str]]:
    """Every option string of every subcommand, read from the CLI's own parsers."""
    import argparse

    parser = cli._build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: {flag for action in sub._actions for flag in action.option_strings
                   if not isinstance(action, argparse._HelpAction)}
            for name, sub in commands.choices.items()}


def reached_source(path: Path, test: str) -> list[ast.AST]:
    """The test function's syntax tree and those of the module-level functions, fixtures and
    constants it names (as calls, fixture arguments or values), followed transitively; ``[]``
    if the file has no such test."""
    module = ast.parse(path.read_text(encoding="utf-8")) if path.is_file() else ast.Module([], [])
    top = {}
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    top[target.id] = node
    if not path.is_file() or not isinstance(top.get(test), ast.FunctionDef):
        return []
    seen, todo = set(), [test]
    while todo:
        name = todo.pop()
        if name in seen or name not in top:
            continue
        seen.add(name)
        for node in ast.walk(top[name]):
            if isinstance(node, ast.Name):
                todo.append(node.id)
            elif isinstance(node, ast.arg):
                todo.append(node.arg)
    return [top[name] for name in seen]


def test_every_flag_has_a_succeeding_run():
    """Each flag maps to a test that exists and whose code (with the helpers and fixtures it uses)
    passes the flag and the subcommand to the CLI and asserts an exit code of 0 or 1."""
    flags = parser_flags()
    assert set(SUCCEEDING_RUNS) == set(flags), "a subcommand was added or removed: list its flags"
    problems = []
    for command, options in flags.items():
        listed = set(SUCCEEDING_RUNS[command]) | {f for c, f in EXEMPT if c == command}
        problems += [f"ovdense {command} {flag}: no test runs it to success; add one and list it in "
                     "SUCCEEDING_RUNS (tests/test_cli_flags.py)" for flag in sorted(options - listed)]
        problems += [f"ovdense {command} {flag}: listed, but the parser has no such flag"
                     for flag in sorted(listed - options)]
        for flag, where in SUCCEEDING_RUNS[command].items():
            file, test = where.split("::")
            nodes = reached_source(TESTS / file, test)
            if not nodes:
                problems.append(f"ovdense {command} {flag}: there is no test {where}")
                continue
            strings = {n.value for tree in nodes for n in ast.walk(tree)
                       if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            text = "\n".join(ast.unparse(tree) for tree in nodes)
            if flag not in strings or command not in strings:
                problems.append(f"ovdense {command} {flag}: {where} does not pass {command!r} and {flag!r}")
            if not re.search(r"(code|returncode|main\(.*\))\s*==\s*[01]\b", text):
                problems.append(f"ovdense {command} {flag}: {where} asserts no exit code of 0 or 1")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# segment: the training-free flags against the Segmenter


CLASSES = ["background", "red ring", "yellow star", "green square"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A 64×80 toy scene (a red ring and a yellow star) on disk."""
    from ovdense.data.synthetic import SceneConfig, render_scene

    path = tmp_path_factory.mktemp("flags-scene") / "scene.png"
    Image.fromarray(render_scene(3, SceneConfig(size=(64, 80))).image).save(path)
    return path


def labels_of(path: Path) -> np.ndarray:
    with Image.open(path) as pil:
        return np.asarray(pil)


def segment(scene, out, *extra, method="clearclip") -> dict:
    """``ovdense segment`` on the toy at short side 64 (one 64×64 window and a half): its report."""
    code = main(["segment", str(scene), "--classes", ",".join(CLASSES), "--model", "toy", "--method", method,
                 "--short-side", "64", "--window", "64", "32", "--out", str(out), *map(str, extra)])
    assert code == 0
    return json.loads((out / f"{scene.stem}.json").read_text())


@pytest.fixture(scope="module")
def api_labels(scene):
    """``api_labels(backbone, method, classes, **options)``: the Segmenter's labels of the scene at
    the CLI runs' size, each computed once for the module."""
    from ovdense import Segmenter

    done = {}

    def labels(backbone, method="clearclip", classes=CLASSES, **options) -> np.ndarray:
        key = (id(backbone), method, tuple(classes), repr(sorted(options.items())))
        if key not in done:
            segmenter = Segmenter(backbone, method, classes, short_side=64, window=(64, 32), **options)
            done[key] = segmenter.predict(str(scene)).labels
        return done[key]

    return labels


TEMPLATES = ["a rendering of a {}.", "itap of the {}."]
SEGMENT_CASES = {  # id: (method, flags, the Segmenter's options with them, without them)
    "pamr": ("clearclip", ["--pamr"], {"pamr": True}, {}),  # clearclip's default: off
    "no-pamr": ("naclip", ["--no-pamr"], {"pamr": False}, {}),  # naclip's default: on
    "bg-threshold": ("clearclip", ["--bg-threshold", "0.6"], {"bg_threshold": 0.6}, {}),
    "logit-scale": ("clearclip", ["--bg-threshold", "0.6", "--logit-scale", "20"],
                    {"bg_threshold": 0.6, "logit_scale": 20.0}, {"bg_threshold": 0.6}),
    # clearclip on the toy gives the ring a third of the non-background pixels: 0.4 drops it
    "area-threshold": ("clearclip", ["--area-threshold", "0.4"], {"area_threshold": 0.4}, {}),
    "templates": ("clearclip", ["--templates", "{templates}"], {"templates": TEMPLATES}, {}),
}


@pytest.mark.parametrize("case", SEGMENT_CASES)
def test_segment_flags_reach_the_segmenter(toy_env_cache, scene, api_labels, tmp_path, case):
    """The labels equal the Segmenter's with the option the flag names, and differ from its labels
    without it; the report's settings record the option."""
    method, flags, options, without = SEGMENT_CASES[case]
    (tmp_path / "templates.txt").write_text("# two templates\n" + "\n".join(TEMPLATES) + "\n")
    flags = [f.replace("{templates}", str(tmp_path / "templates.txt")) for f in flags]
    report = segment(scene, tmp_path / "out", *flags, method=method)
    got = labels_of(tmp_path / "out" / "scene_labels.png")
    np.testing.assert_array_equal(got, api_labels(toy_env_cache, method, **options))
    assert (got != api_labels(toy_env_cache, method, **without)).mean() > 0.01, \
        "the flag shows no effect here"
    for name, value in options.items():
        assert report["settings"][name] == value, name


@pytest.mark.parametrize("kernel", ["reference", "torch", "triton"])
def test_kernel_picks_the_path_and_keeps_the_labels(toy_env_cache, scene, api_labels, tmp_path, monkeypatch,
                                                    kernel):
    """``--kernel reference`` classifies the full-resolution logits (no streaming kernel runs);
    the other choices stream through ``kernels.slide_classify`` with that kernel. The labels
    equal the default run's (the kernels are exact)."""
    from ovdense import kernels

    calls = []
    streamed = kernels.slide_classify

    def spy(*args, **kwargs):
        calls.append(args[6] if len(args) > 6 else kwargs.get("kernel", "auto"))
        return streamed(*args, **kwargs)

    monkeypatch.setattr(kernels, "slide_classify", spy)
    report = segment(scene, tmp_path / "out", "--kernel", kernel)
    assert calls == ([] if kernel == "reference" else [kernel])
    assert report["settings"]["kernel"] == kernel
    np.testing.assert_array_equal(labels_of(tmp_path / "out" / "scene_labels.png"), api_labels(toy_env_cache))


@pytest.fixture
def devices(env_cache, monkeypatch):
    """The ``device`` every backbone built during the test is asked for (``ovdense.create_backbone``
    wrapped, so the CLI's builds are recorded)."""
    import ovdense

    built = ovdense.create_backbone
    asked = []

    def recording(*args, **kwargs):
        asked.append(kwargs.get("device"))
        return built(*args, **kwargs)

    monkeypatch.setattr(ovdense, "create_backbone", recording)
    return asked


@pytest.fixture(scope="module")
def other_toy_weights(tmp_path_factory) -> Path:
    """The toy CLIP's weights with every floating tensor nudged (seeded): another backbone."""
    from safetensors.torch import load_file, save_file

    from ovdense.backbone.clip import toy_files

    state = load_file(str(toy_files()[1]))
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            noise = torch.randn(tensor.shape, generator=generator)
            state[name] = tensor + 0.3 * tensor.float().std() * noise.to(tensor.dtype)
    path = tmp_path_factory.mktemp("other-toy") / "other_toy.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def other_toy(env_cache, other_toy_weights):
    from ovdense import create_backbone

    return create_backbone("toy", pretrained=str(other_toy_weights))


def test_segment_classes_file_pretrained_and_device(toy_env_cache, other_toy, scene, other_toy_weights,
                                                    api_labels, devices, tmp_path):
    """``--classes-file`` (one class a line, synonyms after commas) gives the classes and synonyms
    of the report and the Segmenter's labels for that vocabulary; ``--pretrained FILE`` the
    weights of the file (the labels differ from the toy's own); ``--device cpu:0`` is the device
    the backbone is built on."""
    classes = tmp_path / "classes.txt"
    classes.write_text("background\nred ring, red circle\nyellow star\ngreen square\n")
    out = tmp_path / "out"
    code = main(["segment", str(scene), "--classes-file", str(classes), "--model", "toy", "--method",
                 "clearclip", "--pretrained", str(other_toy_weights), "--device", "cpu:0",
                 "--short-side", "64", "--window", "64", "32", "--out", str(out)])
    assert code == 0
    assert devices == ["cpu:0"]
    report = json.loads((out / "scene.json").read_text())
    assert [(c["name"], c["synonyms"]) for c in report["classes"]] == [
        ("background", ["background"]), ("red ring", ["red ring", "red circle"]),
        ("yellow star", ["yellow star"]), ("green square", ["green square"])]
    assert report["pretrained"] == str(other_toy_weights)
    vocabulary = ["background", "red ring, red circle", "yellow star", "green square"]
    got = labels_of(out / "scene_labels.png")
    np.testing.assert_array_equal(got, api_labels(other_toy, classes=vocabulary))
    assert (got != api_labels(toy_env_cache, classes=vocabulary)).mean() > 0.01


def test_san_head_checkpoint(toy_env_cache, scene, tmp_path):
    """``--method san --head-checkpoint FILE``: the labels of that head (here the shipped toy head
    with its weights nudged, written by ``save_head``), not those of the shipped one."""
    from ovdense.heads.san import SanSegmenter, default_head_checkpoint, load_head, save_head

    head = load_head(default_head_checkpoint(toy_env_cache), toy_env_cache)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            if p.numel() > 1:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=generator))
    nudged = save_head(tmp_path / "nudged_san_head.safetensors", head, toy_env_cache)
    out = tmp_path / "out"
    code = main(["segment", str(scene), "--classes", ",".join(CLASSES), "--model", "toy", "--method", "san",
                 "--head-checkpoint", str(nudged), "--short-side", "64", "--out", str(out)])
    assert code == 0
    assert json.loads((out / "scene.json").read_text())["settings"]["head_checkpoint"] == str(nudged)
    got = labels_of(out / "scene_labels.png")
    want = SanSegmenter(toy_env_cache, CLASSES, head_checkpoint=nudged,
                        short_side=64).predict(str(scene)).labels
    np.testing.assert_array_equal(got, want)
    assert (got != SanSegmenter(toy_env_cache, CLASSES,
                                short_side=64).predict(str(scene)).labels).mean() > 0.01


# --------------------------------------------------------------------------------------------
# detect


def test_detect_classes_file_pretrained_device_and_max_pixels(toy_env_cache, other_toy, scene,
                                                              other_toy_weights, devices, tmp_path, capsys):
    """``detect --classes-file --pretrained FILE --device cpu:0 --max-pixels N`` over a folder
    with the 64×80 scene (exactly N pixels) and a 65×80 copy: the copy is skipped by name, the
    scene's detections are the Detector's on the backbone of FILE (the shipped toy head, its
    backbone record rewritten to FILE's), which differ from the shipped toy's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ovdense.heads.fvit import Detector, default_head_checkpoint

    shipped = default_head_checkpoint(toy_env_cache)
    with safe_open(str(shipped), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    head = tmp_path / "head_for_other.safetensors"
    save_file(tensors, str(head), metadata={**metadata, "backbone": other_toy.identity})
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "scene.png").write_bytes(scene.read_bytes())
    rgb = np.asarray(Image.open(scene).convert("RGB"))
    Image.fromarray(np.concatenate([rgb, rgb[:1]])).save(folder / "big.png")
    names = ["red ring", "yellow star", "green square"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    code = main(["detect", str(folder), "--classes-file", str(tmp_path / "classes.txt"), "--model", "toy",
                 "--pretrained", str(other_toy_weights), "--head-checkpoint", str(head), "--device", "cpu:0",
                 "--max-pixels", str(64 * 80), "--score-threshold", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    skipped = [line for line in err.splitlines() if line.startswith("ovdense: skipped:")]
    assert len(skipped) == 1 and "big.png is 80×65" in skipped[0], err
    assert devices == ["cpu:0"]
    assert sorted(p.name for p in out.glob("*.json")) == ["scene.json"]
    report = json.loads((out / "scene.json").read_text())
    assert report["classes"] == names
    want = Detector(other_toy, names, head, score_threshold=0.0).predict(str(scene))
    assert len(report["detections"]) == len(want.scores) > 0
    np.testing.assert_allclose([d["score"] for d in report["detections"]], want.scores, atol=1e-6)
    assert [d["category_id"] for d in report["detections"]] == want.class_ids.tolist()
    own = Detector(toy_env_cache, names, shipped, score_threshold=0.0).predict(str(scene))
    assert len(own.scores) != len(want.scores) or not np.allclose(own.scores, want.scores, atol=1e-3)


# --------------------------------------------------------------------------------------------
# anomaly and anomaly-eval


@pytest.fixture(scope="module")
def tiny_weights(tiny_backbone, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-weights") / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    from ovdense.data.layouts import write_dataset

    return write_dataset("mvtec", tmp_path_factory.mktemp("flags-mvtec"), 1, 0, 40)


def test_anomaly_device_and_max_pixels(tiny_backbone, tiny_config_path, tiny_weights, mvtec, devices,
                                       tmp_path, capsys):
    """``anomaly --device cpu:0 --max-pixels 1600`` over a 40×40 image and a 41×40 one: the
    larger is skipped by name, the other's map is WinCLIP's on the backbone built on cpu:0."""
    from ovdense.anomaly.winclip import WinClip

    folder = tmp_path / "in"
    folder.mkdir()
    image = sorted((mvtec / "star" / "test" / "holed").iterdir())[0]
    (folder / "a.png").write_bytes(image.read_bytes())
    rgb = np.asarray(Image.open(image).convert("RGB"))
    Image.fromarray(np.concatenate([rgb, rgb[:1]])).save(folder / "big.png")
    out = tmp_path / "out"
    code = main(["anomaly", str(folder), "--object", "star", "--model", str(tiny_config_path), "--pretrained",
                 str(tiny_weights), "--device", "cpu:0", "--max-pixels", "1600", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    skipped = [line for line in err.splitlines() if line.startswith("ovdense: skipped:")]
    assert len(skipped) == 1 and "big.png is 40×41" in skipped[0], err
    assert devices == ["cpu:0"]
    assert sorted(p.name for p in out.iterdir()) == ["a_anomaly.json", "a_anomaly.npy", "a_heatmap.png"]
    (want,) = WinClip(tiny_backbone, "star").predict([rgb])
    np.testing.assert_allclose(np.load(out / "a_anomaly.npy"), want.map, rtol=1e-5, atol=1e-6)


def test_anomaly_eval_prompt_set_device_and_max_pixels(tiny_backbone, tiny_config_path, tiny_weights, mvtec,
                                                       devices, tmp_path, capsys):
    """``anomaly-eval --prompt-set anomalib --device cpu:0 --max-pixels 1600`` (the images and
    masks are 40×40): the CSV holds ``evaluate``'s metrics with anomalib's prompts, on the backbone
    built on cpu:0; one pixel less of limit and the run stops with one line naming the image."""
    from ovdense.anomaly.evaluate import evaluate

    argv = ["anomaly-eval", "--dataset", "mvtec", "--root", str(mvtec), "--categories", "star", "--model",
            str(tiny_config_path), "--pretrained", str(tiny_weights), "--prompt-set", "anomalib",
            "--device", "cpu:0", "--out", str(tmp_path / "out")]
    code = main(argv + ["--max-pixels", "1600"])
    assert code == 0, capsys.readouterr().err
    assert devices == ["cpu:0"]
    with open(tmp_path / "out" / "anomaly_mvtec_0shot.csv", newline="") as f:
        rows = {row[0]: row[1:] for row in csv.reader(f)}
    columns = rows.pop("category")
    want = evaluate(tiny_backbone, "mvtec", mvtec, ["star"], 0, "anomalib")["star"]
    paper = evaluate(tiny_backbone, "mvtec", mvtec, ["star"], 0, "paper")["star"]
    assert [float(v) for v in rows["star"]] == pytest.approx([100 * getattr(want, c) for c in columns],
                                                              abs=0.005 + 1e-9)
    assert any(abs(getattr(want, c) - getattr(paper, c)) > 1e-3 for c in columns), "prompt sets agree here"
    capsys.readouterr()
    code = main(argv + ["--max-pixels", "1599"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ovdense:")]  # (not tqdm's)
    assert code == 2 and len(lines) == 1 and "over the limit of 0.001599 megapixels" in lines[0], err


def test_the_vfm_choices_are_the_vfms_ovdense_builds():
    """``--vfm``'s choices (the CLI's and the demo's, kept torch-free) are ``ovdense.backbone.vfm.VFMS``."""
    from ovdense.backbone.vfm import VFMS
    from ovdense.cli.parser import VFM_NAMES

    assert VFM_NAMES == tuple(VFMS)
