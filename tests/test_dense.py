"""Every last-block variant against a plain per-head computation of its equation.

The references below do not call ``ovdense.backbone.dense``: they split open_clip's fused
``in_proj`` into W_q, W_k, W_v by hand, loop over heads, build the position embedding with their
own interpolation call and run the unchanged blocks through open_clip's own modules.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ovdense.backbone import dense
from ovdense.errors import OvdenseError

# --------------------------------------------------------------------------------------------
# Independent reference


def ref_embed(visual, images):
    """conv1 → class token → position embedding (DINO-rule bicubic if off-grid) → ln_pre."""
    x = visual.conv1(images)  # B, W, h, w
    B, width, h, w = x.shape
    g_h, g_w = visual.grid_size
    pos = visual.positional_embedding
    if (h, w) != (g_h, g_w):
        grid = pos[1:].T.reshape(1, width, g_h, g_w)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g_h, (w + 0.1) / g_w), mode="bicubic")
        pos = torch.cat([pos[:1], grid.reshape(width, h * w).T])
    tokens = torch.cat([visual.class_embedding.expand(B, 1, width), x.flatten(2).transpose(1, 2)], 1)
    return visual.ln_pre(tokens + pos)


def per_head(block, x):
    """q, k, v as lists over heads, each ``[B, N, head_dim]``, from W_q, W_k, W_v by hand."""
    attn = block.attn
    y = block.ln_1(x)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q, k, v = y @ w_q.T + b_q, y @ w_k.T + b_k, y @ w_v.T + b_v
    hd = q.shape[-1] // attn.num_heads
    split = [slice(i * hd, (i + 1) * hd) for i in range(attn.num_heads)]
    return [q[..., s] for s in split], [k[..., s] for s in split], [v[..., s] for s in split]


def softmax_sim(a, b):
    return torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(a.shape[-1]), dim=-1)


def attention_out(block, weights_per_head, v):
    heads = [w @ vh for w, vh in zip(weights_per_head, v)]
    return block.attn.out_proj(torch.cat(heads, dim=-1))


def omega(h, w, std):
    n = h * w
    out = torch.zeros(n + 1, n + 1)
    for i in range(n):
        for j in range(n):
            d2 = (i // w - j // w) ** 2 + (i % w - j % w) ** 2
            out[i + 1, j + 1] = math.exp(-d2 / (2 * std**2))
    return out


def ref_last_block(method, block, x, grid, maps):
    q, k, v = per_head(block, x)
    ffn = lambda t: t + block.mlp(block.ln_2(t))  # noqa: E731
    if method == "vanilla":
        return block(x)
    if method == "maskclip":
        return ffn(x + block.attn.out_proj(torch.cat(v, dim=-1)))
    if method == "sclip":
        weights = [softmax_sim(a, a) + softmax_sim(b, b) for a, b in zip(q, k)]
        return ffn(x + attention_out(block, weights, v))
    if method == "clearclip":
        return attention_out(block, [softmax_sim(a, a) for a in q], v)
    if method == "naclip":
        bias = omega(*grid, std=5.0)
        weights = [torch.softmax(b @ b.transpose(-1, -2) / math.sqrt(b.shape[-1]) + bias, -1) for b in k]
        return attention_out(block, weights, v)
    if method == "cliptrase":
        weights = [softmax_sim(a, a) + softmax_sim(b, b) + softmax_sim(c, c) for a, b, c in zip(q, k, v)]
        return ffn(x + attention_out(block, weights, v))
    if method == "itaclip":
        last = [softmax_sim(a, a) + softmax_sim(b, b) for a, b in zip(q, k)]
        weights = [0.5 * last[h] + 0.5 * sum(m[h] for m in maps) / len(maps) for h in range(len(q))]
        return x + attention_out(block, weights, v)
    raise AssertionError(method)


def ref_dense(visual, images, method):
    x = ref_embed(visual, images)
    blocks = list(visual.transformer.resblocks)
    grid = (images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1])
    maps = []
    for index, block in enumerate(blocks[:-1]):
        if method == "itaclip" and index in (6, 7, 9):  # blocks 7, 8, 10 counted from 1
            q, k, _ = per_head(block, x)
            maps.append([softmax_sim(a, a) + softmax_sim(b, b) for a, b in zip(q, k)])
        x = block(x)
    x = ref_last_block(method, blocks[-1], x, grid, maps)
    tokens = visual.ln_post(x) @ visual.proj  # B, N, D
    patches = tokens[:, 1:].reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2)
    return F.normalize(patches, dim=1)


# --------------------------------------------------------------------------------------------


#: the last blocks on CLIP alone (ProxyCLIP's needs a VFM: tests/test_proxyclip.py checks it against its
#: official code)
CLIP_ONLY = [name for name, spec in dense.METHODS.items() if not spec.needs]


@pytest.mark.parametrize("method", CLIP_ONLY)
@pytest.mark.parametrize("size", [(32, 32), (40, 56)], ids=["native", "interpolated"])
def test_method_matches_its_equation(tiny_backbone, method, size):
    torch.manual_seed(2)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = tiny_backbone.encode_dense(images, method)
        want = ref_dense(tiny_backbone.model.visual, images, method)
    assert got.shape == (2, 16, size[0] // 8, size[1] // 8)
    # the reference runs the unchanged blocks through open_clip's nn.MultiheadAttention, ovdense through
    # SDPA (dense.run_block): equal per block within ~5e-7 (tests/test_runner.py), and after the tiny
    # model's twelve blocks with spread weights within ~2e-5 on a unit vector (ViT-B/16: 1.2e-7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2, size[0] // 8, size[1] // 8))


def test_methods_differ(tiny_backbone):
    """The variants must not collapse to one output (the fixture spreads q/k weights)."""
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = {m: tiny_backbone.encode_dense(images, m) for m in CLIP_ONLY}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_vanilla_class_token_is_clip_image_embedding(tiny_backbone):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tokens = dense.encode_tokens(tiny_backbone.model.visual, images, "vanilla")
        pooled = tiny_backbone.model.encode_image(images)
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-4, atol=1e-5)


def test_maskclip_without_residual_is_value_projection(tiny_backbone):
    visual = tiny_backbone.model.visual
    x = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(5))
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        got = dense.maskclip_block(block, x, (4, 4), keep_residual=False)
        _, _, v = per_head(block, x)
        want = block.attn.out_proj(torch.cat(v, dim=-1))
    torch.testing.assert_close(got, want)


def test_position_embedding_identity_at_native_grid(tiny_backbone):
    pos = tiny_backbone.model.visual.positional_embedding
    assert dense.interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos
    out = dense.interpolate_pos_embed(pos, (4, 4), (7, 5))
    assert out.shape == (1 + 35, pos.shape[1])
    torch.testing.assert_close(out[0], pos[0])  # the class token's embedding is kept


def test_naclip_neighbourhood_is_gaussian_of_grid_distance():
    torch.testing.assert_close(dense.gaussian_neighbourhood((3, 4), std=2.0), omega(3, 4, std=2.0))


def test_cliptrase_affinity_is_mean_cosine(tiny_backbone):
    block = tiny_backbone.model.visual.transformer.resblocks[-2]
    x = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = dense.cliptrase_affinity(block, x)[0]
        q, k, v = per_head(block, x)
        cos = [F.cosine_similarity(t[0][:, None], t[0][None], dim=-1) for h in zip(q, k, v) for t in h]
        want = sum(cos) / 3 / len(q)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_image_size_must_be_patch_multiple(tiny_backbone):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_backbone.encode_dense(torch.randn(1, 3, 30, 32))


def test_unknown_method(tiny_backbone):
    with pytest.raises(OvdenseError, match="unknown method 'nope'"):
        tiny_backbone.encode_dense(torch.randn(1, 3, 32, 32), "nope")


def test_intermediates_are_block_outputs(tiny_backbone):
    visual = tiny_backbone.model.visual
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        (third,) = tiny_backbone.forward_intermediates(images, [2])
        x = ref_embed(visual, images)
        for block in list(visual.transformer.resblocks)[:3]:
            x = block(x)
    torch.testing.assert_close(third, x[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2))
