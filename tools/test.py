"""Evaluate a config with mmengine's Runner (mmseg's ``IoUMetric``), on one or many processes.

    python tools/test.py configs/training_free/sclip_vit-b16_voc21.py
    python tools/test.py CONFIG --cfg-options model.backbone.pretrained=/path/to/ViT-B-16.bin \\
        test_dataloader.dataset.data_root=/data/VOCdevkit/VOC2012
    torchrun --nproc_per_node 8 tools/test.py CONFIG --launcher pytorch

``--out DIR`` writes each prediction as ``DIR/<image stem>.png`` (mmseg's ``IoUMetric``:
8-bit, ``+1`` for datasets that ignore label 0; 16-bit for PC-459 and ADE20K-847, whose configs
use ``IoUMetric16``); ``--show-dir DIR`` writes overlays. With
``--launcher pytorch`` each process evaluates its share of the images and the metric gathers
them; where torch sees no GPU, the processes talk over ``gloo`` (CPU) whatever the config says.
The metrics are printed on one line at the end and written to ``WORK_DIR/<timestamp>/``.
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
    parser.add_argument("config", help="config file (configs/training_free/<method>_vit-b16_<dataset>.py)")
    parser.add_argument("--checkpoint", help="weights of the whole model (trained heads); the "
                        "training-free methods need none")
    parser.add_argument("--work-dir", help="where logs and metrics go (default work_dirs/<config name>)")
    parser.add_argument("--out", help="write the predicted label maps here, one PNG per image")
    parser.add_argument("--show", action="store_true", help="show each prediction in a window")
    parser.add_argument("--show-dir", help="write overlays of the predictions here")
    parser.add_argument("--wait-time", type=float, default=2, help="seconds per image with --show")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, key=value (e.g. model.bg_threshold=0.2)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def build_config(args: argparse.Namespace):
    """The config of ``args.config`` with the command line's overrides applied."""
    from mmengine.config import Config

    from ovdense.mm.training import cpu_ddp_wrapper

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    cpu_ddp_wrapper(cfg, args.launcher)
    if args.show or args.show_dir:
        hook = cfg.default_hooks.get("visualization")
        if hook is None:
            raise SystemExit(
                "--show/--show-dir need default_hooks.visualization=dict(type='SegVisualizationHook')"
            )
        hook["draw"] = True
        hook["interval"] = 1  # every image
        if args.show:
            hook["show"] = True
            hook["wait_time"] = args.wait_time
        if args.show_dir:
            cfg.visualizer["save_dir"] = args.show_dir
    if args.out is not None:
        cfg.test_evaluator["output_dir"] = args.out
    return cfg


def evaluate(argv=None) -> dict:
    """Run the test loop; return the metrics (the same on every process)."""
    from mmengine.runner import Runner

    from ovdense.mm.training import close_distributed, init_cpu_distributed

    args = parse_args(argv)
    cfg = build_config(args)
    init_cpu_distributed(cfg)
    try:
        runner = Runner.from_cfg(cfg)
        return dict(runner.test())
    finally:
        close_distributed()


def main(argv=None) -> int:
    from ovdense.errors import OvdenseError

    try:
        metrics = evaluate(argv)
    except OvdenseError as e:
        hint = " (here: --cfg-options model.backbone.pretrained=PATH)" if "pretrained" in str(e) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's; the process group is closed by now
        print("metrics: " + ", ".join(f"{k} {float(v):.2f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    from ovdense.mm.training import exit_process

    exit_process(main())
