"""Train a config with mmengine's Runner (SAN: ``configs/san/``), on one or many processes.

    python tools/train.py configs/san/san_toy_synthetic.py
    python tools/train.py CONFIG --work-dir work_dirs/run1 --resume        # continue after a stop
    torchrun --nproc_per_node 8 tools/train.py CONFIG --launcher pytorch --amp

Checkpoints go to ``WORK_DIR/iter_<n>.pth`` (written under a temporary name and renamed, so a
killed run never leaves a truncated one); ``--resume`` continues from the newest complete one
in the work dir, with its optimizer, learning-rate schedule and AMP scaler. A run that is
killed and resumed ends with the weights of an uninterrupted run: every random choice of an
iteration (which images, their augmentation, the loss's sampled points) derives from
``(randomness.seed, global sample index)`` (``ovdense/mm/training.py``). The global batch is
``train_dataloader.batch_size`` × processes; the configs name it. Where torch sees no GPU,
``--launcher pytorch`` processes talk over ``gloo`` (CPU). At the end the trained head is also
written as ``WORK_DIR/san_head.safetensors`` (``ovdense.heads.san.load_head`` reads it); a CLIPSeg
head as ``WORK_DIR/clipseg_head.safetensors`` (``ovdense.heads.clipseg.load_head``).
Any mmengine config trains here (the detection configs of ``configs/ovdet/`` too); the seeded
sampler, loop and atomic checkpoints are the configs' choice.
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="config file (configs/san/<model>_<dataset>.py)")
    parser.add_argument("--work-dir", help="where checkpoints and logs go (default work_dirs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the work dir")
    parser.add_argument("--amp", action="store_true", help="mixed precision (AmpOptimWrapper, GPU only)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, key=value (e.g. train_cfg.max_iters=1000)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def build_config(args: argparse.Namespace):
    """The config of ``args.config`` with the command line's choices applied."""
    import torch
    from mmengine.config import Config

    from ovdense.errors import OvdenseError
    from ovdense.mm.training import cpu_ddp_wrapper

    if not osp.isfile(args.config):
        raise OvdenseError(f"config not found: {args.config}")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0])
    if cfg.get("train_dataloader") is None:
        raise OvdenseError(f"{args.config} has no train_dataloader: it is an evaluation config "
                           "(use tools/test.py)")
    randomness = dict(cfg.get("randomness") or {})
    if randomness.get("seed") is None:  # exact resume needs the same seed in every run
        randomness["seed"] = 0
    cfg.randomness = randomness
    sampler = cfg.train_dataloader.get("sampler") or {}
    if sampler.get("type") == "SeededInfiniteSampler":
        sampler["batch_size"] = cfg.train_dataloader.batch_size
    max_iters = (cfg.get("train_cfg") or {}).get("max_iters")
    schedulers = cfg.get("param_scheduler") or []
    schedulers = [schedulers] if isinstance(schedulers, dict) else list(schedulers)
    kept = []
    for scheduler in schedulers:
        # a schedule ends with training (--cfg-options train_cfg.max_iters=N shortens both); a
        # scheduler that would begin after the last iteration (a cosine after a warm-up) is left out
        by_iteration = not scheduler.get("by_epoch", True)
        if max_iters is not None and by_iteration:
            if scheduler.get("begin", 0) >= max_iters:
                continue
            if scheduler.get("end", 0) > max_iters:
                scheduler["end"] = max_iters
        kept.append(scheduler)
    if schedulers:
        cfg.param_scheduler = kept
    if args.amp:
        if not torch.cuda.is_available():
            raise OvdenseError("--amp needs a CUDA GPU; leave it out to train in float32 on the CPU")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    cpu_ddp_wrapper(cfg, args.launcher)
    cfg.resume = False
    if args.resume:
        from ovdense.mm.training import latest_checkpoint

        found = latest_checkpoint(cfg.work_dir)
        if found is None:
            print(f"no checkpoint in {cfg.work_dir}: starting from iteration 0", file=sys.stderr)
        else:
            cfg.resume, cfg.load_from = True, found
    return cfg


def train(argv=None):
    """Run the training loop; return the trained model (unwrapped)."""
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    from ovdense.mm.training import close_distributed, init_cpu_distributed

    args = parse_args(argv)
    cfg = build_config(args)
    init_cpu_distributed(cfg)
    try:
        runner = Runner.from_cfg(cfg)
        model = runner.train()
        model = model.module if is_model_wrapper(model) else model
        export_head(model, cfg.work_dir)
        return model
    finally:
        close_distributed()


def export_head(model, work_dir: str) -> None:
    """Write a trained SAN or CLIPSeg head as ``WORK_DIR/san_head.safetensors`` or
    ``WORK_DIR/clipseg_head.safetensors`` (process 0)."""
    from mmengine.dist import is_main_process

    from ovdense.heads import clipseg, san
    from ovdense.mm.clipseg import OvdenseCLIPSeg
    from ovdense.mm.san import OvdenseSAN

    if not is_main_process():
        return
    for kind, module, name in ((OvdenseSAN, san, "san_head"), (OvdenseCLIPSeg, clipseg, "clipseg_head")):
        if isinstance(model, kind):
            path = osp.join(work_dir, f"{name}.safetensors")
            module.save_head(path, model.head, model.backbone)
            print(f"head: {path}")


def main(argv=None) -> int:
    from ovdense.errors import OvdenseError

    try:
        train(argv)
    except OvdenseError as e:
        # SAN configs hold the backbone in model.backbone, F-ViT configs in model.clip
        hint = (" (here: --cfg-options model.backbone.pretrained=PATH for SAN, model.clip.pretrained=PATH "
                "for detection)") if "pretrained" in str(e) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from ovdense.mm.training import exit_process

    exit_process(main())
