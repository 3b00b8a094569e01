"""The definition every kernel must reproduce: plain torch, full-resolution logits.

    logits = einsum(patch_emb, text_emb)                       # B, Q, h, w
    logits = interpolate(logits, (H, W), bilinear, align_corners=False)
    probs  = softmax(logit_scale · logits, over Q)
    class probability = max over the class's prompts; label = argmax over classes;
    label = 0 where the best probability < bg_threshold        (the official repos' rule)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_max(probs: torch.Tensor, class_of_prompt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, Q, H, W]`` prompt probabilities → ``[B, C, H, W]``, the max over each class's prompts."""
    B, Q, H, W = probs.shape
    out = probs.new_full((B, num_classes, H, W), -1.0)
    index = class_of_prompt.view(1, Q, 1, 1).expand_as(probs)
    return out.scatter_reduce(1, index, probs, reduce="amax")


def classify_reference(
    logits: torch.Tensor,
    class_of_prompt: torch.Tensor,
    logit_scale: float,
    bg_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution ``[B, Q, H, W]`` cosine logits → labels and scores ``[B, H, W]``."""
    probs = torch.softmax(logits.float() * logit_scale, dim=1)
    num_classes = int(class_of_prompt.max()) + 1
    scores, labels = class_max(probs, class_of_prompt, num_classes).max(dim=1)
    if bg_threshold is not None:
        labels = torch.where(scores < bg_threshold, torch.zeros_like(labels), labels)
    return labels, scores


def dense_classify_reference(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    class_of_prompt: torch.Tensor,
    out_size: tuple[int, int],
    logit_scale: float,
    bg_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path: ``patch_emb [B, D, h, w]``, ``text_emb [Q, D]`` → labels, scores
    ``[B, H, W]`` through the full ``[B, Q, H, W]`` logits."""
    logits = torch.einsum("bdhw,qd->bqhw", patch_emb.float(), text_emb.float())
    logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return classify_reference(logits, class_of_prompt, logit_scale, bg_threshold)
