"""AdaptCLIP's training objective (Gao et al., AAAI 2026, §3.4; the official ``train.py`` and
``adaptcliplib/loss.py`` of gaobb/AdaptCLIP, read, not copied): each query image of the training dataset
is paired with one normal image of its category, the backbone stays frozen, and every adapter is scored
on its own:

* per map (the visual and textual adapters' and each tap's prompt–query map, softmax probabilities
  ``[B, 2, S, S]``): focal loss + dice of the anomalous channel against the mask + dice of the normal
  channel against its complement;
* per image logit pair (visual, textual, each tap's prompt–query): cross-entropy with the image label.

The focal loss is the official ``FocalLoss`` as the official training calls it: on the probabilities
(no non-linearity inside), γ = 2, no class weights, the one-hot target clamped to
``[1e-5, 1 − 1e-5]`` and ``p_t = Σ one_hot · p + 1e-5``, averaged over pixels. The dice is
``BinaryDiceLoss``: ``1 − mean_b (2 Σ p·t + 1) / (Σ p + Σ t + 1)``. ``tests/test_adaptclip.py`` checks the
whole step's gradients against the official ``train.py`` run as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovdense.anomaly.adaptclip import (
    AdaptClipHead,
    encode_image,
    learned_text,
    prompt_query_scores,
    text_scores,
    visual_scores,
)
from ovdense.backbone.clip import ClipBackbone

GAMMA = 2.0
SMOOTH = 1e-5


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = GAMMA,
               smooth: float = SMOOTH) -> torch.Tensor:
    """The official ``FocalLoss()`` on probabilities ``[B, C, H, W]`` and labels ``[B, H, W]`` in
    ``0 … C-1``."""
    C = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, C)
    one_hot = F.one_hot(target.reshape(-1).long(), C).to(p.dtype).clamp(smooth / (C - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(dim=1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official ``BinaryDiceLoss()``: ``[B, H, W]`` probabilities against ``[B, H, W]`` targets."""
    B = target.shape[0]
    p, t = probs.reshape(B, -1), target.reshape(B, -1).to(probs.dtype)
    dice = (2.0 * (p * t).sum(dim=1) + 1.0) / (p.sum(dim=1) + t.sum(dim=1) + 1.0)
    return 1.0 - dice.sum() / B


def map_loss(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Focal + dice(anomalous, mask) + dice(normal, 1 − mask) of one ``[B, 2, S, S]`` map."""
    return focal_loss(probs, masks) + dice_loss(probs[:, 1], masks) + dice_loss(probs[:, 0], 1 - masks)


def losses(backbone: ClipBackbone, head: AdaptClipHead, static: torch.Tensor, queries: torch.Tensor,
           prompts: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training batch's losses (``train.py``'s loop body): ``queries [B, 3, S, S]`` and their normal
    ``prompts [B, K, 3, S, S]`` (normalised), ``masks [B, S, S]`` in {0, 1}, ``labels [B]`` in {0, 1};
    ``static``: the static text ensemble ``[2, D]`` (``adaptclip.static_text``).

    Returns ``{"loss_local": Σ map losses, "loss_global": Σ cross-entropies}``."""
    S = head.config.image_size
    B, K = prompts.shape[:2]
    with torch.no_grad():
        image, patches = encode_image(backbone, queries, head.taps, head.dual_from)
        _, references = encode_image(backbone, prompts.flatten(0, 1), head.taps, head.dual_from)
    image, patches = image.float(), [p.float() for p in patches]
    references = [r.float().view(B, K, *r.shape[1:]) for r in references]
    labels, masks = labels.long(), masks.float()
    local = global_ = 0.0
    scored = [visual_scores(head, image, patches[-1], static, S),
              text_scores(image, patches[-1], learned_text(backbone, head), S)]
    logits, maps, _ = prompt_query_scores(head, patches, references, S)
    scored += list(zip(logits, maps))
    for logit, probs in scored:
        global_ = global_ + F.cross_entropy(logit, labels)
        local = local + map_loss(probs, masks)
    return {"loss_local": local, "loss_global": global_}
