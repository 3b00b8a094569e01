"""The SAN segmentor and the training machinery of ``ovdense/mm`` (``san.py``, ``training.py``),
and the SAN configs, on CPU with the toy backbone: no weights needed."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmcv.ops",
                    reason="needs full mmcv with its compiled ops: python tools/misc/build_mmcv.py")
pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from ovdense.backbone.prompts import Vocabulary  # noqa: E402
from ovdense.errors import OvdenseError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAN_CONFIGS = sorted((ROOT / "configs" / "san").glob("*.py"))
SMALL_HEAD = dict(side_width=48, side_heads=2, side_mlp=96, side_depth=4, num_queries=10,
                  decoder_channels=32, decoder_hidden=32, side_image_size=128)


@pytest.fixture
def shared_backbone(toy, monkeypatch):
    """Every model built here gets the one toy backbone, whatever its config names."""
    import ovdense.mm.san

    monkeypatch.setattr(ovdense.mm.san, "create_backbone", lambda **kwargs: toy)
    init_default_scope("mmseg")
    return toy


def build(cfg_model: dict):
    from mmseg.registry import MODELS

    return MODELS.build(cfg_model)


def small_model(toy_classes=("background", "red square", "blue star")):
    torch.manual_seed(0)
    return build(dict(type="OvdenseSAN", backbone=dict(name="toy"), classnames=list(toy_classes),
                      head=SMALL_HEAD, criterion=dict(num_points=64),
                      data_preprocessor=dict(type="SanDataPreprocessor", size_divisor=64)))


# --------------------------------------------------------------------------------------------
# Configs


def test_every_san_config_parses_and_builds(shared_backbone):
    """Each SAN config builds its model on the toy backbone; its vocabulary has as many classes
    as the dataset it trains or evaluates on."""
    from mmseg.registry import DATASETS

    assert len(SAN_CONFIGS) == 17
    built = 0
    for path in SAN_CONFIGS:
        cfg = Config.fromfile(str(path))
        assert cfg.model.type == "OvdenseSAN", path
        assert "Resize" not in str(cfg.test_dataloader.dataset.pipeline), path
        if not Path(cfg.model.classnames).is_file():  # PC-459's class file comes with the dataset
            assert "context459" in path.name, path
            continue
        model = build(cfg.model)
        built += 1
        dataset = cfg.test_dataloader.dataset
        if "classnames" in dataset:
            classes = Vocabulary.from_file(dataset.classnames).names
        else:
            classes = DATASETS.get(dataset.type).METAINFO["classes"]
        assert model.num_classes == len(classes), path
        assert "backbone" not in str(list(model.state_dict())[:3])
        if cfg.get("train_dataloader") is not None:
            assert cfg.train_cfg.type == "SeededIterBasedTrainLoop"
            assert cfg.train_dataloader.sampler.type == "SeededInfiniteSampler"
            assert cfg.train_dataloader.dataset.type == "SeededDataset"
            assert cfg.default_hooks.checkpoint.type == "AtomicCheckpointHook"
    assert built == 15


def test_the_official_recipe_and_its_weight_decay_groups(shared_backbone):
    """configs/san/san_vit-b16_coco-stuff164k-640x640.py against the official config, and the
    optimizer it builds: weight decay 1e-4 except norms, position and query embeddings."""
    from mmengine.optim import build_optim_wrapper

    cfg = Config.fromfile(str(ROOT / "configs" / "san" / "san_vit-b16_coco-stuff164k-640x640.py"))
    assert cfg.train_cfg.max_iters == 60000 and cfg.train_dataloader.batch_size * 4 == 32
    assert cfg.optim_wrapper.optimizer == dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=0.01, norm_type=2)
    assert cfg.param_scheduler[0]["power"] == 0.9 and cfg.param_scheduler[0]["end"] == 60000
    resize = cfg.train_dataloader.dataset.dataset.pipeline[2]
    assert resize["scales"] == [320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960]
    assert resize["max_size"] == 2560 and cfg.model.short_side == 640
    assert cfg.model.data_preprocessor.size_divisor == 640
    large = Config.fromfile(str(ROOT / "configs" / "san" / "san_vit-l14_coco-stuff164k-640x640.py"))
    assert large.model.backbone.name == "ViT-L-14-336" and large.model.head.clip_scale == 0.7

    cfg.model.head = SMALL_HEAD
    model = build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {}
    for group in wrapper.optimizer.param_groups:
        for param in group["params"]:
            decay[id(param)] = group["weight_decay"]
    no_decay = {name for name, p in model.named_parameters() if decay[id(p)] == 0.0}
    expected = {name for name, _ in model.named_parameters()
                if "norm" in name or "pos_embed" in name or "query_embed" in name}
    assert no_decay == expected and "head.clip_pos_embed" in no_decay and "head.query_embed" in no_decay
    assert all(decay[id(p)] == 1e-4 for name, p in model.named_parameters() if name not in expected)
    assert len(decay) == sum(1 for _ in model.parameters())  # every head parameter trains, no CLIP one


# --------------------------------------------------------------------------------------------
# The segmentor


def test_backbone_is_outside_the_state_dict_and_follows_the_model(shared_backbone):
    model = small_model()
    assert all(k.startswith("head.") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.head.parameters())
    model.double()
    try:
        assert model.backbone.dtype == torch.float64 and model.head.pos_embed.dtype == torch.float64
    finally:
        model.float()
    assert model.backbone.dtype == torch.float32


def test_targets_are_one_mask_per_class_present(shared_backbone):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    model = small_model()
    gt = torch.tensor([[2, 2, 255], [0, 2, 255]])
    sample = SegDataSample(gt_sem_seg=PixelData(data=gt[None]))
    target = model._target(sample, (2, 3))
    assert target.labels.tolist() == [0, 2]
    assert torch.equal(target.masks, torch.stack([gt == 0, gt == 2]))
    sample = SegDataSample(gt_sem_seg=PixelData(data=torch.tensor([[[3]]])))
    with pytest.raises(OvdenseError, match="training vocabulary has 3 classes"):
        model._target(sample, (1, 1))


def test_the_preprocessor_normalises_with_the_backbone_and_pads(shared_backbone):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    model = small_model()
    bgr = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    sample = SegDataSample(gt_sem_seg=PixelData(data=torch.zeros(1, 40, 50, dtype=torch.long)))
    data = model.data_preprocessor(dict(inputs=[bgr], data_samples=[sample]), training=True)
    x = data["inputs"]
    assert x.shape == (1, 3, 64, 64)
    expected = model.backbone.normalize(bgr.flip(0)[None].float() / 255)
    torch.testing.assert_close(x[:, :, :40, :50], expected, rtol=1e-5, atol=1e-5)
    assert (x[:, :, 40:] == 0).all() and (x[..., 50:] == 0).all()
    gt = data["data_samples"][0].gt_sem_seg.data
    assert (gt[:, 40:] == 255).all() and (gt[:, :40, :50] == 0).all()
    test = model.data_preprocessor(dict(inputs=[bgr]), training=False)
    assert torch.equal(test["inputs"][0], bgr.flip(0))


def test_each_image_draws_its_points_from_its_seed_and_draw(shared_backbone):
    """The loss of a batch is the per-image losses combined (class terms averaged, mask terms
    summed over the batch's normaliser), each image's points drawn from (seed, draw)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    model = small_model()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    samples = []
    for draw, label in ((5, 1), (9, 2)):
        gt = torch.zeros(1, 64, 64, dtype=torch.long)
        gt[:, 10:40, 20:50] = label
        sample = SegDataSample(gt_sem_seg=PixelData(data=gt))
        sample.set_metainfo(dict(draw=draw, seed=3))
        samples.append(sample)
    both = model.loss(images, samples)
    again = model.loss(images, samples)
    assert all(torch.equal(both[k], again[k]) for k in both)  # same draws, same points
    singles = [model.loss(images[i:i + 1], samples[i:i + 1]) for i in range(2)]
    # class terms: the mean of the images'; mask terms: their sum over the pair's 4 masks, where
    # each image alone (2 masks) divides by 2 — both come to the mean of the single-image terms
    for key, value in both.items():
        torch.testing.assert_close(value, (singles[0][key] + singles[1][key]) / 2, rtol=1e-5, atol=1e-6)
    samples[1].set_metainfo(dict(draw=10, seed=3))
    moved = model.loss(images, samples)
    assert not torch.equal(moved["loss_mask"], both["loss_mask"])


def test_a_resizing_test_pipeline_is_refused(shared_backbone):
    from mmseg.structures import SegDataSample

    model = small_model()
    sample = SegDataSample(metainfo=dict(ori_shape=(40, 50), img_shape=(64, 80)))
    with pytest.raises(OvdenseError, match="remove Resize"):
        model.predict([torch.zeros(3, 64, 80, dtype=torch.uint8)], [sample])


# --------------------------------------------------------------------------------------------
# Sampling, seeding, checkpoints


def test_the_sampler_splits_one_process_draws_over_processes():
    from ovdense.mm.training import SeededInfiniteSampler

    def keys(world_size, rank, batch, count, start=0):
        sampler = SeededInfiniteSampler(range(7), batch_size=batch, seed=4)
        sampler.rank, sampler.world_size = rank, world_size
        sampler.set_start_iteration(start)
        iterator = iter(sampler)
        return [next(iterator) for _ in range(count)]

    one = keys(1, 0, 4, 40)  # 10 iterations of 4
    r0, r1 = keys(2, 0, 2, 20), keys(2, 1, 2, 20)
    merged = [k for t in range(10) for k in r0[2 * t:2 * t + 2] + r1[2 * t:2 * t + 2]]
    assert merged == one
    assert [draw for _, draw, _ in one] == list(range(40))
    for epoch in range(5):  # each pass over the data is a permutation
        assert sorted(i for i, d, _ in one if d // 7 == epoch) == list(range(7))
    assert keys(1, 0, 4, 12, start=7) == one[28:40]  # resume: start at iteration 7
    assert keys(1, 0, 4, 8) != [(i, d, 5) for i, d, _ in keys(1, 0, 4, 8)]


def test_the_seeded_dataset_repeats_a_draw_and_leaves_global_state_alone():
    from mmengine.structures import BaseDataElement

    from ovdense.mm.training import SeededDataset

    class Augmenting:
        metainfo = dict(classes=("a",))

        def __len__(self):
            return 3

        def __getitem__(self, index):
            return dict(inputs=np.random.rand(3) + index, data_samples=BaseDataElement())

    dataset = SeededDataset(Augmenting())
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    a, b, c = dataset[(1, 17, 0)], dataset[(1, 17, 0)], dataset[(1, 18, 0)]
    assert np.array_equal(a["inputs"], b["inputs"]) and not np.array_equal(a["inputs"], c["inputs"])
    assert a["data_samples"].draw == 17 and a["data_samples"].seed == 0
    assert np.array_equal(np.random.get_state()[1], state)


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    from ovdense.mm.training import latest_checkpoint

    assert latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "best_mIoU.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "best_mIoU.pth"))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "best_mIoU.pth")
    for name in ("iter_2.pth", "iter_10.pth", ".iter_12.pth.tmp"):
        (tmp_path / name).write_bytes(b"x")
    # killed after iter_10.pth was renamed into place, before last_checkpoint named it
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_2.pth"))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_10.pth")


def test_the_message_hub_round_trips_through_a_weights_only_checkpoint(tmp_path):
    from mmengine.logging import HistoryBuffer

    from ovdense.mm.training import _plain, _rebuilt

    state = {"log_scalars": {"train/loss": HistoryBuffer([1.0, 2.5], [1, 1])},
             "runtime_info": {"eta": np.float64(3.5), "curve": [1.0, 2.0]}, "resumed_keys": {"eta": True}}
    torch.save(_plain(state), tmp_path / "hub.pth")
    loaded = _rebuilt(torch.load(tmp_path / "hub.pth", weights_only=True))
    buffer = loaded["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() == 1.75 and buffer.current() == 2.5
    assert loaded["runtime_info"] == {"eta": 3.5, "curve": [1.0, 2.0]}


@pytest.mark.parametrize("matplotlib", [True, False])
def test_the_loss_curve_picture(matplotlib, monkeypatch):
    """loss.png is a PNG of the requested size, with matplotlib or (without it) with PIL."""
    import io
    import sys

    from PIL import Image

    from ovdense.mm.training import loss_curve_png

    if not matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    elif importlib_missing("matplotlib"):
        pytest.skip("matplotlib is not installed")
    losses = list(np.linspace(5, 1, 50) + np.random.default_rng(0).normal(0, 0.1, 50)) + [float("nan")]
    image = Image.open(io.BytesIO(loss_curve_png(losses, width=320, height=200)))
    assert image.format == "PNG" and image.size == (320, 200)
    assert np.asarray(image.convert("L")).std() > 5  # something is drawn


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None
