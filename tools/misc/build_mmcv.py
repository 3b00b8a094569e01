"""Build full mmcv 2.1.0 (with its compiled ops) once and cache the wheel outside the repo.

    python tools/misc/build_mmcv.py            # install from the cache, building the wheel if missing
    python tools/misc/build_mmcv.py --print    # print the cached wheel's path (build if missing)

mmsegmentation 1.2.2 and mmdet 3.3.0 import ``mmcv.ops``, so mmcv-lite is not enough, and no
prebuilt wheel matches this torch. The sdist builds in about 25 minutes on 2 cores with
``MMCV_WITH_OPS=1``, ``--no-build-isolation``, setuptools < 70, and its ``-std=c++14/17``
flags raised to ``-std=c++20`` (the headers of torch ≥ 2.10 need it).

The wheel is cached under ``$OVDENSE_CACHE/wheels`` (default ``~/.cache/ovdense/wheels``), in a
folder keyed by the mmcv, torch and Python versions and the platform, so a later run (or CI on
the same machine) only installs it.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MMCV_VERSION = "2.1.0"


def cache_root() -> Path:
    return Path(os.environ.get("OVDENSE_CACHE", Path.home() / ".cache" / "ovdense")) / "wheels"


def cache_key() -> str:
    import torch

    torch_version = torch.__version__.replace("+", "_")
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"mmcv-{MMCV_VERSION}-torch{torch_version}-{python}-{platform.machine()}"


def pip(*args: str, env: dict | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def patch_cxx_standard(setup_py: Path) -> int:
    """Raise every ``-std=c++14``/``c++17`` flag to ``-std=c++20``; return how many changed."""
    text = setup_py.read_text()
    new, count = re.subn(r"-std=c\+\+1[47]", "-std=c++20", text)
    setup_py.write_text(new)
    return count


def build(target: Path) -> Path:
    """Download the sdist, patch it, build the wheel into ``target``."""
    pip("install", "-q", "setuptools<70", "wheel", "ninja")
    with tempfile.TemporaryDirectory(prefix="mmcv-build-") as tmp:
        tmp_path = Path(tmp)
        pip("download", "-q", "--no-deps", "--no-binary", ":all:", f"mmcv=={MMCV_VERSION}", "-d", tmp)
        sdist = next(tmp_path.glob(f"mmcv-{MMCV_VERSION}.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp_path, filter="data")
        source = tmp_path / f"mmcv-{MMCV_VERSION}"
        changed = patch_cxx_standard(source / "setup.py")
        print(f"raised {changed} C++ standard flags to c++20", flush=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        env = dict(os.environ, MMCV_WITH_OPS="1", MAX_JOBS=jobs)
        env.setdefault("FORCE_CUDA", "0")
        out = tmp_path / "dist"
        pip("wheel", "--no-build-isolation", "--no-deps", "-w", str(out), str(source), env=env)
        wheel = next(out.glob("mmcv-*.whl"))
        target.mkdir(parents=True, exist_ok=True)
        final = target / wheel.name
        shutil.copy2(wheel, target / (wheel.name + ".tmp"))
        os.replace(target / (wheel.name + ".tmp"), final)  # atomic: a crash leaves no half wheel
        return final


def cached_wheel() -> Path | None:
    folder = cache_root() / cache_key()
    wheels = sorted(folder.glob("mmcv-*.whl")) if folder.is_dir() else []
    return wheels[0] if wheels else None


def install(wheel: Path) -> None:
    pip("install", "-q", "--no-deps", str(wheel))
    pip("install", "-q", "mmengine>=0.10,<0.11", "mmsegmentation==1.2.2", "mmdet==3.3.0")
    subprocess.run([sys.executable, "-c", "import mmcv.ops, mmseg.models, mmdet.models; "
                    "print('mmcv', __import__('mmcv').__version__, 'with ops: ok')"], check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--print", action="store_true", help="only print the wheel's path")
    args = parser.parse_args(argv)
    wheel = cached_wheel()
    try:
        if wheel is None:
            print(f"no cached mmcv wheel for {cache_key()}: building (about 25 minutes on 2 cores)",
                  flush=True)
            wheel = build(cache_root() / cache_key())
        else:
            print(f"using the cached {wheel}", flush=True)
        if args.print:
            print(wheel)
            return 0
        install(wheel)
    except subprocess.CalledProcessError as e:
        step = "building" if wheel is None else "installing or importing"
        print(f"error: {step} mmcv {MMCV_VERSION} failed ({' '.join(map(str, e.cmd))[:200]} exited with "
              f"{e.returncode}); see the output above. It needs a C++ compiler (g++), Python's headers "
              "and the installed torch; the core of ovdense works without it.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
