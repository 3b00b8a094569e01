"""CLIPSelf (ovdense/train/clipself.py) against the official wusize/CLIPSelf code run as is: its open_clip
fork's OpenAI ViT (``encode_dense``, ``encode_pseudo_boxes`` v2), its ``CLIPSelf`` loss, its
``GridDistillDataset`` / ``ProposalDistillDataset`` samplers and transforms, its ensemble — on the same
random weights of a small tower. Skipped without a mirror of the repository (``OVDENSE_CLIPSELF_REPO``)."""

import json
import random
import types

import numpy as np
import pytest
import torch
from official_clipself import import_clipself

from ovdense.train import clipself as cs

VISION = dict(image_size=64, layers=3, width=64, head_width=16, patch_size=16)
TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return import_clipself(tmp_path_factory.mktemp("clipself"))


@pytest.fixture(scope="module")
def models(official):
    """The fork's CLIP with random weights (LayerNorm and biases randomised too), and pip open_clip's
    CLIP of the same shape holding the very same tensors."""
    import open_clip

    torch.manual_seed(0)
    fork = official.model.CLIP(32, VISION, TEXT)
    with torch.no_grad():
        for name, param in fork.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    ours = open_clip.model.CLIP(32, VISION, TEXT)
    ours.load_state_dict(fork.state_dict(), strict=True)
    return fork.eval(), ours.eval()


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (160, 160)])
def test_dense_and_region_features_equal_the_official(models, size):
    """The student's dense map equals the fork's ``encode_dense`` and its 1×1 RoIAlign region features
    ``encode_pseudo_boxes(extract_type="v2")``, at the native grid and at two resized ones."""
    fork, ours = models
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.1, 0.3, 0.9, 0.8], [0.25, 0.0, 0.5, 1.0]]),
             torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.33, 0.2, 0.4, 0.9]])]
    with torch.no_grad():
        want = fork.visual.encode_dense(images, keep_shape=True)
        got = cs.student_dense(ours.visual, images)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        want = fork.encode_pseudo_boxes(images, [b.clone() for b in boxes], normalize=False,
                                        extract_type="v2")
        got = cs.student_region_features(ours.visual, images, boxes)
    assert got.shape == (5, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_loss_and_gradients_equal_the_official(official, models):
    """The official ``CLIPSelf.__call__`` (its batch layout: boxes padded to 20 with a validity flag)
    on the fork's student and teacher, against ``cs.CLIPSelf`` on pip open_clip's copy: the loss and
    the gradient of every block's parameters."""
    import copy

    fork, ours = models
    fork_student, fork_teacher = copy.deepcopy(fork).train(), copy.deepcopy(fork).eval()
    method = cs.CLIPSelf(copy.deepcopy(ours.visual)).train()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 96, 128)
    counts = (3, 2)
    boxes = [torch.sort(torch.rand(k, 2, 2), dim=1).values.transpose(1, 2).reshape(k, 4)[:, [0, 2, 1, 3]]
             for k in counts]  # x0 < x1, y0 < y1
    crops = torch.randn(sum(counts), 3, 64, 64)
    padded = torch.zeros(2, 20, 5)
    crop_slots = torch.zeros(2, 20, 3, 64, 64)
    start = 0
    for i, (k, b) in enumerate(zip(counts, boxes)):
        padded[i, :k, :4], padded[i, :k, 4] = b, 1.0
        crop_slots[i, :k] = crops[start:start + k]
        start += k
    args = types.SimpleNamespace(multiscale=False, extract_type="v2", cosine_weight=1.0)
    losses, _, _ = official.clipself.CLIPSelf()((images, padded, crop_slots), fork_student, fork_teacher,
                                                 None, "cpu", torch.float32, False, args)
    losses["loss_cosine"].backward()
    loss = method(images, boxes, crops)
    loss.backward()
    torch.testing.assert_close(loss, losses["loss_cosine"], atol=1e-6, rtol=0)
    ours_grads = dict(method.student.named_parameters())
    for name, param in fork_student.visual.named_parameters():
        if name.startswith("transformer.resblocks."):
            torch.testing.assert_close(ours_grads[name].grad, param.grad, atol=1e-6, rtol=1e-4, msg=name)
        else:
            assert not ours_grads[name].requires_grad and ours_grads[name].grad is None, name


def test_trainable_parameters_are_the_official_lock(official, models):
    """Every block trains, nothing else of the tower: the fork's ``lock(unlocked_groups=L)`` (the
    scripts' ``--lock-image --lock-image-unlocked-groups L``) leaves the same parameters trainable."""
    import copy

    fork, ours = models
    fork_visual = copy.deepcopy(fork.visual)
    fork_visual.lock(unlocked_groups=VISION["layers"])
    want = [n for n, p in fork_visual.named_parameters() if p.requires_grad]
    assert cs.trainable_parameters(copy.deepcopy(ours.visual)) == want
    assert want and all(n.startswith("transformer.resblocks.") for n in want)


def test_ensemble_equals_the_official(official, models):
    fork, ours = models
    teacher = ours.state_dict()
    student = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.items()}
    want = official.train.student_teacher_ensemble(student, teacher, 0.7)
    got = cs.ensemble(student, teacher, 0.7)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key].to(got[key].dtype), atol=0, rtol=0, msg=key)


def test_grid_choices_and_cells_are_the_officials(official):
    ds = official.data.GridDistillDataset.__new__(official.data.GridDistillDataset)
    ds._init_choices(6)
    assert cs.grid_choices(6) == ds.choices and len(ds.choices) == 24
    assert all(m <= 6 and n <= 6 and 0.5 <= n / m <= 2 for m, n in ds.choices)
    ds._init_boxes()
    for choice, cells in ds.box_templates.items():
        assert torch.equal(cs.grid_boxes(*choice), cells), choice


def _coco(tmp_path, sizes, boxes_per_image):
    """A COCO-format file and its images (random RGB PNGs) in the official datasets' layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, ((w, h), boxes) in enumerate(zip(sizes, boxes_per_image), start=1):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i:06d}.png")
        images.append(dict(id=i, file_name=f"{i:06d}.png", width=w, height=h))
        annotations += [dict(id=len(annotations) + 1, image_id=i, bbox=list(b), category_id=1,
                             area=b[2] * b[3], iscrowd=0) for b in boxes]
    path = tmp_path / "instances.json"
    categories = [dict(id=1, name="x")]
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return path


def _transforms(official, size, crop):
    t = official.transform
    return [t.det_image_transform(size, is_train=False, mean=MEAN, std=STD),
            t.image_transform(crop, is_train=False, mean=MEAN, std=STD, resize_longest_max=True)]


def _assert_same_sample(sample, regions, seed):
    image, padded, crops = sample
    valid = padded[:, 4] > 0.5
    assert int(valid.sum()) == len(regions.boxes) > 0, seed
    torch.testing.assert_close(regions.image, image, atol=1e-6, rtol=0)
    torch.testing.assert_close(regions.boxes, padded[valid, :4], atol=1e-7, rtol=0)
    torch.testing.assert_close(regions.crops, crops[valid], atol=1e-6, rtol=0)


@pytest.mark.parametrize("crop_scale", [1.0, 1.5])
def test_grid_regions_equal_the_official_dataset(official, tmp_path, crop_scale):
    """``GridDistillDataset.__getitem__`` (its transforms, the global ``random`` seeded) and
    ``cs.grid_regions`` (a ``random.Random`` of the same seed): the same image, boxes and crops."""
    from PIL import Image

    coco = _coco(tmp_path, [(150, 97), (61, 128)], [[], []])
    args = types.SimpleNamespace(train_ratio=1.0, max_boxes=20, crop_scale=crop_scale)
    ds = official.data.GridDistillDataset(str(coco), _transforms(official, 128, 32), str(tmp_path),
                                          max_split=6, crop_size=32, args=args)
    for seed in range(6):
        index = seed % 2
        random.seed(seed)
        sample = ds[index]
        image = Image.open(tmp_path / f"{index + 1:06d}.png")
        regions = cs.grid_regions(image, random.Random(seed), MEAN, STD, size=128, crop_size=32,
                                  crop_scale=crop_scale)
        _assert_same_sample(sample, regions, seed)


def test_proposal_regions_equal_the_official_dataset(official, tmp_path):
    """``ProposalDistillDataset.__getitem__`` and ``cs.proposal_regions``: boxes under 8² pixels are
    dropped, at most 20 kept, crops enlarged 1.5×; an image without a usable box gets the quarter."""
    from PIL import Image

    rng = np.random.default_rng(1)
    many = [[float(x), float(y), float(w), float(h)] for x, y, w, h in
            zip(rng.uniform(0, 100, 26), rng.uniform(0, 60, 26), rng.uniform(2, 50, 26),
                rng.uniform(2, 40, 26))]
    coco = _coco(tmp_path, [(150, 97), (90, 120)], [many, [[3.0, 4.0, 5.0, 6.0]]])
    args = types.SimpleNamespace(min_size=8, max_size=1024, train_ceph_root="")
    ds = official.data.ProposalDistillDataset(str(coco), _transforms(official, 128, 32), str(tmp_path),
                                              crop_size=32, args=args)
    for seed in range(4):
        for index, proposals in enumerate([many, [[3.0, 4.0, 5.0, 6.0]]]):
            random.seed(seed)
            sample = ds[index]
            image = Image.open(tmp_path / f"{index + 1:06d}.png")
            regions = cs.proposal_regions(image, proposals, random.Random(seed), MEAN, STD, size=128,
                                          crop_size=32)
            _assert_same_sample(sample, regions, seed)


# --------------------------------------------------------------------------------------------
# The region-recognition benchmark (ovdense/eval/regions.py) against COCOPanopticDataset and zero_shot


@pytest.fixture(scope="module")
def panoptic(tmp_path_factory):
    from ovdense.data.layouts import write_dataset

    return write_dataset("coco-panoptic", tmp_path_factory.mktemp("panoptic"), num=3, seed=4, size=96)


class _WritableNumpy:
    """NumPy, but ``asarray`` copies: ``COCOPanopticDataset`` writes into ``np.asarray(PIL image)``, which
    the Pillow of its time returned writable and today's returns read-only (its masked crops, unused
    here, fail otherwise)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asarray(a, *args, **kwargs):
        return np.array(a, *args, **kwargs)


def test_panoptic_regions_equal_the_official_dataset(official, panoptic, tmp_path, monkeypatch):
    """``COCOPanopticDataset.__getitem__`` on the synthetic panoptic layout (things and stuff) and
    ``regions.prepare``: the same image, boxes, labels, thing flags, crops and token-grid masks."""
    from ovdense.data.layouts import panoptic_categories
    from ovdense.eval import regions as rr

    monkeypatch.setattr(official.data, "np", _WritableNumpy())
    embeddings = tmp_path / "text.npy"
    rng = np.random.default_rng(0)
    np.save(embeddings, rng.normal(size=(len(panoptic_categories()), 32)).astype(np.float32))
    ds = official.data.COCOPanopticDataset(
        str(panoptic / "annotations" / "panoptic_val2017.json"), _transforms(official, 128, 32),
        str(panoptic / "val2017"), str(embeddings), str(panoptic / "annotations" / "panoptic_val2017"),
        crop_size=32, downsample_factor=16)
    annotations = panoptic / "annotations"
    categories, samples = rr.read_panoptic(annotations / "panoptic_val2017.json", panoptic / "val2017",
                                           annotations / "panoptic_val2017")
    seen_stuff = seen_thing = 0
    for index, sample in enumerate(samples):
        image, boxes, crops, masks, _ = ds[index]
        ours = rr.prepare(sample, categories, MEAN, STD, patch=16, image_size=128, crop_size=32)
        valid = boxes[:, 5] > 0.5
        assert int(valid.sum()) == len(ours.labels) > 0
        torch.testing.assert_close(ours.image, image, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.boxes, boxes[valid, :4], atol=1e-7, rtol=0)
        assert torch.equal(ours.labels, boxes[valid, 4].long())
        assert torch.equal(ours.is_thing, boxes[valid, 7] > 0)
        torch.testing.assert_close(ours.crops, crops[valid], atol=1e-6, rtol=0)
        assert torch.equal(ours.masks, masks[valid] > 0)
        seen_thing += int(ours.is_thing.sum())
        seen_stuff += int((~ours.is_thing).sum())
    assert seen_thing and seen_stuff


def test_region_features_equal_the_officials(models, panoptic):
    """Box, mask and crop features of ``regions.region_features`` against the fork's
    ``encode_pseudo_boxes`` (v2), ``encode_masks`` (mask pooling) and ``encode_image``, normalised."""
    from ovdense.eval import regions as rr

    fork, ours = models
    annotations = panoptic / "annotations"
    categories, samples = rr.read_panoptic(annotations / "panoptic_val2017.json", panoptic / "val2017",
                                           annotations / "panoptic_val2017")
    sample = rr.prepare(next(samples), categories, MEAN, STD, patch=16, image_size=128, crop_size=64)
    with torch.no_grad():
        got = rr.region_features(ours.visual, sample)
        images = sample.image[None]
        want = dict(boxes=fork.encode_pseudo_boxes(images, [sample.boxes.clone()], normalize=True,
                                                   extract_type="v2"),
                    masks=fork.encode_masks(images, [sample.masks], normalize=True),
                    crops=fork.encode_image(sample.crops, normalize=True))
    for kind in rr.KINDS:
        torch.testing.assert_close(got[kind], want[kind], atol=1e-5, rtol=0,
                                   msg=lambda message, k=kind: f"{k}: {message}")


def test_mean_class_accuracy_equals_the_officials(official):
    from ovdense.eval import regions as rr

    rng = np.random.default_rng(3)
    labels = torch.from_numpy(rng.integers(0, 12, 400))
    labels[labels == 5] = 6  # a class without regions is skipped
    is_thing = labels < 7
    rank = torch.from_numpy(rng.integers(0, 8, 400))  # where the label sits among the top 5, if at all
    correct = torch.nn.functional.one_hot(rank.clamp(max=5), 6)[:, :5].bool()
    want = official.zero_shot.macc_with_is_thing(correct.float(), is_thing.float(), labels, "x")
    got = rr.mean_class_accuracy(correct, labels, is_thing)
    for part in ("thing", "stuff"):
        assert got[part]["top1"] == pytest.approx(want[f"x.{part}.macc1"], abs=1e-12)
        assert got[part]["top5"] == pytest.approx(want[f"x.{part}.macc5"], abs=1e-12)


def test_an_official_checkpoint_loads_through_create_backbone(official, tmp_path):
    """A checkpoint as the official ``main.py`` saves it (``epoch``, ``name``, ``state_dict`` of the whole
    CLIP, ``optimizer``) from an OpenAI-style tower (QuickGELU) loads with ``create_backbone(CONFIG,
    pretrained=FILE)`` (``weights_only``) and gives the fork's dense features."""
    from ovdense import create_backbone

    torch.manual_seed(5)
    fork = official.model.CLIP(32, VISION, TEXT, quick_gelu=True).eval()
    optimizer = torch.optim.AdamW([p for p in fork.visual.parameters()], lr=1e-5)
    fork.visual.ln_post.weight.sum().backward()
    optimizer.step()
    torch.save({"epoch": 6, "name": "clipself_openai_vitb16", "state_dict": fork.state_dict(),
                "optimizer": optimizer.state_dict()}, tmp_path / "epoch_6.pt")
    config = tmp_path / "tiny-quickgelu.json"
    config.write_text(json.dumps(dict(embed_dim=32, quick_gelu=True, vision_cfg=VISION, text_cfg=TEXT)))
    backbone = create_backbone(str(config), pretrained=str(tmp_path / "epoch_6.pt"),
                               cache_dir=tmp_path / "cache")
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(cs.student_dense(backbone.model.visual, images),
                                   fork.visual.encode_dense(images, keep_shape=True), atol=1e-5, rtol=0)
