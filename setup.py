from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "ovdense" / "version.py").read_text(), version)

setup(
    name="ovdense",
    version=version["__version__"],
    description="Open-vocabulary dense prediction on one CLIP backbone: segmentation, "
    "detection and defect maps from any list of words",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ovdense", "ovdense.*"]),
    package_data={"ovdense": ["assets/*"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "open_clip_torch>=3.0,<4",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "pillow>=10",
        "tqdm>=4.60",
    ],
    extras_require={
        # transformers: the reference CLIPSeg (CLIPSegForImageSegmentation) tests/test_clipseg.py
        # checks ovdense's against, pinned to the version that was checked; setuptools < 81: its
        # pkg_resources, which the official CLIM code (wusize/CLIM ovdet) imports, run as is by
        # tests/test_fvit_official.py; einops, tifffile: imported by the official AdaptCLIP code that
        # tests/test_adaptclip.py runs as is
        "dev": ["pytest>=8", "ruff>=0.5", "scipy>=1.10", "scikit-learn>=1.3", "pycocotools>=2.0.7",
                "segment-anything==1.0", "playwright>=1.50", "transformers==5.25.0", "setuptools<81",
                "einops", "tifffile"],
        "sam": ["segment-anything==1.0", "pycocotools>=2.0.7"],
        "mm": ["mmengine>=0.10,<0.11", "mmsegmentation==1.2.2", "mmdet==3.3.0", "pycocotools>=2.0.7",
               "scipy>=1.10", "prettytable"],
        "demo": ["gradio>=6,<7"],
        # the reference implementation that tests/test_benchmark_anomaly.py checks WinCLIP against
        # (anomalib 2.7 needs no torch change; its optional open_clip pin is not pulled in)
        "anomaly-ref": ["anomalib==2.7.*"],
    },
    entry_points={"console_scripts": ["ovdense=ovdense.cli:main"]},
)
