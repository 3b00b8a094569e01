"""Exact, resumable training on mmengine: seeded sampling, a loop that skips instead of
replaying, atomic checkpoints, a loss-curve picture and a progress bar.

Every random choice of an iteration derives from ``(seed, draw)``, where ``draw`` is the
*global sample index*: the ``k``-th image the whole run consumes, counted across processes
in the order one process with the same global batch would consume them (``draw = t·B + r·b +
j`` for iteration ``t``, global batch ``B``, per-process batch ``b``, rank ``r``, position
``j``). So:

* ``SeededInfiniteSampler`` yields ``(index, draw, seed)`` keys: which image (a fresh
  permutation of the dataset per pass, from ``(seed, pass)``) and its draw number;
* ``SeededDataset`` wraps any mmseg dataset and runs its pipeline with Python's, NumPy's and
  torch's global generators seeded from ``(seed, draw)`` (mmcv's and mmseg's transforms draw
  from the global NumPy generator), restoring them afterwards, and records ``draw`` and
  ``seed`` in each sample's metainfo, from which the model derives its point-sampling
  generator;
* ``SeededIterBasedTrainLoop`` resumes by starting the sampler at the resumed iteration
  instead of replaying (decoding and augmenting) every image already trained on, as mmengine's
  ``IterBasedTrainLoop`` does.

A run killed at any moment and resumed from its last checkpoint therefore sees the same
images, augmentations and sampled points as an uninterrupted one; the optimizer, scheduler
and AMP scaler states travel in mmengine's checkpoint. ``AtomicCheckpointHook`` writes each
checkpoint (and ``last_checkpoint``) under a temporary name and renames it, and removes
outdated checkpoints only after the new one is in place, so a kill never leaves a truncated
or missing last checkpoint. ``latest_checkpoint`` finds the newest complete one.

All of these are registered in mmengine's root registries (visible from the ``mmseg`` scope).
"""

from __future__ import annotations

import contextlib
import math
import os
import os.path as osp
import random
import re
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from mmengine.dist import get_dist_info, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.registry import DATA_SAMPLERS, DATASETS, HOOKS, LOOPS
from mmengine.runner.loops import IterBasedTrainLoop, _InfiniteDataloaderIterator
from torch.utils.data import Sampler

from ovdense.errors import OvdenseError
from ovdense.io import write_bytes

# --------------------------------------------------------------------------------------------
# Seeds


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (NumPy's ``SeedSequence``): different keys give
    unrelated streams, the same keys the same stream, on every machine and process."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators for the block, then restore
    them (so a pipeline's draws depend on ``seed`` only, and nothing else's draws change)."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def global_share(count: int, device) -> float:
    """``count / mean(count over processes)``: a loss averaged over this process's ``count`` items,
    times this, is averaged over the items of the whole global batch once DDP averages the processes'
    gradients, as one process with the global batch averages (mmdet averages each process's RoI losses
    over its own RoIs, CLIPSelf its regions, so an item would weigh by its process's count). 1 on one
    process; every process must call it (an all-reduce). F-ViT's RoI head and CLIPSelf use it."""
    from mmengine.dist import all_reduce, get_world_size

    if get_world_size() == 1:
        return 1.0
    total = torch.tensor(float(count), device=device)
    all_reduce(total, op="mean")
    return float(count) / float(total) if float(total) > 0 else 1.0


# --------------------------------------------------------------------------------------------
# Sampler and dataset


@DATA_SAMPLERS.register_module()
class SeededInfiniteSampler(Sampler):
    """An endless sampler of ``(index, draw, seed)`` keys for ``SeededDataset``.

    Args:
        dataset: the (wrapped) dataset; only its length is used.
        batch_size: images per process per iteration (``train_dataloader.batch_size``;
            ``tools/train.py`` fills it in).
        shuffle: a new permutation of the dataset per pass (from ``(seed, pass)``), or the
            dataset's order.
        seed: the run's seed (mmengine passes ``randomness.seed``).

    Process ``r`` of ``W`` takes, at iteration ``t``, draws ``t·b·W + r·b + j`` for
    ``j < b``: together, the draws one process with batch ``b·W`` would take.
    """

    def __init__(self, dataset, batch_size: int | None = None, shuffle: bool = True,
                 seed: int | None = None):
        if batch_size is None or batch_size < 1:
            raise OvdenseError(
                "SeededInfiniteSampler needs batch_size (images per process); set "
                "train_dataloader.sampler.batch_size to train_dataloader.batch_size"
            )
        if seed is None:
            raise OvdenseError("SeededInfiniteSampler needs a seed: set randomness=dict(seed=0) in the "
                               "config")
        self.size = len(dataset)
        if self.size == 0:
            raise OvdenseError("the training dataset is empty: check its data_root and data_prefix")
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank, self.world_size = get_dist_info()
        self.start_iteration = 0

    def set_start_iteration(self, iteration: int) -> None:
        """Start the next ``iter()`` at ``iteration`` (used on resume)."""
        self.start_iteration = int(iteration)

    def draw(self, local: int) -> int:
        """The global draw number of this process's ``local``-th sample."""
        t, j = divmod(local, self.batch_size)
        return (t * self.world_size + self.rank) * self.batch_size + j

    def index(self, draw: int) -> int:
        """The dataset index of draw ``draw``."""
        epoch, position = divmod(draw, self.size)
        if not self.shuffle:
            return position
        if getattr(self, "_epoch", None) != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, 0x5A3, epoch))
            self._permutation = torch.randperm(self.size, generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[position]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        local = self.start_iteration * self.batch_size
        while True:
            draw = self.draw(local)
            yield (self.index(draw), draw, self.seed)
            local += 1

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: passes are counted by the draw number."""


@DATASETS.register_module()
class SeededDataset:
    """Runs a dataset's pipeline under the global generators seeded from ``(seed, draw)``.

    Args:
        dataset: the dataset or its config (any mmseg dataset).

    Keys are ``(index, draw, seed)`` from ``SeededInfiniteSampler``; a plain integer key is
    read as ``(key, key, 0)``. Each sample's metainfo gets ``draw`` and ``seed``.
    """

    def __init__(self, dataset):
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, Mapping) else dataset

    @property
    def metainfo(self) -> dict:
        return self.dataset.metainfo

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        index, draw, seed = (key, key, 0) if isinstance(key, int) else key
        with seeded_global_rng(derive_seed(seed, 0xDA7A, draw)):
            data = self.dataset[index]
        data["data_samples"].set_metainfo(dict(draw=int(draw), seed=int(seed)))
        return data


# --------------------------------------------------------------------------------------------
# Loop


@LOOPS.register_module()
class SeededIterBasedTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that resumes by starting a ``SeededInfiniteSampler`` at the
    resumed iteration rather than replaying every batch already trained on (which runs the
    pipeline on ``iteration × batch`` images, hours into a long run). With another sampler it
    behaves as mmengine's loop."""

    def run(self) -> torch.nn.Module:
        sampler = self.dataloader.sampler
        if self._iter == 0 or not isinstance(sampler, SeededInfiniteSampler):
            return super().run()
        sampler.set_start_iteration(self._iter)
        self.dataloader_iterator = _InfiniteDataloaderIterator(self.dataloader)
        self.runner.call_hook("before_train")
        self.runner.call_hook("before_train_epoch")
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            self.run_iter(next(self.dataloader_iterator))
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook("after_train_epoch")
        self.runner.call_hook("after_train")
        return self.runner.model


# --------------------------------------------------------------------------------------------
# Checkpoints


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` with crash-safe, weights-only files.

    * the checkpoint is written under a temporary name and renamed, ``last_checkpoint`` is
      replaced atomically, and outdated checkpoints (``max_keep_ckpts``) are removed only
      after the new one is complete (mmengine removes first), so a kill at any moment leaves
      a complete last checkpoint;
    * the message hub's state (its ``HistoryBuffer`` objects and NumPy scalars) is stored as
      plain lists and numbers, so the checkpoint loads with ``torch.load(weights_only=True)``
      (torch's default, which refuses mmengine's own objects), and is rebuilt on resume.

    Local folders only.
    """

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process():  # temporaries a killed run left behind
            for folder in {self.out_dir, runner.work_dir}:
                for name in os.listdir(folder) if osp.isdir(folder) else []:
                    if name.startswith((".iter_", ".last_checkpoint.")) and name.endswith(".tmp"):
                        os.remove(osp.join(folder, name))

    def _save_checkpoint_with_step(self, runner, step, meta):
        filename = self.filename_tmpl.format(step)
        final = osp.join(self.out_dir, filename)
        temporary = osp.join(self.out_dir, f".{filename}.tmp")
        outdated = []
        if self.max_keep_ckpts > 0 and (not self.keep_ckpt_ids or self.keep_ckpt_ids[-1] != step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:  # a deque of maxlen max_keep_ckpts
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))
        self.last_ckpt = final
        runner.message_hub.update_info("last_ckpt", final)
        runner.save_checkpoint(
            self.out_dir, osp.basename(temporary), self.file_client_args,
            save_optimizer=self.save_optimizer, save_param_scheduler=self.save_param_scheduler,
            meta=meta, by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args,
        )
        if not is_main_process():
            return
        os.replace(temporary, final)
        write_bytes(osp.join(runner.work_dir, "last_checkpoint"), final.encode())
        for old in outdated:
            path = osp.join(self.out_dir, self.filename_tmpl.format(old))
            if osp.isfile(path):
                os.remove(path)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["message_hub"] = _plain(checkpoint["message_hub"])
        checkpoint["meta"] = _plain(checkpoint["meta"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = _rebuilt(checkpoint["message_hub"])


_HISTORY = "__history_buffer__"


def _plain(value):
    """``value`` with mmengine's ``HistoryBuffer`` objects as marked dicts and NumPy values as
    Python numbers and lists (what ``torch.load(weights_only=True)`` accepts)."""
    from mmengine.logging import HistoryBuffer

    if isinstance(value, HistoryBuffer):
        return {_HISTORY: True, "log": value._log_history.tolist(), "count": value._count_history.tolist(),
                "max_length": value.max_length}
    if isinstance(value, dict):
        return type(value)((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def _rebuilt(value):
    """The inverse of ``_plain`` for the marked ``HistoryBuffer`` dicts."""
    from mmengine.logging import HistoryBuffer

    if isinstance(value, dict):
        if value.get(_HISTORY):
            return HistoryBuffer(value["log"], value["count"], value["max_length"])
        return type(value)((k, _rebuilt(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_rebuilt(v) for v in value]
    return value


def latest_checkpoint(work_dir: str) -> str | None:
    """The newest complete checkpoint of a run: the ``iter_<n>.pth`` with the largest ``n``
    (temporary files never count; a run killed between writing a checkpoint and updating
    ``last_checkpoint`` resumes from the newer one), else the file ``last_checkpoint`` names."""
    found = []
    for folder, _dirs, files in os.walk(work_dir):
        for name in files:
            match = re.fullmatch(r"iter_(\d+)\.pth", name)
            if match:
                found.append((int(match.group(1)), osp.join(folder, name)))
    if found:
        return max(found)[1]
    pointer = osp.join(work_dir, "last_checkpoint")
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named and osp.isfile(named):
            return named
    return None


# --------------------------------------------------------------------------------------------
# Progress and the loss curve


@HOOKS.register_module()
class LossCurveHook(Hook):
    """Keeps every iteration's total loss (in the message hub, so it is checkpointed and
    survives a resume) and draws ``WORK_DIR/loss.png`` every ``interval`` iterations and at
    the end (matplotlib if installed, else PIL). Process 0 only draws."""

    priority = "LOW"

    def __init__(self, interval: int = 50, filename: str = "loss.png"):
        self.interval = interval
        self.filename = filename

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not outputs or "loss" not in outputs:
            return
        curve = list(runner.message_hub.get_info("loss_curve", []))
        loss = outputs["loss"]
        curve.append(float(loss.detach() if torch.is_tensor(loss) else loss))
        runner.message_hub.update_info("loss_curve", curve)
        if self.every_n_train_iters(runner, self.interval):
            self.draw(runner)

    def after_train(self, runner) -> None:
        self.draw(runner)

    def draw(self, runner) -> None:
        curve = runner.message_hub.get_info("loss_curve", [])
        if is_main_process() and curve:
            write_bytes(osp.join(runner.work_dir, self.filename), loss_curve_png(curve))


def loss_curve_png(losses, width: int = 640, height: int = 360) -> bytes:
    """A PNG of the loss per iteration and its running mean over 20 iterations."""
    import io

    values = np.asarray(losses, np.float64)
    steps = np.arange(1, len(values) + 1)
    smooth = np.convolve(values, np.ones(20) / 20, mode="valid") if len(values) >= 20 else values
    buffer = io.BytesIO()
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        figure, axes = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
        axes.plot(steps, values, color="#9ab", linewidth=0.8, label="loss")
        axes.plot(steps[len(steps) - len(smooth):], smooth, color="#c33", label="running mean (20)")
        axes.set_xlabel("iteration")
        axes.set_ylabel("loss")
        axes.legend()
        figure.tight_layout()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        return buffer.getvalue()
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    high = high if high > low else low + 1.0
    margin = 30

    def points(ys, xs):
        return [(margin + (x - 1) / max(len(values) - 1, 1) * (width - 2 * margin),
                 height - margin - (y - low) / (high - low) * (height - 2 * margin))
                for x, y in zip(xs, ys) if math.isfinite(y)]

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    if len(values) > 1:
        draw.line(points(values, steps), fill=(150, 170, 190))
        draw.line(points(smooth, steps[len(steps) - len(smooth):]), fill=(200, 50, 50), width=2)
    draw.text((margin, 8), f"loss {low:.3g} to {high:.3g} over {len(values)} iterations", fill="black")
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """A tqdm progress bar over the training iterations (process 0), showing the loss."""

    priority = "VERY_LOW"

    def before_train(self, runner) -> None:
        self.bar = None
        if is_main_process():
            from tqdm import tqdm

            self.bar = tqdm(total=runner.max_iters, initial=runner.iter, unit="it", desc="train",
                            dynamic_ncols=True)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.bar is not None:
            self.bar.update(runner.iter + 1 - self.bar.n)
            if outputs and "loss" in outputs:
                loss = outputs["loss"]
                loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
                self.bar.set_postfix(loss=f"{float(loss):.4f}")

    def after_train(self, runner) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# Processes


def cpu_ddp_wrapper(cfg, launcher: str) -> None:
    """Where several processes (``launcher`` not ``"none"``) run without a GPU and the model is
    wrapped in ``MMDistributedDataParallel`` (the config's wrapper, or mmengine's default when it
    names none), set ``device_ids=None``: mmengine would pass ``[LOCAL_RANK]``, which DDP refuses
    for a CPU model."""
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    ddp = wrapper.get("type", "MMDistributedDataParallel") == "MMDistributedDataParallel"
    if launcher != "none" and ddp and not torch.cuda.is_available():
        cfg.model_wrapper_cfg = dict(wrapper, type="MMDistributedDataParallel", device_ids=None)


def close_distributed() -> None:
    """Destroy the process group, if one was started, once a run is over. Left to the interpreter's
    exit, gloo's threads sometimes die with ``terminate called without an active exception``
    (SIGABRT) after the work is done, and torchrun reports the whole run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a ``tools/`` entry point with ``code``. A process that ran a gloo process group on the
    CPU (``init_cpu_distributed``) leaves at once after flushing its streams and logs: even with
    the group destroyed (``close_distributed``), the interpreter's teardown of gloo's threads
    sometimes aborts (``terminate called without an active exception``, SIGABRT) after the work
    and its output are complete, and torchrun then reports the run as failed. Every other process
    exits normally."""
    import logging
    import sys

    if not _CPU_GROUP_STARTED:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


_CPU_GROUP_STARTED = False


def init_cpu_distributed(cfg) -> None:
    """Start the process group over gloo where torch sees no GPU (``cfg.launcher ==
    "pytorch"``): mmengine's own start calls ``torch.cuda.set_device`` and NCCL, which need one."""
    import datetime

    import torch.distributed as dist

    if cfg.launcher != "pytorch" or torch.cuda.is_available() or dist.is_initialized():
        return
    dist_cfg = dict(cfg.get("env_cfg", {}).get("dist_cfg", {}))
    dist_cfg.pop("backend", None)
    timeout = dist_cfg.pop("timeout", None)
    if timeout is not None:
        dist_cfg["timeout"] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend="gloo", **dist_cfg)
    global _CPU_GROUP_STARTED
    _CPU_GROUP_STARTED = True
