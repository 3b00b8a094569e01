"""Resumable batch runs: ``ovdense segment DIR`` killed with SIGKILL mid-way, then run again with
``--skip-existing``, ends with the outputs of an uninterrupted run and recomputes nothing that
was finished.

Three real processes (``python -m ovdense.cli``, the toy model, one thread each, so the floating
point is the same in all): an uninterrupted run into one folder; a run into another folder that
is killed once some images are complete (polled from the outside); the resumed run. Then:

* every output exists, and is byte-identical to the uninterrupted run's (the JSON reports too,
  but for their ``seconds``, the wall time);
* the images that were complete before the kill were not written again (their files keep their
  ``st_mtime_ns``), and the resumed run says how many it skipped;
* no temporary file is left behind.

The same rule for ``anomaly`` is checked in process (``--skip-existing`` with every output there
builds no model at all), and a damaged completion marker makes the image run again.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ovdense import cli
from ovdense.data.synthetic import SceneConfig, render_scene

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 16
CLASSES = "background,red circle,blue star,green triangle"
SUFFIXES = ("_labels.png", "_overlay.jpg", ".json")


def _command(folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ovdense.cli", "segment", str(folder), "--classes", CLASSES,
            "--model", "toy", "--method", "maskclip", "--out", str(out), *extra]


def _env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OVDENSE_CACHE=str(cache))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "in"
    folder.mkdir()
    for index in range(IMAGES):
        scene = render_scene(index, SceneConfig(size=(192, 256), objects=(2, 3)))
        Image.fromarray(scene.image).save(folder / f"scene{index:02d}.png")
    return folder


def _complete(out: Path) -> list[str]:
    return sorted(p.stem for p in out.glob("*.json"))


def _outputs(out: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(out.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".json":
            report = json.loads(data)
            report.pop("seconds")  # the wall time, the one field that differs between runs
            data = json.dumps(report, sort_keys=True).encode()
        files[path.name] = data
    return files


def test_killed_run_resumes_without_recomputing(folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    done = subprocess.run(_command(folder, reference), env=_env(cache), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(_complete(reference)) == IMAGES

    out = tmp_path / "out"
    run = subprocess.Popen(_command(folder, out), env=_env(cache), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(_complete(out) if out.is_dir() else []) < 3 and time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    finished = _complete(out)
    assert 3 <= len(finished) < IMAGES, f"killed after {len(finished)} of {IMAGES} images"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()
              if p.name.split("_")[0].split(".")[0] in finished and not p.name.startswith(".")}
    assert len(before) == 3 * len(finished)

    resumed = subprocess.run(_command(folder, out, "--skip-existing"), env=_env(cache),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {len(finished)} of {IMAGES} images" in resumed.stdout
    assert f"wrote {IMAGES - len(finished)} results" in resumed.stdout
    assert _outputs(out) == _outputs(reference)  # every file, nothing extra (no temporary files)
    for name, mtime in before.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was written again"
    with capsys.disabled():
        print(f"\nresume: killed after {len(finished)} of {IMAGES} images; the resumed run skipped them, "
              f"wrote {IMAGES - len(finished)}; {len(_outputs(out))} files equal the uninterrupted run's")


def test_skip_existing_checks_every_output_and_builds_no_model_when_all_exist(tmp_path, monkeypatch, capsys):
    from ovdense.data.layouts import write_dataset

    mvtec = write_dataset("mvtec", tmp_path / "mvtec", 1, 0, 40)
    images = mvtec / "star" / "test" / "holed"
    out = tmp_path / "out"
    args = ["anomaly", str(images), "--object", "star", "--model", "toy", "--out", str(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{p.stem}{s}" for p in images.iterdir()
                           for s in ("_anomaly.npy", "_heatmap.png", "_anomaly.json"))

    import ovdense

    def no_model(*a, **k):
        raise AssertionError("a model was built although every output exists")

    monkeypatch.setattr(ovdense, "create_backbone", no_model)
    capsys.readouterr()
    assert cli.main(args + ["--skip-existing"]) == 0
    assert f"skipped {len(names) // 3} of {len(names) // 3} images" in capsys.readouterr().out

    stem = sorted(images.iterdir())[0].stem
    (out / f"{stem}_anomaly.json").write_text('{"score": 0.')  # a damaged marker: not complete
    (out / f".{stem}_anomaly.npy.abc123.tmp").write_bytes(b"half")  # what a killed write leaves
    pending, skipped = cli._pending(cli._build_parser().parse_args(args + ["--skip-existing"]),
                                    sorted(images.iterdir()), cli.ANOMALY_OUTPUTS)
    assert [p.stem for p in pending] == [stem] and skipped == len(names) // 3 - 1
    assert not (out / f".{stem}_anomaly.npy.abc123.tmp").exists()
    (out / f"{stem}_anomaly.json").write_text("{}")
    (out / f"{stem}_heatmap.png").unlink()  # the marker alone is not enough either
    pending, _ = cli._pending(cli._build_parser().parse_args(args + ["--skip-existing"]),
                              sorted(images.iterdir()), cli.ANOMALY_OUTPUTS)
    assert [p.stem for p in pending] == [stem]
