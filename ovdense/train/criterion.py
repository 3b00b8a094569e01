"""The SAN training loss: Hungarian matching and the point-sampled set criterion of Mask2Former.

SAN (Xu et al., "Side Adapter Network for Open-Vocabulary Semantic Segmentation", CVPR 2023)
trains its mask proposals and their class logits with the set criterion of Mask2Former (Cheng et
al., "Masked-attention Mask Transformer for Universal Image Segmentation", CVPR 2022). Official
files followed: MendelXu/SAN ``san/model/matcher.py`` (``HungarianMatcher.memory_efficient_forward``)
and ``san/model/criterion.py`` (``SetCriterion``), both copied from Mask2Former, with detectron2's
``point_rend/point_features.py`` (``point_sample``, ``get_uncertain_point_coords_with_randomness``);
weights from SAN's config (class 2, mask 5, dice 5, no-object 0.1, 12,544 points, oversample 3,
importance 0.75), the same as mmsegmentation 1.2.2's ``configs/_base_/models/san_vit-b16.py``.

Notation for one image: ``Q`` queries with class logits ``z_q`` (``C + 1`` entries, the last is
void) and mask logits ``m_q`` (at 1/16 of the input); ``K`` targets with labels ``c_k`` and binary
masks ``g_k`` (at the input resolution). ``m(p)`` is ``m`` sampled bilinearly at a point ``p`` of
``[0, 1]²`` (``grid_sample``, ``align_corners=False``, zeros outside: detectron2's and mmcv's
``point_sample``), so predictions and targets of different resolutions meet at the same points.

Matching (per image, on ``P = 12544`` points shared by all ``Q`` predictions and ``K`` targets,
uniform in ``[0, 1]²``)::

    cost(q, k) = 2 · (−softmax(z_q)[c_k])
               + 5 · 1/P Σ_p BCE(m_q(p), g_k(p))
               + 5 · (1 − (2 Σ_p σ(m_q(p)) g_k(p) + 1) / (Σ_p σ(m_q(p)) + Σ_p g_k(p) + 1))

minimised by ``scipy.optimize.linear_sum_assignment``; unmatched queries get the void label ``C``.

Losses (``N_m`` = ``num_masks``, the number of target masks, averaged over processes in DDP and
clamped to at least 1; the sums run over the matched pairs of the whole batch)::

    loss_cls  = 2 · Σ_q w(y_q) CE(z_q, y_q) / Σ_q w(y_q),   w = 1 for classes, 0.1 for void
    loss_mask = 5 · 1/N_m Σ_(q,k) 1/P Σ_p BCE(m_q(p), g_k(p))
    loss_dice = 5 · 1/N_m Σ_(q,k) (1 − (2 Σ_p σ(m_q(p)) g_k(p) + 1) / (Σ_p σ(m_q(p)) + Σ_p g_k(p) + 1))

where the ``P`` mask-loss points of each matched pair are Mask2Former's importance sampling: draw
``3P`` uniform points, keep the ``⌊0.75 P⌋`` where the matched prediction is least certain
(uncertainty ``−|m_q(p)|`` of the *sampled* logits), add ``P − ⌊0.75 P⌋`` fresh uniform points.
Every output of the head is supervised the same way, each with its own matching (deep
supervision); the last output's terms are ``loss_cls``, ``loss_mask``, ``loss_dice``, the ``i``-th
earlier one's ``d{i}.loss_cls`` … (mmseg's ``d{idx}.`` prefix).

Randomness: every random point comes from the ``generator`` argument (a CPU ``torch.Generator``;
points are drawn on the CPU and then moved to the logits' device), so a training step's choices
derive from the seed the caller gives it. With one generator the draws happen in mmseg's order
and shapes: outputs in list order; for each, one ``[1, P, 2]`` draw per image that has targets
(matching), then, when any pair is matched, ``[M, 3P, 2]`` and ``[M, P − ⌊0.75 P⌋, 2]`` for the
``M`` matched pairs of the batch (image by image, queries ascending). With one generator per
image, image ``b`` draws its matching points and then the ``[k_b, 3P, 2]``, ``[k_b, P − ⌊0.75 P⌋, 2]``
of its own ``k_b`` matched pairs from its generator, output by output: an image's points then do
not depend on its batch, which lets a run on several processes see the same points as one
process with the same global batch.

Departures from mmsegmentation 1.2.2 (``SideAdapterCLIPHead.loss_by_feat``, ``MatchMasks``,
mmseg's ``HungarianAssigner`` and match costs), where ovdense follows the official code:

- class logits and mask logits enter the losses and the matching cost in float32 (the official
  ``loss_labels`` casts ``pred_logits.float()``, the matcher computes its mask costs with
  autocast off in float32); mmseg keeps the autocast dtype. Identical without AMP;
- loss names follow the official terms (``loss_cls``/``loss_mask``/``loss_dice``) rather than
  mmseg's ``loss_cls_ce``/``loss_mask_ce``/``loss_mask_dice``, and earlier outputs are counted
  ``d0.``, ``d1.`` … in list order (the official code counts them ``_0``, ``_1``; mmseg uses the
  side-network block index, ``d7.``);
- mmseg divides its mean losses by ``avg_factor + 1.19e-7`` (``weight_reduce_loss``); the official
  code and ovdense divide exactly (a relative difference below 1e-10 here).

Where ovdense adds to both: a matching cost that is not finite (non-finite logits) is replaced by
a large finite number so that the matching still runs and the non-finite logits surface as a
non-finite loss for the training loop to report (both references stop inside scipy's
``linear_sum_assignment`` with a ValueError).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ovdense.errors import OvdenseError

_LARGE_COST = 1e8  # stands in for a non-finite matching cost


class SanTarget(NamedTuple):
    """The ground truth of one image: ``labels`` ``[K]`` (long, in ``[0, C)``) and binary ``masks``
    ``[K, H, W]`` (bool or float) covering the same field of view as the mask logits: the padded
    network input, padding 0 in every mask (the official ``SAN.prepare_targets`` zero-pads them;
    mmseg pads ``gt_sem_seg`` with 255, which leaves every mask 0 there). ``K`` may be 0."""

    labels: Tensor
    masks: Tensor


class _Output(Protocol):
    """What the criterion reads from a head output (``ovdense.heads.san.SanOutput``)."""

    mask_logits: Tensor  # B, Q, h, w
    class_logits: Tensor  # B, Q, C + 1


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of ``maps`` ``[N, Ch, H, W]`` at ``points`` ``[N, P, 2]`` (``(x, y)`` in
    ``[0, 1]²``) → ``[N, Ch, P]``; ``align_corners=False``, zeros outside (detectron2/mmcv
    ``point_sample``)."""
    grid = points.unsqueeze(2) * 2.0 - 1.0  # N, P, 1, 2 in [-1, 1]
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform ``[0, 1)`` numbers drawn on the CPU from ``generator`` (the global CPU generator when
    None), then moved to ``device``."""
    return torch.rand(shape, generator=generator).to(device)


def sample_uncertain_points(
    mask_logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask2Former's importance sampling (detectron2 ``get_uncertain_point_coords_with_randomness``
    with ``calculate_uncertainty``): ``mask_logits`` ``[M, 1, h, w]`` → points ``[M, P, 2]``.

    Draws ``int(P · oversample_ratio)`` uniform points per mask, keeps the
    ``int(importance_sample_ratio · P)`` with the highest uncertainty ``−|logit|`` of the sampled
    logits (first, in descending order of uncertainty), then appends the rest as fresh uniform
    points."""
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("oversample_ratio must be >= 1 and importance_sample_ratio in [0, 1]")
    num_masks = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = _rand((num_masks, num_sampled, 2), generator, mask_logits.device)  # M, 3P, 2
    uncertainty = -point_sample(mask_logits, candidates).abs()[:, 0]  # M, 3P
    keep = uncertainty.topk(num_uncertain, dim=1).indices  # M, ⌊0.75 P⌋
    points = torch.gather(candidates, 1, keep.unsqueeze(-1).expand(-1, -1, 2))  # M, ⌊0.75 P⌋, 2
    num_random = num_points - num_uncertain
    if num_random > 0:
        fresh = _rand((num_masks, num_random, 2), generator, mask_logits.device)  # M, P - ⌊0.75 P⌋, 2
        points = torch.cat([points, fresh], dim=1)  # M, P, 2
    return points


def pairwise_bce(point_logits: Tensor, point_targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of every prediction ``[Q, P]`` (logits) against every target
    ``[K, P]`` (0/1) → ``[Q, K]`` (official ``batch_sigmoid_ce_loss``).

    With ``BCE(x, 1) = softplus(−x)`` and ``BCE(x, 0) = softplus(x) = softplus(−x) + x``, the
    official ``Σ_p BCE(x, 1)·t + BCE(x, 0)·(1 − t)`` is ``Σ_p softplus(x) − Σ_p x·t``: one softplus
    over ``[Q, P]`` instead of two."""
    total = F.softplus(point_logits).sum(-1)[:, None] - point_logits @ point_targets.T  # Q, K
    return total / point_logits.shape[1]


def pairwise_dice(point_logits: Tensor, point_targets: Tensor) -> Tensor:
    """Dice loss ``1 − (2|σ(m)·g| + 1) / (|σ(m)| + |g| + 1)`` of every prediction ``[Q, P]`` against
    every target ``[K, P]`` → ``[Q, K]`` (official ``batch_dice_loss``)."""
    probs = point_logits.sigmoid()
    numerator = 2 * probs @ point_targets.T  # Q, K
    denominator = probs.sum(-1)[:, None] + point_targets.sum(-1)[None, :]  # Q, K
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_ce_loss(point_logits: Tensor, point_targets: Tensor, num_masks: float) -> Tensor:
    """``Σ_i mean_p BCE(point_logits[i], point_targets[i]) / num_masks`` for matched pairs
    ``[M, P]`` (official ``sigmoid_ce_loss``)."""
    loss = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none")  # M, P
    return loss.mean(1).sum() / num_masks


def dice_loss(point_logits: Tensor, point_targets: Tensor, num_masks: float) -> Tensor:
    """``Σ_i (1 − (2|σ(m_i) g_i| + 1) / (|σ(m_i)| + |g_i| + 1)) / num_masks`` for matched pairs
    ``[M, P]`` (official ``dice_loss``)."""
    probs = point_logits.sigmoid()
    numerator = 2 * (probs * point_targets).sum(-1)  # M
    denominator = probs.sum(-1) + point_targets.sum(-1)  # M
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of a ``[Q, K]`` cost: ``(query_idx, target_idx)``, long
    tensors of length ``min(Q, K)`` on the CPU, queries ascending (scipy's order)."""
    cost = cost.detach().float().cpu()
    if not torch.isfinite(cost).all():
        cost = torch.nan_to_num(cost, nan=_LARGE_COST, posinf=_LARGE_COST, neginf=-_LARGE_COST)
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


class SanCriterion(nn.Module):
    """The SAN/Mask2Former set criterion with the official weights (see the module docstring).

    Args:
        num_classes: ``C``, the number of real classes; class logits have ``C + 1`` entries, the
            last being void (no object).
        void_weight: cross-entropy weight of the void label (``no_object_weight``, 0.1).
        class_weight, mask_weight, dice_weight: weights of the three terms, in the matching cost
            and in the losses alike (2, 5, 5).
        num_points: ``P``, points per mask in matching and in the mask losses (12,544 = 112²).
        oversample_ratio, importance_sample_ratio: Mask2Former's importance sampling (3, 0.75).
    """

    def __init__(
        self,
        num_classes: int,
        void_weight: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_points < 1:
            raise ValueError("num_classes and num_points must be positive")
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = void_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(
        self,
        outputs: Sequence[_Output],
        targets: Sequence[SanTarget],
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_masks: float | None = None,
    ) -> dict[str, Tensor]:
        """Weighted loss terms of every output (deepest last): ``{"loss_cls", "loss_mask",
        "loss_dice", "d0.loss_cls", …}``.

        ``generator``: one CPU generator for the batch (mmseg's draw order), or one per image, so
        that an image's points do not depend on which other images share its batch or process
        (see the module docstring); None uses torch's global CPU generator.

        ``num_masks`` is the normaliser ``N_m`` (the training glue passes the mean over
        processes, as the official all-reduce); None counts the targets given here. Either way it
        is clamped to at least 1."""
        if len(outputs) == 0:
            raise ValueError("SanCriterion needs at least one output")
        self._check_targets(outputs[-1], targets)
        if isinstance(generator, Sequence) and len(generator) != len(targets):
            raise ValueError(f"{len(generator)} generators for a batch of {len(targets)} images")
        if num_masks is None:
            num_masks = float(sum(len(t.labels) for t in targets))
        num_masks = max(float(num_masks), 1.0)
        per_output = [self._loss_single(o, targets, generator, num_masks) for o in outputs]
        losses = dict(per_output[-1])
        for i, terms in enumerate(per_output[:-1]):
            losses.update({f"d{i}.{name}": value for name, value in terms.items()})
        return losses

    def _check_targets(self, output: _Output, targets: Sequence[SanTarget]) -> None:
        batch, _, num_logits = output.class_logits.shape  # B, Q, C + 1
        if num_logits != self.num_classes + 1:
            raise ValueError(
                f"class logits have {num_logits} entries, expected num_classes + 1 = {self.num_classes + 1}"
            )
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch} images")
        sizes = {tuple(t.masks.shape[-2:]) for t in targets}
        if len(sizes) > 1:
            raise ValueError(f"target masks of one batch must share one size (the padded input), got {sizes}")
        for t in targets:
            if t.masks.dim() != 3 or t.masks.shape[0] != t.labels.shape[0]:
                raise ValueError("each target needs labels [K] and masks [K, H, W]")
            if t.labels.numel() and (int(t.labels.min()) < 0 or int(t.labels.max()) >= self.num_classes):
                raise OvdenseError(
                    f"a training label lies outside [0, {self.num_classes}): the dataset's labels must "
                    "index the training class list (check the class names and reduce_zero_label)"
                )

    def _loss_single(
        self,
        output: _Output,
        targets: Sequence[SanTarget],
        generator: torch.Generator | Sequence[torch.Generator] | None,
        num_masks: float,
    ) -> dict[str, Tensor]:
        class_logits = output.class_logits.float()  # B, Q, C + 1
        mask_logits = output.mask_logits.float()  # B, Q, h, w
        batch, num_queries = class_logits.shape[:2]
        labels = torch.full(
            (batch, num_queries), self.num_classes, dtype=torch.long, device=class_logits.device
        )
        per_image = isinstance(generator, Sequence)
        generators = list(generator) if per_image else [generator] * batch
        matched_logits, matched_masks, matched_images = [], [], []
        for b, target in enumerate(targets):
            if len(target.labels) == 0:
                continue
            query_idx, target_idx = self.match(class_logits[b], mask_logits[b], target, generators[b])
            query_idx = query_idx.to(class_logits.device)
            target_idx = target_idx.to(target.labels.device)
            labels[b, query_idx] = target.labels[target_idx].to(labels.device)
            matched_logits.append(mask_logits[b, query_idx])  # k, h, w
            matched_masks.append(target.masks[target_idx])  # k, H, W
            matched_images.append(b)

        loss_cls = F.cross_entropy(
            class_logits.transpose(1, 2), labels, weight=self.empty_weight.to(class_logits.device)
        )
        if matched_logits:
            src = torch.cat(matched_logits)[:, None]  # M, 1, h, w
            tgt = torch.cat(matched_masks)[:, None].to(src)  # M, 1, H, W
            with torch.no_grad():
                if per_image:  # each image's matched masks draw from that image's generator
                    points = torch.cat(
                        [
                            self._importance_points(m[:, None], generators[b])
                            for m, b in zip(matched_logits, matched_images)
                        ]
                    )  # M, P, 2
                else:
                    points = self._importance_points(src, generator)  # M, P, 2
                point_targets = point_sample(tgt, points)[:, 0]  # M, P
            point_logits = point_sample(src, points)[:, 0]  # M, P
            loss_mask = sigmoid_ce_loss(point_logits, point_targets, num_masks)
            loss_dice = dice_loss(point_logits, point_targets, num_masks)
        else:  # no target in the batch: an empty sum, zero yet attached to the graph (as mmseg)
            loss_mask = loss_dice = mask_logits.flatten()[:0].sum()
        return {
            "loss_cls": self.class_weight * loss_cls,
            "loss_mask": self.mask_weight * loss_mask,
            "loss_dice": self.dice_weight * loss_dice,
        }

    def _importance_points(self, mask_logits: Tensor, generator: torch.Generator | None) -> Tensor:
        return sample_uncertain_points(
            mask_logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator
        )

    @torch.no_grad()
    def match(
        self, class_logits: Tensor, mask_logits: Tensor, target: SanTarget, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Hungarian matching of one image with ``K ≥ 1`` targets: ``class_logits`` ``[Q, C + 1]``,
        ``mask_logits`` ``[Q, h, w]`` against ``target`` on ``P`` shared uniform points (one
        ``[1, P, 2]`` draw from ``generator``) → ``(query_idx, target_idx)`` as
        :func:`hungarian_match`."""
        points = _rand((1, self.num_points, 2), generator, mask_logits.device)  # 1, P, 2
        # the shared points sample every map as one channel: the same values as one map per row
        point_logits = point_sample(mask_logits[None], points)[0]  # Q, P
        point_targets = point_sample(target.masks[None].to(mask_logits), points)[0]  # K, P
        probs = class_logits.softmax(-1)  # Q, C + 1
        cost = (
            self.class_weight * -probs[:, target.labels.to(probs.device)]
            + self.mask_weight * pairwise_bce(point_logits, point_targets)
            + self.dice_weight * pairwise_dice(point_logits, point_targets)
        )  # Q, K
        return hungarian_match(cost)
