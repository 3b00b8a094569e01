"""Text encoding on the shortest context: the class prompts through an open_clip text tower,
cut to the longest prompt of each batch instead of the model's full context (the causal mask
makes the cut exact for towers that pool at the end-of-text token); ``ClipBackbone.encode_text``
calls ``encode_prompts``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PROGRESS_ABOVE = 1000  # prompts; more than this shows a progress bar


@dataclass(frozen=True)
class CausalTextTower:
    """The parts of a causal open_clip text tower that ``encode_prompts`` runs itself: those of
    ``CLIP.encode_text`` (the tower in the model) or of ``TextTransformer.forward``
    (``CustomTextCLIP.text``), open_clip 3.x ``model.py`` / ``transformer.py``."""

    token_embedding: nn.Module
    positional_embedding: torch.Tensor  # N, width
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor  # N, N: 0 on and below the diagonal, −inf above
    pool_type: str  # "argmax" or "eos"
    eos_id: int | None


def causal_text_tower(model: nn.Module) -> CausalTextTower | None:
    """The model's text tower if truncating its context cannot change the pooled embedding,
    else ``None`` (the caller then runs the model's own ``encode_text`` on the full context).

    A tower qualifies when it is causal (its ``attn_mask`` is the upper-triangular −inf mask:
    position ``i`` sees only positions ``≤ i``) and pools one token that the tokens fix:
    ``argmax`` (the end-of-text token, the largest id) or ``eos``. ``first``/``last``/``none``
    pooling, bidirectional towers (``no_causal_mask``, padding masks), CoCa's appended class
    token and Hugging Face text towers do not.
    """
    text = getattr(model, "text", None)
    if text is not None:  # CustomTextCLIP: a TextTransformer, or an HFTextEncoder (no attn_mask)
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            return None
        parts, pool, eos = text, getattr(text, "pool_type", None), getattr(text, "eos_id", None)
    else:  # CLIP: the text tower lives in the model itself
        parts, pool, eos = model, getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
    names = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if pool not in ("argmax", "eos") or any(getattr(parts, n, None) is None for n in names):
        return None
    if pool == "eos" and eos is None:
        return None
    mask = parts.attn_mask
    n = parts.positional_embedding.shape[0]
    causal = torch.full((n, n), float("-inf"), device=mask.device).triu_(1)
    if mask.shape != (n, n) or not torch.equal(mask.float(), causal):
        return None
    return CausalTextTower(parts.token_embedding, parts.positional_embedding, parts.transformer,
                           parts.ln_final, getattr(parts, "text_projection", None), mask, pool, eos)


def pooled_positions(tower: CausalTextTower, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens [B, N]`` → the position each prompt's embedding is pooled from ``[B]`` (int64):
    the first largest id for ``argmax`` (open_clip's ``text_global_pool``), the first
    ``eos_id`` (0 where there is none) for ``eos``."""
    if tower.pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == tower.eos_id).int().argmax(dim=-1)


def encode_truncated(tower: CausalTextTower, tokens: torch.Tensor) -> torch.Tensor:
    """Pooled text embeddings ``[B, D]`` of ``tokens [B, N]``, the tower run on the first
    ``n = max pooled position + 1`` positions only.

    Equal to the full-context pass: with the causal mask, position ``i``'s output depends only
    on tokens ``≤ i``, so cutting the tokens, the positional embedding and the mask after the
    last pooled position leaves every pooled output unchanged (to floating-point rounding).
    """
    ends = pooled_positions(tower, tokens)  # B
    n = int(ends.max()) + 1
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens[:, :n]).to(cast)  # B, n, width
    x = x + tower.positional_embedding[:n].to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])  # B, n, width
    x = tower.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), ends]  # B, width
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        return projection(pooled)
    return pooled if projection is None else pooled @ projection  # B, D


def encode_prompts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """L2-normalised embeddings ``[P, D]`` (float32) of ``prompts``, in their order; equal to
    ``model.encode_text(tokenizer(prompts))`` normalised, to 1e-5.

    CLIP's text tower always runs its whole context (77 positions) although most prompts end
    after a dozen tokens. Where the tower is causal (``causal_text_tower``), the prompts are
    sorted by length, batched, and each batch runs on the shortest context that holds its
    longest prompt; other towers run ``model.encode_text`` on the full context.
    """
    tokens = tokenizer(list(prompts))  # P, N
    tower = causal_text_tower(model)
    if tower is None:
        order = torch.arange(len(tokens))
    else:
        order = torch.argsort(pooled_positions(tower, tokens), stable=True)  # shortest first
    out = torch.empty(0)
    from tqdm import tqdm

    with tqdm(total=len(tokens), desc="text", unit="prompt", disable=len(tokens) <= PROGRESS_ABOVE) as bar:
        for start in range(0, len(tokens), batch_size):
            index = order[start:start + batch_size]
            batch = tokens[index].to(device)  # b, N
            if tower is None:
                embedded = model.encode_text(batch)
            else:
                embedded = encode_truncated(tower, batch)  # b, D
            embedded = F.normalize(embedded.float(), dim=-1)
            if not out.numel():
                out = embedded.new_empty(len(tokens), embedded.shape[-1])  # P, D
            out[index.to(embedded.device)] = embedded
            bar.update(len(index))
    return out
