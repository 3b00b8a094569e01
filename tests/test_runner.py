"""The backbone runner against open_clip's own forward and ``dense.intermediate_maps``."""

import pytest
import torch
import torch.nn.functional as F

from ovdense.backbone import dense, runner


def _images(backbone, size=(32, 48), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


def test_all_blocks_equal_open_clip_forward(tiny_backbone):
    visual = tiny_backbone.model.visual
    images = _images(tiny_backbone, size=(32, 32))  # the native size: open_clip's own forward runs
    x = runner.embed(visual, images)
    x, _ = runner.run_blocks(visual, x, 0, len(visual.transformer.resblocks))
    ours = visual.ln_post(x[:, 0]) @ visual.proj  # B, D
    theirs = visual(images)  # open_clip: class token after ln_post · proj
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_split_runs_and_taps_equal_intermediate_maps(tiny_backbone):
    visual = tiny_backbone.model.visual
    images = _images(tiny_backbone)  # 4 x 6 patches: position embeddings interpolated
    h, w = 4, 6
    indices = [0, 3, 7, 11]
    expected = dense.intermediate_maps(visual, images, indices)
    x = runner.embed(visual, images)
    x, taps1 = runner.run_blocks(visual, x, 0, 5, taps=(0, 3))
    x, taps2 = runner.run_blocks(visual, x, 5, 12, taps=(7, 11))
    taps = {**taps1, **taps2}
    for index, want in zip(indices, expected):
        got = taps[index][:, 1:].reshape(2, h, w, -1).permute(0, 3, 1, 2)  # B, W, h, w
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(x, taps[11])


def test_given_pos_embed_is_used(tiny_backbone):
    visual = tiny_backbone.model.visual
    images = _images(tiny_backbone, size=(32, 32))
    pos = torch.randn_like(visual.positional_embedding)
    got = runner.embed(visual, images, pos_embed=pos)
    # independent: open_clip's embedding with its own position embedding swapped for `pos`
    tokens = visual.conv1(images).flatten(2).transpose(1, 2)  # B, hw, W
    cls = visual.class_embedding.view(1, 1, -1).expand(2, -1, -1)
    want = visual.ln_pre(torch.cat([cls, tokens], dim=1) + pos)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, runner.embed(visual, images))


def test_size_rule_resizes_to_exact_grid(tiny_backbone):
    visual = tiny_backbone.model.visual
    pos = visual.positional_embedding.detach()
    resized = runner.resize_pos_embed(pos, (4, 4), (3, 5))
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[1:], want.flatten(2)[0].T)
    torch.testing.assert_close(resized[0], pos[0])
    x = runner.embed(visual, _images(tiny_backbone), resize="size")
    assert x.shape == (2, 1 + 24, visual.transformer.width)


def test_attention_mask_reaches_every_block(tiny_backbone):
    visual = tiny_backbone.model.visual
    x = runner.embed(visual, _images(tiny_backbone, size=(32, 32)))
    B, N, _ = x.shape
    heads = visual.transformer.resblocks[0].attn.num_heads
    # a mask that hides every token but itself: each block becomes token-wise, so token 0's
    # result cannot depend on the others
    mask = torch.full((N, N), -1e4)
    mask.fill_diagonal_(0)
    y, _ = runner.run_blocks(visual, x, 2, 6, attn_mask=mask)
    x2 = x.clone()
    x2[:, 1:] = torch.randn_like(x2[:, 1:])
    y2, _ = runner.run_blocks(visual, x2, 2, 6, attn_mask=mask.expand(B * heads, N, N))
    torch.testing.assert_close(y[:, 0], y2[:, 0], rtol=0, atol=1e-5)
    y3, _ = runner.run_blocks(visual, x2, 2, 6, attn_mask=mask.view(1, 1, N, N).expand(B, heads, N, N))
    torch.testing.assert_close(y2, y3)
    free, _ = runner.run_blocks(visual, x2, 2, 6)
    assert not torch.allclose(free[:, 0], y2[:, 0], atol=1e-3)


def test_bad_ranges_raise(tiny_backbone):
    visual = tiny_backbone.model.visual
    x = runner.embed(visual, _images(tiny_backbone, size=(32, 32)))
    with pytest.raises(ValueError):
        runner.run_blocks(visual, x, 3, 13)
    with pytest.raises(ValueError):
        runner.run_blocks(visual, x, 3, 6, taps=(1,))
    with pytest.raises(ValueError):
        runner.embed(visual, torch.zeros(1, 3, 30, 32))
