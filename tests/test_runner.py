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


@pytest.mark.parametrize("mask_kind", ["none", "shared", "per sequence and head"])
def test_run_block_equals_open_clips_block(mask_kind):
    """``dense.run_block`` (attention through ``F.scaled_dot_product_attention``) against open_clip's
    ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) on the same tokens: outputs within float32
    rounding and the same gradients for the input and every weight, with a LayerScale, without a mask,
    with one ``[N, N]`` mask and with a different mask per sequence and head (``[B·heads, N, N]``, so a
    batch/head mix-up in the reshape would show)."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4, ls_init_value=0.5)
    with torch.no_grad():
        block.ls_1.gamma.uniform_(0.5, 1.5)
        block.ls_2.gamma.uniform_(0.5, 1.5)
    B, N, heads = 3, 11, 4
    x = torch.randn(B, N, 64, requires_grad=True)
    mask = None
    if mask_kind == "shared":
        mask = torch.randn(N, N) * 3
    elif mask_kind == "per sequence and head":
        mask = torch.where(torch.rand(B * heads, N, N) < 0.3, -1e4, 0.0) + torch.randn(B * heads, N, N)
    outs, grads = [], []
    for forward in (lambda: block(x, attn_mask=mask), lambda: dense.run_block(block, x, attn_mask=mask)):
        block.zero_grad()
        x.grad = None
        out = forward()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-6)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # and in inference, where nn.MultiheadAttention takes its fused path
        torch.testing.assert_close(dense.run_block(block.eval(), x, attn_mask=mask),
                                   block.eval()(x, attn_mask=mask), rtol=0, atol=2e-6)


def test_run_block_leaves_other_blocks_to_themselves():
    """A block it does not reproduce (here: keys/values with their own bias, ``add_bias_kv``) runs as
    it is."""
    from open_clip.transformer import ResidualAttentionBlock

    block = ResidualAttentionBlock(32, 2)
    block.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True, add_bias_kv=True)
    x = torch.randn(2, 5, 32)
    assert not dense._plain_block(block)
    torch.testing.assert_close(dense.run_block(block, x), block(x), rtol=0, atol=0)


def test_named_taps_are_the_blocks_own_intermediates(tiny_backbone):
    """``run_blocks`` named captures against open_clip's own block run piece by piece through its
    ``nn.MultiheadAttention`` (``need_weights`` gives the head-averaged probabilities): the input, the
    ``ln_1`` and ``ln_2`` outputs, the attention per head, the output; the tokens that leave a captured
    block equal those of an uncaptured run."""
    from ovdense.backbone.runner import embed, run_blocks

    visual = tiny_backbone.model.visual
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x0 = embed(visual, images)
        plain, _ = run_blocks(visual, x0, 0, 6)
        taps = [(3, kind) for kind in ("input", "ln_1", "attn", "ln_2", "output")] + [3, (5, "ln_2")]
        got, out = run_blocks(visual, x0, 0, 6, taps=taps)
        x, _ = run_blocks(visual, x0, 0, 3)
        block = visual.transformer.resblocks[3]
        y = block.ln_1(x)
        attended, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
        mid = x + attended
        expected = {"input": x, "ln_1": y, "ln_2": block.ln_2(mid), "output": block(x)}
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    for kind, tensor in expected.items():
        torch.testing.assert_close(out[(3, kind)], tensor, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[(3, "attn")].mean(dim=1), weights, rtol=1e-5, atol=1e-6)
    assert out[(3, "attn")].shape == (2, block.attn.num_heads, 36, 36)
    assert torch.equal(out[3], out[(3, "output")]) and out[(5, "ln_2")].shape == x.shape
    with pytest.raises(ValueError, match="tap kind must be one of"):
        run_blocks(visual, x0, 0, 6, taps=[(2, "qkv")])
