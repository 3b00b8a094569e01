"""The SAN criterion (``ovdense/train/criterion.py``) against an independent float64 reference.

The reference here is written from the equations (the criterion module's docstring and the
official ``san/model/matcher.py``/``criterion.py``): its own bilinear sampling (align_corners=False,
zeros outside), its own costs and losses, matching by brute force over every assignment. It
draws its random points from a generator seeded like the criterion's, in the documented order
(outputs in list order; per output one ``[1, P, 2]`` draw per image with targets, then
``[M, 3P, 2]`` and ``[M, P − ⌊0.75 P⌋, 2]``).

The parity test builds mmsegmentation 1.2.2's ``SideAdapterCLIPHead`` from its
``configs/_base_/models/san_vit-b16.py`` and calls its ``loss_by_feat`` on the same predictions and
targets. Same points: mmseg draws every random point with ``torch.rand(..., device=...)`` (in
``MatchMasks._get_targets_single`` and ``get_uncertain_point_coords_with_randomness``), in the same
order and shapes as ovdense, so the test patches ``torch.rand`` during mmseg's call to draw from a
CPU generator seeded like the one ovdense was given.
"""

import itertools
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from ovdense.errors import OvdenseError
from ovdense.train.criterion import (
    SanCriterion,
    SanTarget,
    dice_loss,
    point_sample,
    sample_uncertain_points,
    sigmoid_ce_loss,
)


class Output:
    """Stands in for ``ovdense.heads.san.SanOutput`` (the criterion reads only these two)."""

    def __init__(self, mask_logits, class_logits):
        self.mask_logits = mask_logits
        self.class_logits = class_logits


# --- the independent reference (numpy, float64) ---------------------------------------------


def ref_sample(grid: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear value of ``grid`` [H, W] at ``points`` [P, 2] = (x, y) in [0, 1]²: pixel centres
    at (i + 0.5)/W, zeros outside the grid."""
    height, width = grid.shape
    u = points[:, 0] * width - 0.5
    v = points[:, 1] * height - 0.5
    x0, y0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fx, fy = u - x0, v - y0

    def at(y, x):
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        return np.where(inside, grid[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)], 0.0)

    return (
        at(y0, x0) * (1 - fx) * (1 - fy)
        + at(y0, x0 + 1) * fx * (1 - fy)
        + at(y0 + 1, x0) * (1 - fx) * fy
        + at(y0 + 1, x0 + 1) * fx * fy
    )


def ref_bce(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean over points of −t·log σ(x) − (1−t)·log(1−σ(x))."""
    return float(np.mean(np.logaddexp(0, -logits) * target + np.logaddexp(0, logits) * (1 - target)))


def ref_dice(logits: np.ndarray, target: np.ndarray) -> float:
    prob = 1 / (1 + np.exp(-logits))
    return float(1 - (2 * np.sum(prob * target) + 1) / (np.sum(prob) + np.sum(target) + 1))


def ref_cost(class_logits, mask_logits, labels, masks, points, weights=(2.0, 5.0, 5.0)):
    """[Q, K] matching cost from the formulas, at ``points`` [P, 2]."""
    probs = np.exp(class_logits - class_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    pred = [ref_sample(m, points) for m in mask_logits]
    gt = [ref_sample(g, points) for g in masks]
    cost = np.zeros((len(pred), len(gt)))
    for q, k in itertools.product(range(len(pred)), range(len(gt))):
        cost[q, k] = (
            weights[0] * -probs[q, labels[k]]
            + weights[1] * ref_bce(pred[q], gt[k])
            + weights[2] * ref_dice(pred[q], gt[k])
        )
    return cost


def brute_force_match(cost: np.ndarray) -> list[tuple[int, int]]:
    """The minimum-cost one-to-one pairs (query, target) over every assignment, queries ascending."""
    num_queries, num_targets = cost.shape
    best, best_pairs = math.inf, None
    if num_queries >= num_targets:
        for queries in itertools.permutations(range(num_queries), num_targets):
            total = sum(cost[q, k] for k, q in enumerate(queries))
            if total < best:
                best, best_pairs = total, [(q, k) for k, q in enumerate(queries)]
    else:
        for chosen in itertools.permutations(range(num_targets), num_queries):
            total = sum(cost[q, k] for q, k in enumerate(chosen))
            if total < best:
                best, best_pairs = total, list(enumerate(chosen))
    return sorted(best_pairs)


def reference_losses(outputs, targets, seed, num_points, num_classes, void_weight=0.1):
    """The weighted loss terms of every output, from the formulas (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    num_masks = max(sum(len(t.labels) for t in targets), 1)
    num_uncertain = int(0.75 * num_points)
    per_output = []
    for output in outputs:
        class_logits = output.class_logits.detach().double().numpy()
        mask_logits = output.mask_logits.detach().double().numpy()
        batch, num_queries = class_logits.shape[:2]
        labels = np.full((batch, num_queries), num_classes)
        pairs = []  # (prediction map, target map), image by image, queries ascending
        for b, t in enumerate(targets):
            if len(t.labels) == 0:
                continue
            points = torch.rand((1, num_points, 2), generator=generator)[0].double().numpy()
            masks = t.masks.double().numpy()
            cost = ref_cost(class_logits[b], mask_logits[b], t.labels.numpy(), masks, points)
            for q, k in brute_force_match(cost):
                labels[b, q] = int(t.labels[k])
                pairs.append((mask_logits[b, q], masks[k]))
        weight = np.ones(num_classes + 1)
        weight[-1] = void_weight
        log_probs = class_logits - np.log(np.exp(class_logits).sum(-1, keepdims=True))
        picked = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
        loss_cls = float((weight[labels] * picked).sum() / weight[labels].sum())
        loss_mask = loss_dice = 0.0
        if pairs:
            candidates = torch.rand((len(pairs), 3 * num_points, 2), generator=generator).double().numpy()
            fresh = (
                torch.rand((len(pairs), num_points - num_uncertain, 2), generator=generator).double().numpy()
            )
            for (pred, gt), cand, extra in zip(pairs, candidates, fresh):
                uncertainty = -np.abs(ref_sample(pred, cand))
                points = np.concatenate([cand[np.argsort(-uncertainty)[:num_uncertain]], extra])
                loss_mask += ref_bce(ref_sample(pred, points), ref_sample(gt, points)) / num_masks
                loss_dice += ref_dice(ref_sample(pred, points), ref_sample(gt, points)) / num_masks
        per_output.append({"loss_cls": 2 * loss_cls, "loss_mask": 5 * loss_mask, "loss_dice": 5 * loss_dice})
    losses = dict(per_output[-1])
    for i, terms in enumerate(per_output[:-1]):
        losses.update({f"d{i}.{k}": v for k, v in terms.items()})
    return losses


# --- small random problems -------------------------------------------------------------------


def random_target(rng: torch.Generator, num_classes: int, size: int, num_targets: int) -> SanTarget:
    """A semantic label map cut into one mask per class present (as mmseg's targets)."""
    labels = torch.randperm(num_classes, generator=rng)[:num_targets]
    label_map = labels[torch.randint(0, num_targets, (size // 4, size // 4), generator=rng)]
    label_map = label_map.repeat_interleave(4, 0).repeat_interleave(4, 1)  # size, size
    present = torch.unique(label_map)
    return SanTarget(labels=present, masks=label_map[None] == present[:, None, None])  # K, size, size


def random_outputs(rng, num_outputs, batch, num_queries, num_classes, grid):
    return [
        Output(
            mask_logits=(3 * torch.randn(batch, num_queries, grid, grid, generator=rng)).requires_grad_(),
            class_logits=(
                2 * torch.randn(batch, num_queries, num_classes + 1, generator=rng)
            ).requires_grad_(),
        )
        for _ in range(num_outputs)
    ]


# --- tests -----------------------------------------------------------------------------------


def test_point_sample_is_bilinear_with_zero_padding():
    rng = torch.Generator().manual_seed(0)
    grid = torch.randn(1, 1, 5, 7, generator=rng)
    points = torch.rand(1, 50, 2, generator=rng) * 1.2 - 0.1  # some outside [0, 1]²
    got = point_sample(grid, points)[0, 0].numpy()
    np.testing.assert_allclose(
        got, ref_sample(grid[0, 0].double().numpy(), points[0].double().numpy()), atol=1e-6
    )


@pytest.mark.parametrize("num_queries,num_targets", [(5, 3), (4, 4), (2, 3)])
def test_matching_is_the_brute_force_optimum(num_queries, num_targets):
    num_classes, num_points = 6, 40
    criterion = SanCriterion(num_classes, num_points=num_points)
    for seed in range(4):
        rng = torch.Generator().manual_seed(seed)
        target = random_target(rng, num_classes, 16, num_targets)
        while len(target.labels) < num_targets:  # every class drawn must be present
            target = random_target(rng, num_classes, 16, num_targets)
        class_logits = 2 * torch.randn(num_queries, num_classes + 1, generator=rng)
        mask_logits = 3 * torch.randn(num_queries, 4, 4, generator=rng)
        generator = torch.Generator().manual_seed(100 + seed)
        query_idx, target_idx = criterion.match(class_logits, mask_logits, target, generator)
        points = torch.rand((1, num_points, 2), generator=torch.Generator().manual_seed(100 + seed))[0]
        cost = ref_cost(
            class_logits.double().numpy(),
            mask_logits.double().numpy(),
            target.labels.numpy(),
            target.masks.double().numpy(),
            points.double().numpy(),
        )
        assert list(zip(query_idx.tolist(), target_idx.tolist())) == brute_force_match(cost)


def test_losses_equal_the_reference_with_deep_supervision():
    num_classes, num_points = 5, 24
    rng = torch.Generator().manual_seed(1)
    targets = [
        random_target(rng, num_classes, 32, 3),
        SanTarget(torch.zeros(0, dtype=torch.long), torch.zeros(0, 32, 32, dtype=torch.bool)),
        random_target(rng, num_classes, 32, 2),
    ]
    outputs = random_outputs(rng, 2, 3, 4, num_classes, 8)
    criterion = SanCriterion(num_classes, num_points=num_points)
    losses = criterion(outputs, targets, generator=torch.Generator().manual_seed(7))
    expected = reference_losses(outputs, targets, 7, num_points, num_classes)
    assert list(losses) == list(expected)
    assert set(losses) == {
        "loss_cls",
        "loss_mask",
        "loss_dice",
        "d0.loss_cls",
        "d0.loss_mask",
        "d0.loss_dice",
    }
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name


def test_loss_terms_against_direct_formulas():
    rng = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(3, 30, generator=rng)
    targets = (torch.rand(3, 30, generator=rng) > 0.5).float()
    lg, tg = logits.double().numpy(), targets.double().numpy()
    assert sigmoid_ce_loss(logits, targets, 2.0).item() == pytest.approx(
        sum(ref_bce(lg[i], tg[i]) for i in range(3)) / 2, rel=1e-6
    )
    assert dice_loss(logits, targets, 2.0).item() == pytest.approx(
        sum(ref_dice(lg[i], tg[i]) for i in range(3)) / 2, rel=1e-6
    )


@pytest.mark.parametrize("void_weight", [0.1, 0.5])
def test_void_weight_in_the_class_loss(void_weight):
    num_classes, num_queries = 3, 4
    # one target covering the whole image, one query that predicts it, the others void-ish
    mask_logits = torch.full((1, num_queries, 4, 4), -4.0)
    mask_logits[0, 2] = 4.0
    class_logits = torch.randn(1, num_queries, num_classes + 1, generator=torch.Generator().manual_seed(3))
    target = SanTarget(torch.tensor([1]), torch.ones(1, 16, 16, dtype=torch.bool))
    criterion = SanCriterion(num_classes, void_weight=void_weight, num_points=64)
    losses = criterion(
        [Output(mask_logits, class_logits)], [target], generator=torch.Generator().manual_seed(0)
    )
    log_probs = torch.log_softmax(class_logits[0].double(), -1)
    ce = [-log_probs[q, 1 if q == 2 else num_classes].item() for q in range(num_queries)]
    weights = [1.0 if q == 2 else void_weight for q in range(num_queries)]
    expected = 2 * sum(w * c for w, c in zip(weights, ce)) / sum(weights)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-6)


def test_important_points_are_the_most_uncertain():
    rng = torch.Generator().manual_seed(4)
    logits = 2 * torch.randn(3, 1, 6, 6, generator=rng)
    num_points, num_uncertain = 20, 15
    points = sample_uncertain_points(logits, num_points, 3.0, 0.75, torch.Generator().manual_seed(9))
    assert points.shape == (3, num_points, 2)
    replay = torch.Generator().manual_seed(9)
    candidates = torch.rand((3, 60, 2), generator=replay)
    fresh = torch.rand((3, 5, 2), generator=replay)
    for i in range(3):
        uncertainty = -np.abs(ref_sample(logits[i, 0].double().numpy(), candidates[i].double().numpy()))
        top = np.argsort(-uncertainty)[:num_uncertain]
        chosen = points[i, :num_uncertain]
        # the chosen points are exactly the top-15 candidates, in descending uncertainty
        torch.testing.assert_close(chosen, candidates[i, top])
        rest = np.setdiff1d(np.arange(60), top)
        assert uncertainty[top].min() >= uncertainty[rest].max()
        torch.testing.assert_close(points[i, num_uncertain:], fresh[i])


def test_same_generator_same_losses_other_generator_other_losses():
    num_classes = 4
    rng = torch.Generator().manual_seed(5)
    targets = [random_target(rng, num_classes, 32, 3)]
    outputs = random_outputs(rng, 1, 1, 6, num_classes, 8)
    criterion = SanCriterion(num_classes, num_points=50)
    first = criterion(outputs, targets, generator=torch.Generator().manual_seed(11))
    again = criterion(outputs, targets, generator=torch.Generator().manual_seed(11))
    other = criterion(outputs, targets, generator=torch.Generator().manual_seed(12))
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert first["loss_mask"] != other["loss_mask"]
    assert first["loss_dice"] != other["loss_dice"]


def test_per_image_generators_make_an_image_s_points_independent_of_its_batch():
    """With one generator per image (the DDP case), splitting a batch changes no point: the mask
    terms of the batch are the sums of the images' terms under the same normaliser."""
    num_classes, seeds = 4, (21, 22, 23)
    rng = torch.Generator().manual_seed(13)
    targets = [random_target(rng, num_classes, 32, 3), random_target(rng, num_classes, 32, 2)]
    targets.insert(1, SanTarget(torch.zeros(0, dtype=torch.long), torch.zeros(0, 32, 32, dtype=torch.bool)))
    outputs = random_outputs(rng, 2, 3, 5, num_classes, 8)
    criterion = SanCriterion(num_classes, num_points=40)
    total = sum(len(t.labels) for t in targets)
    batch = criterion(outputs, targets, [torch.Generator().manual_seed(s) for s in seeds], num_masks=total)
    alone = [
        criterion(
            [Output(o.mask_logits[b : b + 1], o.class_logits[b : b + 1]) for o in outputs],
            [targets[b]],
            [torch.Generator().manual_seed(seeds[b])],
            num_masks=total,
        )
        for b in range(3)
    ]
    for name in ("loss_mask", "loss_dice", "d0.loss_mask", "d0.loss_dice"):
        assert batch[name].item() == pytest.approx(sum(a[name].item() for a in alone), rel=1e-5), name
    one = criterion(outputs, targets, torch.Generator().manual_seed(seeds[0]), num_masks=total)
    assert one["loss_mask"].item() != pytest.approx(batch["loss_mask"].item(), rel=1e-5)


def test_no_targets_gives_a_finite_loss_and_class_gradients():
    num_classes = 3
    outputs = random_outputs(torch.Generator().manual_seed(6), 2, 2, 5, num_classes, 4)
    empty = SanTarget(torch.zeros(0, dtype=torch.long), torch.zeros(0, 16, 16, dtype=torch.bool))
    losses = SanCriterion(num_classes, num_points=32)(outputs, [empty, empty])
    total = sum(losses.values())
    assert torch.isfinite(total)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    expected = 2 * -torch.log_softmax(outputs[-1].class_logits.detach(), -1)[..., num_classes].mean()
    assert losses["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert outputs[-1].class_logits.grad.abs().sum() > 0


def test_gradients_reach_mask_and_class_logits_of_every_output():
    num_classes = 4
    rng = torch.Generator().manual_seed(7)
    targets = [random_target(rng, num_classes, 32, 2), random_target(rng, num_classes, 32, 3)]
    outputs = random_outputs(rng, 2, 2, 5, num_classes, 8)
    losses = SanCriterion(num_classes, num_points=64)(
        outputs, targets, generator=torch.Generator().manual_seed(0)
    )
    sum(losses.values()).backward()
    for output in outputs:
        assert output.mask_logits.grad.abs().sum() > 0
        assert output.class_logits.grad.abs().sum() > 0


def test_num_masks_normalises_the_mask_terms_only():
    num_classes = 4
    rng = torch.Generator().manual_seed(8)
    targets = [random_target(rng, num_classes, 32, 3)]
    outputs = random_outputs(rng, 1, 1, 5, num_classes, 8)
    criterion = SanCriterion(num_classes, num_points=32)
    local = criterion(outputs, targets, generator=torch.Generator().manual_seed(0))
    given = criterion(
        outputs, targets, generator=torch.Generator().manual_seed(0), num_masks=2 * len(targets[0].labels)
    )
    assert given["loss_mask"].item() == pytest.approx(local["loss_mask"].item() / 2, rel=1e-6)
    assert given["loss_dice"].item() == pytest.approx(local["loss_dice"].item() / 2, rel=1e-6)
    assert given["loss_cls"].item() == local["loss_cls"].item()


def test_non_finite_logits_give_a_non_finite_loss_not_a_crash():
    num_classes = 3
    rng = torch.Generator().manual_seed(9)
    targets = [random_target(rng, num_classes, 16, 2)]
    outputs = random_outputs(rng, 1, 1, 4, num_classes, 4)
    outputs[0].class_logits.data[0, 1, 0] = float("nan")
    losses = SanCriterion(num_classes, num_points=16)(
        outputs, targets, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.isfinite(losses["loss_cls"])


def test_a_label_outside_the_vocabulary_is_a_user_error():
    outputs = random_outputs(torch.Generator().manual_seed(10), 1, 1, 4, 3, 4)
    target = SanTarget(torch.tensor([3]), torch.ones(1, 16, 16, dtype=torch.bool))
    with pytest.raises(OvdenseError, match="outside"):
        SanCriterion(3, num_points=16)(outputs, [target])


# --- parity with mmsegmentation 1.2.2 ---------------------------------------------------------


def _mmseg_san_head(num_classes):
    try:
        import mmcv.ops  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mmseg parity needs full mmcv with compiled ops (python tools/misc/build_mmcv.py): {e}")
    import mmseg
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    path = os.path.join(
        os.path.dirname(mmseg.__file__), ".mim", "configs", "_base_", "models", "san_vit-b16.py"
    )
    head_cfg = Config.fromfile(path).model.decode_head
    assert head_cfg.num_classes == num_classes and head_cfg.train_cfg.num_points == 12544
    init_default_scope("mmseg")
    return MODELS.build(head_cfg)


def test_losses_equal_mmseg_loss_by_feat(monkeypatch):
    from mmengine.structures import InstanceData

    num_classes, num_queries, size = 171, 100, 320  # the SAN ViT-B/16 config's classes and queries
    head = _mmseg_san_head(num_classes)
    rng = torch.Generator().manual_seed(0)
    targets = [
        random_target(rng, num_classes, size, 6),
        random_target(rng, num_classes, size, 2),
        SanTarget(torch.zeros(0, dtype=torch.long), torch.zeros(0, size, size, dtype=torch.bool)),
    ]
    outputs = random_outputs(rng, 2, 3, num_queries, num_classes, size // 16)  # deep supervision + last

    ours = SanCriterion(num_classes)(outputs, targets, generator=torch.Generator().manual_seed(1234))
    grads_ours = torch.autograd.grad(sum(ours.values()), [o.mask_logits for o in outputs])

    replay = torch.Generator().manual_seed(1234)
    real_rand = torch.rand

    def rand_from_replay(*size, device=None, **kwargs):
        return real_rand(*size, generator=replay, **kwargs).to(device)

    gt_instances = [InstanceData(labels=t.labels, masks=t.masks.long()) for t in targets]
    with monkeypatch.context() as patch:
        patch.setattr(torch, "rand", rand_from_replay)
        theirs = head.loss_by_feat(
            [o.class_logits for o in outputs], [o.mask_logits for o in outputs], gt_instances
        )
    grads_theirs = torch.autograd.grad(sum(theirs.values()), [o.mask_logits for o in outputs])

    names = {"loss_cls": "loss_cls_ce", "loss_mask": "loss_mask_ce", "loss_dice": "loss_mask_dice"}
    prefix = f"d{head.deep_supervision_idxs[0]}."
    pairs = {**names, **{f"d0.{k}": prefix + v for k, v in names.items()}}
    assert set(theirs) == set(pairs.values())
    for ours_name, their_name in pairs.items():
        mine, other = ours[ours_name].item(), theirs[their_name].item()
        rel = abs(mine - other) / abs(other)
        print(f"{ours_name}: ovdense {mine:.8f} mmseg {other:.8f} rel {rel:.2e}")
        assert rel <= 1e-5, ours_name
    for mine, other in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-9)


def test_criterion_is_an_nn_module_without_state():
    criterion = SanCriterion(5)
    assert isinstance(criterion, nn.Module)
    assert criterion.state_dict() == {}  # nothing to save or load in a head checkpoint
