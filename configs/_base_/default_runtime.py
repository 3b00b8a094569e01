# mmengine runtime shared by every benchmark config: test loop, hooks, visualiser, launcher.

default_scope = "mmseg"
custom_imports = dict(imports=["ovdense.mm"], allow_failed_imports=False)
test_cfg = dict(type="TestLoop")
# several processes (torchrun ... --launcher pytorch) evaluate a frozen model without DDP
model_wrapper_cfg = dict(type="OvdenseInferenceWrapper")
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),  # tools/test.py takes gloo where no GPU is found
)
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    visualization=dict(type="SegVisualizationHook", interval=1),  # draws with --show-dir
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends)  # named after the run
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
