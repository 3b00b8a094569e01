"""Text encoding on the shortest context (``backbone.text.encode_prompts``) against open_clip's own
``encode_text`` on the full context, for every text tower ovdense supports, on random weights."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone import text as text_module
from ovdense.backbone.text import causal_text_tower, encode_prompts

CONTEXT = 24
VISION = {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8}
TEXT = {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}

# different lengths, so batches hold prompts whose end-of-text tokens sit at different positions
PROMPTS = [
    "a photo of a cat.",
    "sky",
    "a blurry photo of the large red double-decker bus parked by the old stone bridge.",
    "a photo of a person, man or woman, standing on the left.",
    "tree",
    "a rendition of a building.",
    "itap of a car.",
]


def build(custom_text: bool = False, **text_cfg) -> nn.Module:
    torch.manual_seed(0)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(embed_dim=16, vision_cfg=VISION, text_cfg={**TEXT, **text_cfg}).eval()
    return model


def tokenizer():
    return open_clip.SimpleTokenizer(context_length=CONTEXT)


def reference(model: nn.Module, prompts, tokenize=None) -> torch.Tensor:
    """open_clip's own full-context pass, normalised."""
    with torch.no_grad():
        return F.normalize(model.encode_text((tokenize or tokenizer())(prompts)).float(), dim=-1)


def context_lengths(model: nn.Module) -> list[int]:
    """Record the sequence length of every pass through the model's text transformer."""
    seen: list[int] = []
    transformer = model.text.transformer if hasattr(model, "text") else model.transformer
    transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen


CAUSAL = {
    "CLIP": dict(),
    "CLIP eos pooling": dict(pool_type="eos", eos_id=49407),
    "CustomTextCLIP TextTransformer": dict(custom_text=True),
    "CustomTextCLIP, biased linear projection, custom blocks": dict(
        custom_text=True, proj_bias=True, block_type="custom", qk_norm=True),
    "CustomTextCLIP eos pooling": dict(custom_text=True, pool_type="eos", eos_id=49407),
}


@pytest.mark.parametrize("batch_size", [256, 3])
@pytest.mark.parametrize("kind", list(CAUSAL))
def test_causal_towers_match_open_clip_on_a_shorter_context(kind, batch_size):
    model = build(**CAUSAL[kind])
    assert causal_text_tower(model) is not None
    seen = context_lengths(model)
    with torch.no_grad():
        got = encode_prompts(model, tokenizer(), PROMPTS, batch_size=batch_size)
    seen = list(seen)  # before the reference pass
    torch.testing.assert_close(got, reference(model, PROMPTS), atol=1e-5, rtol=0)
    # the longest prompt's end-of-text token decides the context of its batch, and no more
    tokens = tokenizer()(PROMPTS)
    ends = sorted((tokens == 49407).int().argmax(dim=-1).tolist())
    expected = [ends[min(len(ends), start + batch_size) - 1] + 1 for start in range(0, len(ends), batch_size)]
    assert seen == expected and max(expected) < CONTEXT


def test_sorting_keeps_the_order_of_the_prompts():
    """Batches of prompts sorted by length come back in the callers' order (and duplicates)."""
    model = build()
    prompts = PROMPTS[::-1] + PROMPTS[:2]
    with torch.no_grad():
        got = encode_prompts(model, tokenizer(), prompts, batch_size=2)
    torch.testing.assert_close(got, reference(model, prompts), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[-2:], got[[len(PROMPTS) - 1, len(PROMPTS) - 2]], atol=1e-6, rtol=0)


NOT_TRUNCATED = {
    "bidirectional CLIP": dict(no_causal_mask=True),
    "bidirectional TextTransformer": dict(custom_text=True, no_causal_mask=True),
    "padding mask": dict(custom_text=True, no_causal_mask=True, use_pad_mask=True),
    "first-token pooling": dict(pool_type="first"),
    "last-token pooling": dict(custom_text=True, pool_type="last"),
}


@pytest.mark.parametrize("kind", list(NOT_TRUNCATED))
def test_other_towers_fall_back_to_the_full_context(kind):
    """Where truncating could change the pooled token (no causal mask, or pooling that reads the
    last position), the full context runs and the result is open_clip's."""
    cfg = dict(NOT_TRUNCATED[kind])
    pad_mask = cfg.pop("use_pad_mask", False)
    model = build(**cfg)
    if pad_mask:
        model.text.use_pad_mask = True
    assert causal_text_tower(model) is None
    seen = context_lengths(model)
    with torch.no_grad():
        got = encode_prompts(model, tokenizer(), PROMPTS, batch_size=4)
    assert seen == [CONTEXT, CONTEXT]
    torch.testing.assert_close(got, reference(model, PROMPTS), atol=1e-6, rtol=0)


def test_no_pooling_and_coca_class_token_are_not_truncated():
    assert causal_text_tower(build(pool_type="none")) is None
    assert causal_text_tower(build(custom_text=True, embed_cls=True)) is None


def test_a_modified_mask_is_not_taken_for_causal():
    model = build()
    model.attn_mask = model.attn_mask.clone()
    model.attn_mask[3, 1] = float("-inf")
    assert causal_text_tower(model) is None


class HFLikeText(nn.Module):
    """A stand-in for open_clip's HFTextEncoder: a text tower with no causal mask of its own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.EmbeddingBag(49408, 16, mode="mean")

    def forward(self, tokens):
        return self.embed(tokens)


class HFLikeModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text = HFLikeText()

    def encode_text(self, tokens):
        return self.text(tokens)


def test_hugging_face_style_towers_run_their_own_encode_text():
    model = HFLikeModel()
    assert causal_text_tower(model) is None
    with torch.no_grad():
        got = encode_prompts(model, tokenizer(), PROMPTS, batch_size=3)
    torch.testing.assert_close(got, reference(model, PROMPTS), atol=1e-6, rtol=0)


def test_backbone_encode_text_is_the_template_ensemble_of_open_clip(tiny_backbone):
    """The backbone's ensembled embeddings equal CLIP's recipe computed with open_clip's own
    full-context ``encode_text``."""
    templates = ["a photo of a {}.", "{}", "a large painting of the {} in the museum at night."]
    names = ["cat", "red double-decker bus"]
    got = tiny_backbone.encode_text(names, templates, use_cache=False)
    per_template = torch.stack([reference(tiny_backbone.model, [t.format(n) for t in templates],
                                          tiny_backbone.tokenizer)
                                for n in names])  # C, T, D
    want = F.normalize(per_template.mean(dim=1), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_progress_bar_only_beyond_the_threshold(monkeypatch, capsys):
    model = build()
    monkeypatch.setattr(text_module, "PROGRESS_ABOVE", len(PROMPTS))
    with torch.no_grad():
        encode_prompts(model, tokenizer(), PROMPTS)
    assert "prompt" not in capsys.readouterr().err
    with torch.no_grad():
        encode_prompts(model, tokenizer(), PROMPTS + PROMPTS[:1])
    assert f"{len(PROMPTS) + 1}/{len(PROMPTS) + 1}" in capsys.readouterr().err


def test_half_precision_tower_truncates_too():
    """bf16 weights (``precision="bf16"``): the tower's cast dtype is used, as open_clip does."""
    model = build()
    open_clip.model.convert_weights_to_lp(model, dtype=torch.bfloat16)
    with torch.no_grad():
        got = encode_prompts(model, tokenizer(), PROMPTS)
    torch.testing.assert_close(got, reference(model, PROMPTS), atol=2e-2, rtol=0)
