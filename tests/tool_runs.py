"""What several test modules share: scripts of tools/ loaded as modules; tools/train.py and
tools/test.py run in fresh processes (one, or two under torchrun with gloo) that import this
checkout's ovdense, whatever is installed, with the cfg-options of a short run (``short_run_options``);
the command line run in-process (``run_cli``); a tiny random SAM (``tiny_sam``)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_tool(path: str | Path):
    """A script under tools/ (``"data/make_synthetic_detection"``, ``"data/dataset_converters/lvis_v1_ovd"``)
    or at any path, imported as a module."""
    path = Path(path)
    if not path.is_absolute():
        path = ROOT / "tools" / path.with_suffix(".py")
    spec = importlib.util.spec_from_file_location("ovdense_tool_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment() -> dict:
    # the workers import this checkout's ovdense, whatever is installed
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def train_command(config: Path, work_dir: Path, opts: list[str], *extra: str) -> list[str]:
    """``tools/train.py CONFIG --work-dir WORK_DIR [extra] --cfg-options OPTS``, one process."""
    return [sys.executable, str(ROOT / "tools" / "train.py"), str(config), "--work-dir", str(work_dir),
            *extra, "--cfg-options", *opts]


def short_run_options(iters: int, values: dict, overrides: dict) -> list[str]:
    """``--cfg-options`` items for a short training run in a test: ``values``, then ``iters`` iterations with
    a checkpoint every 2 (all kept) and a log line every iteration, then ``overrides`` (each as a string)."""
    settings = {**values, "train_cfg.max_iters": str(iters), "default_hooks.checkpoint.interval": "2",
                "default_hooks.checkpoint.max_keep_ckpts": "10", "default_hooks.logger.interval": "1"}
    settings.update({k: str(v) for k, v in overrides.items()})
    return [f"{k}={v}" for k, v in settings.items()]


def torchrun(*arguments: str) -> list[str]:
    """``arguments`` (a script and its options) on 2 processes, ``--launcher pytorch``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *arguments, "--launcher", "pytorch"]


def run(command: list[str], cwd: Path, timeout: int = 900, check: bool = False
        ) -> subprocess.CompletedProcess:
    """Run ``command`` with ``environment()``; ``check``: assert it succeeded, showing its output."""
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def kill_after_checkpoint(command: list[str], cwd: Path, checkpoint: Path, deadline_s: float) -> None:
    """Start ``command`` (a training run) and SIGKILL it once ``checkpoint`` exists; asserts the
    run was still going then and that it died of the signal."""
    process = subprocess.Popen(command, cwd=cwd, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + deadline_s
        while not checkpoint.exists():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, f"no checkpoint after {deadline_s:g} s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def run_cli(argv, capsys):
    """``ovdense.cli.main(argv)`` as the console script runs it (argparse's exit included):
    exit code, stdout, stderr."""
    from ovdense.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_sam():
    """A random SAM with an image encoder of width 32 and two windowed blocks, built by
    segment-anything's own private builder (seeded: the same weights each call)."""
    import torch
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    return _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                      encoder_global_attn_indexes=[], checkpoint=None)
