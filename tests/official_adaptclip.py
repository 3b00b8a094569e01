"""The official AdaptCLIP code (gaobb/AdaptCLIP, GPL-2.0), read from its mirror and run as is by the tests
that compare ovdense with it (tests/test_adaptclip.py). ``OVDENSE_ADAPTCLIP_REPO`` names the mirror (a bare
git repository or a clone); without it the tests skip.

What is replaced, and nothing else: ``adaptcliplib.load`` (a download) returns a model built by the
official ``build_model`` from the test's own random state dict; ``torch.Tensor.cuda`` (the official
static prompts and labels are moved with ``.cuda()``) returns the tensor on the CPU; ``tools.Evaluator``
(its ``metrics`` package needs anomalib's lightning stack) records what ``test.py`` hands it instead of
scoring it; ``tabulate`` (the printed table) and ``tools.visualizer`` (unused) are stand-ins.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from official_clim import mirror_checkout
from PIL import Image

REPO = Path(os.environ.get("OVDENSE_ADAPTCLIP_REPO", "/work/.mirror/gaobb+AdaptCLIP/repo"))
_MODULES = ("adaptcliplib", "dataset", "tools", "metrics", "tabulate")

#: the official scripts hard-code ViT-L/14@336px's patch (14), feature width (768) and DPAM_layer (20, on 24
#: blocks); a tiny CLIP of that shape: heads = width // 64 (OpenAI's rule, which build_model applies)
CONFIG = {
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 56, "layers": 24, "width": 64, "head_width": 64, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def _is_official(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in _MODULES)


class Recorder:
    """Stands in for ``tools.Evaluator``: keeps the ``results_eval`` dict ``test.py`` builds (maps, image
    scores, paths) and answers zeros for every metric."""

    last: dict | None = None

    def __init__(self, device, metrics=None, sample_level=False):
        self.metrics = list(metrics or [])

    def run(self, results, cls_name, logger):
        Recorder.last = results
        return {metric: 0.0 for metric in self.metrics}


def import_adaptclip(dest: Path) -> SimpleNamespace:
    """``adaptcliplib``, ``dataset``, ``test.py`` and ``train.py`` of the mirror, imported from ``dest``; the
    modules they import under common names (``tools``, ``dataset``) are removed from ``sys.modules``
    afterwards (the official modules keep their own references)."""
    import pytest

    for package in ("ftfy", "regex", "einops", "tifffile", "pkg_resources"):  # the official code's imports
        pytest.importorskip(package, reason=f"the official AdaptCLIP code imports {package}")
    mirror_checkout(REPO, dest, ("adaptcliplib", "dataset", "tools", "test.py", "train.py"),
                    "OVDENSE_ADAPTCLIP_REPO")
    own = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_official(name)}
    sys.path.insert(0, str(dest))
    try:
        import adaptcliplib
        import dataset

        tools = types.ModuleType("tools")
        tools.__path__ = [str(dest / "tools")]
        sys.modules["tools"] = tools
        utils = importlib.import_module("tools.utils")
        logger = importlib.import_module("tools.logger")
        tools.get_transform, tools.setup_seed = utils.get_transform, utils.setup_seed
        tools.normalize = utils.normalize
        tools.get_logger, tools.Evaluator, tools.visualizer = logger.get_logger, Recorder, None
        table = types.ModuleType("tabulate")
        table.tabulate = lambda *args, **kwargs: ""
        sys.modules["tabulate"] = table
        scripts = {}
        for name in ("test", "train"):
            spec = importlib.util.spec_from_file_location(f"adaptclip_official_{name}", dest / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            scripts[name] = module
    finally:
        sys.path.remove(str(dest))
        for name in [name for name in sys.modules if _is_official(name)]:
            sys.modules.pop(name)
        sys.modules.update(own)
    return SimpleNamespace(lib=adaptcliplib, dataset=dataset, test=scripts["test"], train=scripts["train"])


@contextlib.contextmanager
def cpu_cuda():
    """``Tensor.cuda()`` returns the tensor itself while the official code runs (it has no CPU path)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def official_model(official: SimpleNamespace, state: dict):
    """The official ``AdaptCLIP`` CLIP (``build_model``) with ``state`` (an open_clip CLIP's, the same
    key names), strict."""
    state = {k: v.clone() for k, v in state.items() if k != "attn_mask"}
    return official.lib.build_model.build_model("ViT-L/14@336px", state)


def random_adapters(official: SimpleNamespace, model, image_size: int, generator: torch.Generator,
                    n_ctx: int = 12, reduction: int = 4, mid_dim: int = 128) -> dict:
    """The three official adapters with random weights and batch-norm statistics, as ``train.py`` saves
    them: ``{"textual_learner": ..., "visual_learner": ..., "pq_learner": ...}``."""
    lib = official.lib
    textual = lib.TextualAdapter(model.to("cpu"), image_size, n_ctx)
    visual = lib.VisualAdapter(image_size, 14, input_dim=768, reduction=reduction)
    pq = lib.PQAdapter(image_size, 14, context=True, input_dim=768, mid_dim=mid_dim, layers_num=4)
    with torch.no_grad():
        for module in (textual, visual, pq):
            for name, p in module.named_parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if "ctx" in name else 0.05))
            for name, b in module.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
                elif name.endswith("running_var"):
                    b.copy_(torch.rand(b.shape, generator=generator) + 0.5)
    return {"textual_learner": textual.state_dict(), "visual_learner": visual.state_dict(),
            "pq_learner": pq.state_dict()}


def write_mvtec(root: Path, categories: dict[str, dict], size: tuple[int, int] = (80, 96)) -> Path:
    """A small dataset in the official ``meta.json`` layout (``dataset/mvtec.py``'s): per category
    ``train/good`` and ``test/{good,defect}`` PNGs with ``ground_truth/defect`` masks. ``categories``:
    name → ``{"train": n, "good": n, "defect": n, "seed": s}``. Returns the root."""
    info = {"train": {}, "test": {}}
    for name, counts in categories.items():
        rng = np.random.default_rng(counts["seed"])
        base = rng.integers(40, 200, size=(1, 1, 3))
        for phase, species in (("train", (("good", counts["train"]),)),
                               ("test", (("good", counts["good"]), ("defect", counts["defect"])))):
            rows = []
            for specie, count in species:
                for index in range(count):
                    noise = rng.normal(0, 18, size=(*size, 3))
                    image = np.clip(base + noise, 0, 255)
                    mask = np.zeros(size, np.uint8)
                    if specie != "good":
                        y, x = rng.integers(8, size[0] - 24), rng.integers(8, size[1] - 24)
                        mask[y:y + 14, x:x + 18] = 255
                        image[mask > 0] = rng.integers(0, 255, size=3)
                    path = f"{name}/{phase}/{specie}/{index:03d}.png"
                    (root / path).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image.astype(np.uint8)).save(root / path)
                    mask_path = ""
                    if specie != "good":
                        mask_path = f"{name}/ground_truth/{specie}/{index:03d}_mask.png"
                        (root / mask_path).parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(mask).save(root / mask_path)
                    rows.append(dict(img_path=path, mask_path=mask_path, cls_name=name, specie_name=specie,
                                     anomaly=int(specie != "good")))
            info[phase][name] = rows
    (root / "meta.json").write_text(json.dumps(info, indent=2))
    return root


def test_args(data: Path, checkpoint: Path, out: Path, shots: int, image_size: int, seed: int = 10):
    """``test.py``'s arguments as ``scripts/test_adaptclip.sh`` gives them (three adapters, context on)."""
    return SimpleNamespace(test_data_path=str(data), save_path=str(out), pretrained_model="ViT-L/14@336px",
                           checkpoint_path=str(checkpoint), dataset="mvtec", features_list=[6, 12, 18, 24],
                           batch_size=8, image_size=image_size, n_ctx=12, seed=seed, sigma=4, k_shots=shots,
                           visual_learner=True, textual_learner=True, pq_learner=True,
                           eval_metrics=["I-AUROC", "P-AUROC"], fusion_type="average_mean", vl_reduction=4,
                           pq_mid_dim=128, pq_context=True, class_name=None)


def run_official_test(official: SimpleNamespace, model, args) -> dict:
    """``test.test(args)`` as is, ``adaptcliplib.load`` returning ``model``: what it hands its evaluator
    (``pr_masks [N, S, S]``, ``pr_anomalys [N]``, ``query_paths``, …)."""
    official.test.adaptcliplib.load = lambda name, device="cpu": (model, None)
    Recorder.last = None
    with cpu_cuda():
        official.test.test(args)
    return Recorder.last


def train_args(data: Path, out: Path, batch_size: int, image_size: int):
    """``train.py``'s arguments as ``scripts/train_adaptclip.sh`` gives them, for one epoch."""
    return SimpleNamespace(train_data_path=str(data), save_path=str(out), dataset="mvtec",
                           pretrained_model="ViT-L/14@336px", n_ctx=12, features_list=[6, 12, 18, 24],
                           epoch=1,
                           learning_rate=0.001, batch_size=batch_size, image_size=image_size, print_freq=1,
                           save_freq=1, seed=10, k_shots=1, visual_learner=True, textual_learner=True,
                           pq_learner=True, vl_reduction=4, pq_mid_dim=128, pq_context=True)


def run_official_train(official: SimpleNamespace, model, args) -> SimpleNamespace:
    """``train.train(args)`` as is (``adaptcliplib.load`` returning ``model``; its data loader without
    worker processes), recording the adapters' weights as built (``initial``: their state dicts), every
    batch it drew (``batches``) and, at each optimizer step, the gradients by parameter name (``grads``)."""
    record = SimpleNamespace(initial={}, modules={}, batches=[], grads=[])
    lib = official.lib

    def recording(cls, key):
        class Recorded(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                record.modules[key] = self
                record.initial[key] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return Recorded

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            grads = {}
            for key in ("textual_learner", "visual_learner", "pq_learner"):
                for name, p in record.modules[key].named_parameters():
                    grads[f"{key}.{name}"] = None if p.grad is None else p.grad.detach().clone()
            record.grads.append(grads)
            return super().step(closure)

    real_loader = torch.utils.data.DataLoader

    def loader(dataset, **kwargs):
        kwargs["num_workers"] = 0
        for items in real_loader(dataset, **kwargs):
            record.batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                   for k, v in items.items()})
            yield items

    class Loader:
        def __init__(self, dataset, **kwargs):
            self.dataset, self.kwargs = dataset, kwargs

        def __iter__(self):
            return loader(self.dataset, **self.kwargs)

        def __len__(self):
            return len(real_loader(self.dataset, **self.kwargs))

    train = official.train
    saved = {name: getattr(train, name) for name in ("TextualAdapter", "VisualAdapter", "PQAdapter")}
    train.TextualAdapter = recording(lib.TextualAdapter, "textual_learner")
    train.VisualAdapter = recording(lib.VisualAdapter, "visual_learner")
    train.PQAdapter = recording(lib.PQAdapter, "pq_learner")
    train.adaptcliplib.load = lambda name, device="cpu": (model, None)
    adam, data_loader = torch.optim.Adam, torch.utils.data.DataLoader
    torch.optim.Adam, torch.utils.data.DataLoader = RecordingAdam, Loader
    try:
        with cpu_cuda():
            train.train(args)
    finally:
        torch.optim.Adam, torch.utils.data.DataLoader = adam, data_loader
        for name, cls in saved.items():
            setattr(train, name, cls)
    return record
