"""tools/misc/gpu_check.py: the smoke run (every part on the CPU at tiny sizes) writes the report and
one CSV per part whose figures hold together; a part that raises is recorded and the later parts
still run; a spent budget ends a part with its own row."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "misc" / "gpu_check.py"
PARTS = ("environment", "kernels", "segment", "winclip", "sam_clip", "heads")


def run_check(out: Path, *options: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *options], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = run_check(out, "--smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout, {part: read_rows(out / f"{part}.csv") for part in PARTS}


def test_smoke_writes_the_report_and_a_csv_with_rows_for_every_part(smoke):
    out, stdout, rows = smoke
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{p}.csv" for p in PARTS] + ["gpu_report.md"])
    report = (out / "gpu_report.md").read_text()
    assert "mode: smoke" in report
    for number, part in enumerate(PARTS, start=1):
        assert rows[part], f"{part}.csv has no rows"
        assert all(row["status"] != "failed" for row in rows[part]), rows[part]
        assert f"| {number}. {part} | ok |" in report
        assert f"[{part} " in stdout  # progress was printed as the part ran
    env = {row["case"]: row["value"] for row in rows["environment"]}
    assert env["torch"] == torch.__version__ and env["TRITON_INTERPRET"] == "1" and env["device"] == "cpu"


def test_smoke_kernel_and_segment_labels_match_their_references(smoke):
    _, _, rows = smoke
    kernels = rows["kernels"]
    assert [row["labels_identical"] for row in kernels] == ["True"] * len(kernels)
    assert all(float(row["score_max_diff"]) <= 1e-5 for row in kernels)
    assert any(int(row["C"]) > 32 for row in kernels)  # more prompts than one Triton block
    for row in kernels:  # the ratio is that of the recorded times
        ratio = float(row["naive_ms"]) / float(row["triton_ms"])
        assert float(row["speedup"]) == pytest.approx(ratio, rel=1e-3)
    segment = {row["case"]: row for row in rows["segment"]}
    assert segment["Segmenter fp32 (batched windows)"]["labels_identical"] == "True"
    assert segment["Segmenter fp32 (batched windows)"]["pixels_differing"] == "0"
    for precision in ("fp16", "bf16"):
        assert 0.9 <= float(segment[f"Segmenter {precision}"]["pixels_agreeing_with_fp32"]) <= 1.0


def test_smoke_winclip_sam_clip_and_heads_rows(smoke):
    _, _, rows = smoke
    winclip = {row["case"]: row for row in rows["winclip"]}
    assert float(winclip["ovdense WinClip bf16"]["pearson_min_vs_fp32"]) >= 0.99
    theirs = winclip["anomalib WinClipModel fp32"]
    if importable("anomalib"):  # an independent implementation on the same weights agrees
        assert theirs["status"] == "ok" and float(theirs["pearson_min_vs_ovdense"]) >= 0.999
    else:
        assert theirs["status"] == "skipped" and "anomalib" in theirs["note"]
    sam = {row["case"]: row for row in rows["sam_clip"]}
    masks = int(sam["ovdense one pass"]["masks"])
    # one dense pass for all masks (and the prompts once, where the counter sees the text tower)
    assert 1 <= int(sam["ovdense one pass"]["clip_passes"]) <= 2 < masks
    assert int(sam["crop-and-encode per mask"]["clip_passes"]) >= masks  # at least one per mask
    generator = sam["SAM automatic mask generator"]
    assert generator["status"] == ("ok" if importable("segment_anything") else "skipped")
    heads = {row["case"]: row for row in rows["heads"]}
    assert {row["status"] for row in rows["heads"]} <= {"ok", "not built yet", "skipped"}
    if heads["SAN"]["status"] == "ok":
        assert heads["SAN"]["labels_shape"] == "64x85"  # SanSegmenter answers at the image's size


def test_a_failing_part_is_recorded_and_later_parts_still_run(tmp_path):
    result = run_check(tmp_path, "--smoke", "--parts", "heads", "3", "kernels", "--fail-part", "segment",
                       "--budget-s", "0")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (tmp_path / "environment.csv").exists()  # only the parts asked for
    (failed,) = read_rows(tmp_path / "segment.csv")
    assert failed["status"] == "failed" and "injected failure" in failed["error"]
    for part in ("kernels", "heads"):  # before and after the failure; a zero budget ends them at once
        (row,) = read_rows(tmp_path / f"{part}.csv")
        assert row["status"].startswith("budget exhausted after"), row
    report = (tmp_path / "gpu_report.md").read_text()
    assert "| 3. segment | failed |" in report and "RuntimeError: injected failure" in report
    assert report.index("2. kernels") < report.index("3. segment") < report.index("6. heads")
    assert "FAILED: segment" in result.stdout


def test_unknown_part_is_refused_with_the_choices(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look themselves up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts tools/benchmarks/ on the path
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit, match="unknown part 'colour'; choose from 1–6 or environment"):
        module.main(["--out", str(tmp_path), "--smoke", "--parts", "colour"])
    assert not any(tmp_path.iterdir())
