"""Cold-start benchmark of the command line: each command run as a fresh process, several times
after a warm-up, wall time min / median / max.

    python tools/benchmarks/cli.py [--runs 5] [--warmup 1] [--cases import help methods segment]

Cases:

* ``import``: ``python -c "import ovdense"``;
* ``help``: ``ovdense --help``;
* ``methods``: ``ovdense methods``;
* ``segment``: the README's first example, ``ovdense segment IMG --model ViT-B-16 --pretrained
  none --classes "sky,building,tree,person,car"`` on a 512×512 image, every run with a new,
  empty text cache (``OVDENSE_CACHE``) so the 400 prompts are encoded each time, as on a first
  run or with new weights. The fused CPU kernel that the first run on a machine compiles (about
  a second, ``ovdense/kernels/native.py``) is copied into each new cache from the warm-up run;
  ``--no-kernel-copy`` leaves it out, so every run compiles it too.

``ovdense`` is the installed console script where there is one, else ``python -c "from
ovdense.cli import main; main()"``. The light cases also print which of torch / open_clip /
mmcv the command's process imported (``-X importtime``, one extra run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "open_clip", "mmcv")
CLASSES = "sky,building,tree,person,car"


def ovdense_command() -> list[str]:
    script = shutil.which("ovdense")
    if script is not None:
        return [script]
    return [sys.executable, "-c", "import sys; from ovdense.cli import main; sys.exit(main())"]


def write_image(path: Path) -> None:
    """A 512×512 RGB test image: smooth colour gradients and blocks (no randomness needed)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:512, 0:512]
    rgb = np.stack([x / 2, y / 2, ((x // 64 + y // 64) % 2) * 200 + 20], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def cases(work: Path) -> dict[str, list[str]]:
    image = work / "street.png"
    write_image(image)
    cli = ovdense_command()
    return {
        "import": [sys.executable, "-c", "import ovdense"],
        "help": cli + ["--help"],
        "methods": cli + ["methods"],
        "segment": cli + ["segment", str(image), "--model", "ViT-B-16", "--pretrained", "none",
                          "--classes", CLASSES, "--out", str(work / "out")],
    }


def run_once(command: list[str], env: dict) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"  exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return wall, done.returncode


def heavy_imports(command: list[str], env: dict) -> list[str]:
    """The heavy top-level packages the command imports (one run under ``-X importtime``)."""
    env = {**env, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            names.add(line.rsplit("|", 1)[-1].strip())
    return [name for name in HEAVY if name in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=["import", "help", "methods", "segment"])
    parser.add_argument("--no-kernel-copy", action="store_true",
                        help="do not keep the compiled kernel between runs (each run builds it)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ovdense-bench-cli-") as tmp:
        work = Path(tmp)
        commands = cases(work)
        kernels = work / "kernels"
        unknown = set(args.cases) - set(commands)
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(commands)}")
        print(f"{args.runs} runs after {args.warmup} warm-up, each a fresh process; "
              f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print(f"{'case':<8} {'min s':>7} {'median s':>9} {'max s':>7}  imports")
        for name in args.cases:
            walls = []
            for i in range(args.warmup + args.runs):
                cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))  # empty: a cold text cache
                if kernels.is_dir() and not args.no_kernel_copy:
                    shutil.copytree(kernels, cache / "kernels")
                wall, code = run_once(commands[name], {**os.environ, "OVDENSE_CACHE": str(cache)})
                if code != 0:
                    return 1
                if i >= args.warmup:
                    walls.append(wall)
                if (cache / "kernels").is_dir() and not kernels.is_dir():
                    shutil.copytree(cache / "kernels", kernels)  # the library the first run built
                shutil.rmtree(cache, ignore_errors=True)
            heavy = ["(segmenting needs them)"] if name == "segment" else heavy_imports(
                commands[name], {**os.environ, "OVDENSE_CACHE": str(work / "cache-imports")})
            print(f"{name:<8} {min(walls):>7.2f} {statistics.median(walls):>9.2f} {max(walls):>7.2f}  "
                  f"{', '.join(heavy) or 'none of ' + '/'.join(HEAVY)}", flush=True)
        print(f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
