"""AdaptCLIP — Gao et al., "AdaptCLIP: Adapting CLIP for Universal Visual Anomaly Detection", AAAI 2026
(arXiv 2505.09926) — three small trained adapters on the shared frozen backbone, zero- and few-shot.

Written from the paper and from reading the official code (gaobb/AdaptCLIP, GPL-2.0; nothing of it
is copied). ``tests/test_adaptclip.py`` runs that code as is on the same random weights and checks
every output here against it. The official files named below are ``adaptcliplib/adaptclip.py``
(``ac.py``), ``test.py`` and ``train.py``.

**Image tower** (AnomalyCLIP's dual path, ``ac.py`` ``Attention`` / ``ResidualAttentionBlock`` /
``VisionTransformer.DAPM_replace``): blocks before ``dual_from`` (1-indexed; 6 of ViT-L/14's 24, the
official ``DPAM_layer = 20``) run unchanged. From there on each block computes, from ``ln_1`` of the
*original* path's tokens, both the q–k attention (the original path, with its residual and FFN) and
a v–v attention (``softmax(v vᵀ / √d) v``, the same output projection), which is added to a second
residual stream that starts from the tokens entering block ``dual_from`` and has no FFN. The patch
tokens of that v–v stream after the ``taps`` blocks (6, 12, 18, 24) go through ``ln_post`` and
``proj``; the image feature is the original path's class token times ``proj`` *without* ``ln_post``
(as the official ``VisionTransformer.forward`` returns it). Position embeddings reach the
``image_size`` grid by bilinear interpolation (``align_corners=False``), computed per call: the
official code writes the resized table into the model; ovdense never changes the shared backbone.

**Adapters** (``ac.py`` ``TextualAdapter``, ``VisualAdapter``, ``PQAdapter``; the paper's §3):

* textual: learned normal and abnormal contexts (``n_ctx = 12`` tokens each) in place of the
  ``X`` tokens of ``"X X … X."`` through the frozen text tower; image logits
  ``cos(f_img, t) / 0.07`` and a patch map ``softmax(cos(f_patch, t) / 0.07)`` on the last tap;
* visual: residual MLPs (``Linear(D, D/4) → BN → ReLU → Linear(D/4, D)``, no biases) on the image
  feature and on the last tap's tokens, scored the same way against the static prompt ensemble
  (the 7 normal and 4 anomalous states of anomalib's WinCLIP lists with ``"object"``, its 21
  templates: ``anomaly.prompts``' ``"anomalib"`` set; the mean of the raw embeddings per state);
* prompt–query (few-shot): per tap, each query patch's nearest reference patch (cosine, over all
  shots), the alignment map ``min(1 − cos)`` and the feature ``q + |q − p_nn|`` (``pq_context``;
  ``|q − p_nn|`` without it) through that tap's ``BatchNorm2d`` and one conv head shared by all
  taps (two 3×3 convs, two ×2 transposed convs, a 1×1 conv to 2 logits) and one MLP on
  ``(mean + mean of the top 10) / 2`` of the feature map.

**Fusion** (``test.py`` with the published scripts' flags, whose ``--fusion_type`` default is
``average_mean``): every map is upsampled bilinearly to ``image_size``. Zero-shot: map =
mean(visual, textual); image = mean(visual score, textual score, max of the smoothed map).
Few-shot: map = harmonic(mean(visual, textual, mean over taps of the prompt–query maps), harmonic
mean over taps of the alignment maps); image = harmonic(mean(visual, textual, mean over taps of the
prompt–query scores), max of the smoothed map). The map is smoothed by a Gaussian of σ = 4 pixels
(``scipy.ndimage.gaussian_filter``: reflected borders, truncated at 4σ; here in torch, checked
against scipy). Scores are softmax probabilities of the anomalous class.

Departures: images are resized to ``image_size`` square (bicubic, as the official transform) and
maps resized back to each image's own size (the official code evaluates at 518 × 518); the
official run of the textual adapter encodes its prompts over the whole 77-token context, here on the
shortest context that holds them (``backbone.text``: equal to rounding).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ovdense.anomaly.prompts import state_prompts
from ovdense.anomaly.winclip import AnomalyResult
from ovdense.backbone import runner
from ovdense.backbone.clip import ASSETS, TOY_NAME, ClipBackbone
from ovdense.backbone.text import causal_text_tower, encode_truncated
from ovdense.errors import OvdenseError
from ovdense.heads.head_files import read_head, write_head
from ovdense.io import ImageInput, load_image

HEAD_FORMAT = "ovdense-adaptclip-head"
CONVERTER = "tools/model_converters/adaptclip2ovdense.py"
TOY_HEAD_FILE = "adaptclip-toy-head.safetensors"
TEMPERATURE = 0.07  # ac.py compute_similarity, VisualAdapter.forward
TOP_K = 10  # ac.py PQAdapter.forward: topk(10)
STATIC_OBJECT = "object"  # ac.py TextualAdapter.prompt: every category is "object"


@dataclass(frozen=True)
class AdaptClipConfig:
    """The adapters' shape and the settings they were trained with.

    Attributes:
        image_size: the square input side (518 for ViT-L/14@336, the official ``--image_size``).
        taps: 1-indexed blocks whose v–v tokens are read (``--features_list``); ``()`` = the four
            quarters of the depth, ``ceil(L·k/4)`` (6, 12, 18, 24 for 24 blocks).
        dual_from: the first block (1-indexed) with the dual path; 0 = the first tap (6 for 24
            blocks, the official ``DPAM_layer = 20``).
        n_ctx: learned context tokens per state (``--n_ctx``, 12).
        reduction: the visual adapter's bottleneck divisor (``--vl_reduction``, 4).
        pq_mid_dim: the prompt–query head's first width (``--pq_mid_dim``, 128).
        pq_context: ``q + |q − p|`` (True, ``--pq_context``) or ``|q − p|``.
        sigma: the map's Gaussian smoothing in pixels at ``image_size`` (``--sigma``, 4).
    """

    image_size: int = 518
    taps: tuple[int, ...] = ()
    dual_from: int = 0
    n_ctx: int = 12
    reduction: int = 4
    pq_mid_dim: int = 128
    pq_context: bool = True
    sigma: float = 4.0

    def blocks(self, num_layers: int) -> tuple[tuple[int, ...], int]:
        """The taps and the first dual block (both 1-indexed) for a tower of ``num_layers`` blocks."""
        taps = tuple(int(t) for t in self.taps) or tuple(math.ceil(num_layers * k / 4) for k in (1, 2, 3, 4))
        dual = int(self.dual_from) or taps[0]
        if list(taps) != sorted(set(taps)) or not 1 <= taps[0] or taps[-1] > num_layers:
            raise OvdenseError(f"AdaptCLIP's taps {list(taps)} must be increasing blocks in 1 … {num_layers}")
        if not 1 <= dual <= taps[0]:
            raise OvdenseError(f"AdaptCLIP's dual path must start (dual_from {dual}) at or before the first "
                               f"tap ({taps[0]}), at block 1 or later")
        return taps, dual

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdaptClipConfig:
        fields = json.loads(text or "{}")
        if "taps" in fields:
            fields["taps"] = tuple(fields["taps"])
        return cls(**fields)


# --------------------------------------------------------------------------------------------
# The trained modules (state-dict names: tools/model_converters/adaptclip2ovdense.py maps the official)


class ResidualMLP(nn.Module):
    """``x + fc(x)``, ``fc = Linear(D, D/r) → BatchNorm1d → ReLU → Linear(D/r, D)``, no biases
    (``ac.py`` ``ResMLP``); tokens ``[B, N, D]`` share one batch-norm over all ``B·N`` rows."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = dim // reduction
        self.fc = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                nn.ReLU(inplace=True),
                                nn.Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x.reshape(-1, x.shape[-1])).view_as(x)


class PromptQueryHead(nn.Module):
    """The prompt–query adapter's trained parts (``ac.py`` ``PQAdapter``): one ``BatchNorm2d`` per tap
    (``norms``), one conv head (``local_head``) and one MLP (``global_head``) shared by every tap (the
    official ``ModuleList`` repeats one module)."""

    def __init__(self, dim: int, mid: int, taps: int):
        super().__init__()
        half = mid // 2
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(taps))
        self.local_head = nn.Sequential(
            nn.Conv2d(dim, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(mid, mid, 2, stride=2),
            nn.Conv2d(mid, half, 3, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(half, half, 2, stride=2),
            nn.Conv2d(half, 2, 1))
        self.global_head = nn.Sequential(
            nn.Linear(dim, mid, bias=False), nn.BatchNorm1d(mid), nn.ReLU(inplace=True),
            nn.Linear(mid, half, bias=False), nn.BatchNorm1d(half), nn.ReLU(inplace=True),
            nn.Linear(half, 2, bias=False))


class AdaptClipHead(nn.Module):
    """The three adapters of AdaptCLIP for one backbone: ``ctx_normal`` / ``ctx_anomalous``
    ``[n_ctx, text width]`` (textual), ``visual_global`` / ``visual_local`` (visual) and
    ``prompt_query``. The backbone stays the caller's and never enters the state dict."""

    def __init__(self, backbone: ClipBackbone, config: AdaptClipConfig | None = None):
        super().__init__()
        self.config = c = config or AdaptClipConfig()
        self.taps, self.dual_from = c.blocks(backbone.num_layers)
        patch = backbone.model.visual.patch_size
        patch = patch[0] if isinstance(patch, tuple) else int(patch)
        if c.image_size < patch or c.image_size % patch:
            raise OvdenseError(f"AdaptCLIP's image_size {c.image_size} is not a multiple of the patch size "
                               f"{patch}")
        if c.n_ctx < 1 or c.reduction < 1 or c.pq_mid_dim < 2 or c.sigma < 0:
            raise OvdenseError(f"AdaptCLIP needs n_ctx, reduction ≥ 1, pq_mid_dim ≥ 2 and sigma ≥ 0; got {c}")
        self.grid = c.image_size // patch
        if self.grid ** 2 < TOP_K:
            raise OvdenseError(f"AdaptCLIP's image_size {c.image_size} gives {self.grid ** 2} patches, fewer "
                               f"than the {TOP_K} its image score averages")
        dim = output_dim(backbone)
        text_width = text_tower(backbone).ln_final.weight.shape[0]
        self.ctx_normal = nn.Parameter(torch.empty(c.n_ctx, text_width).normal_(std=0.02))
        self.ctx_anomalous = nn.Parameter(torch.empty(c.n_ctx, text_width).normal_(std=0.02))
        self.visual_global = ResidualMLP(dim, c.reduction)
        self.visual_local = ResidualMLP(dim, c.reduction)
        self.prompt_query = PromptQueryHead(dim, c.pq_mid_dim, len(self.taps))


def output_dim(backbone: ClipBackbone) -> int:
    proj = getattr(backbone.model.visual, "proj", None)
    if not isinstance(proj, torch.Tensor):
        raise OvdenseError(f"AdaptCLIP needs a ViT with a projection matrix (open_clip's VisionTransformer "
                           f"with proj); {backbone.name} has none")
    return int(proj.shape[1])


def text_tower(backbone: ClipBackbone):
    tower = causal_text_tower(backbone.model)
    if tower is None:
        raise OvdenseError(f"AdaptCLIP's textual adapter needs a causal CLIP text tower; {backbone.name}'s "
                           "is not")
    return tower


def save_head(path: str | Path, head: AdaptClipHead, backbone: ClipBackbone,
              dtype: torch.dtype | None = None) -> Path:
    """Write the adapters as safetensors (atomically) with the format, the backbone's name and identity,
    the config and the ovdense version (``head_files.write_head``)."""
    return write_head(path, head, backbone, HEAD_FORMAT, dtype)


def load_head(path: str | Path, backbone: ClipBackbone) -> AdaptClipHead:
    """Read adapters written by ``save_head`` for this backbone (never unpickles anything).

    Raises:
        OvdenseError: not an AdaptCLIP head, another backbone, or keys and shapes that do not fit.
    """
    return read_head(path, backbone, HEAD_FORMAT, "AdaptCLIP",
                     lambda config: AdaptClipHead(backbone, AdaptClipConfig.from_json(config)),
                     CONVERTER, "ovdense.anomaly.adaptclip.save_head")


def default_head_checkpoint(backbone: ClipBackbone) -> Path:
    """The adapters that ship for ``backbone``: only the toy model has them."""
    path = ASSETS / TOY_HEAD_FILE
    if backbone.name == TOY_NAME and path.is_file():
        return path
    raise OvdenseError(
        f"AdaptCLIP needs trained adapters for {backbone.name}: pass head_checkpoint=PATH (CLI "
        f"--head-checkpoint); convert the published ones (csgaobb/AdaptCLIP on Hugging Face, for OpenAI "
        f"ViT-L-14-336 at 518 px) with {CONVERTER}, or train them with configs/adaptclip/")


# --------------------------------------------------------------------------------------------
# The frozen towers


def encode_image(backbone: ClipBackbone, x: torch.Tensor, taps: Sequence[int], dual_from: int
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The dual-path image tower (module docstring): normalised images ``[B, 3, S, S]`` → the image
    feature ``[B, D]`` (original path, class token @ ``proj``) and, per tap, the v–v tokens after
    ``ln_post`` and ``proj`` ``[B, 1 + P, D]`` (class token first). ``taps``/``dual_from`` 1-indexed."""
    visual = backbone.model.visual
    blocks = visual.transformer.resblocks
    tokens = runner.embed(visual, x, resize="bilinear")  # B, 1+P, W
    original, _ = runner.run_blocks(visual, tokens, 0, dual_from - 1)
    vv = original
    out = []
    for index in range(dual_from - 1, len(blocks)):
        block = blocks[index]
        attn = block.attn
        y = F.linear(block.ln_1(original), attn.in_proj_weight, attn.in_proj_bias)  # B, N, 3W
        B, N, _ = y.shape
        q, k, v = y.view(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # B, heads, N, hd
        both = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
        both = attn.out_proj(both.transpose(1, 2).reshape(2 * B, N, -1))  # 2B, N, W
        vv = vv + block.ls_1(both[B:])  # the v–v stream: no FFN
        original = original + block.ls_1(both[:B])
        original = original + block.ls_2(block.mlp(block.ln_2(original)))
        if index + 1 in taps:
            out.append(visual.ln_post(vv) @ visual.proj)
    return original[:, 0] @ visual.proj, out


def _prompt_tokens(backbone: ClipBackbone, n_ctx: int) -> torch.Tensor:
    """``"X X … X."`` with ``n_ctx`` X's, tokenised ``[1, N]``: start, X's, ".", end (``ac.py``)."""
    tokens = backbone.tokenizer([" ".join(["X"] * n_ctx) + "."])
    return tokens.to(backbone.device)


def learned_text(backbone: ClipBackbone, head: AdaptClipHead) -> torch.Tensor:
    """The textual adapter's normal and anomalous embeddings ``[2, D]`` (unnormalised; gradients reach
    the contexts): each context in place of the X tokens, through the frozen text tower."""
    tower = text_tower(backbone)
    tokens = _prompt_tokens(backbone, head.config.n_ctx)
    n = int(tokens.argmax(dim=-1).max()) + 1
    cast = tower.transformer.get_cast_dtype()
    embedded = tower.token_embedding(tokens[:, :n]).to(cast)  # 1, n, width
    rows = []
    for ctx in (head.ctx_normal, head.ctx_anomalous):
        rows.append(torch.cat([embedded[0, :1], ctx.to(cast), embedded[0, 1 + len(ctx):]]))
    x = torch.stack(rows) + tower.positional_embedding[:n].to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    x = tower.ln_final(x)[:, int(tokens[0].argmax())]  # 2, width
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        return projection(x).float()
    return (x if projection is None else x @ projection).float()


@torch.no_grad()
def static_text(backbone: ClipBackbone) -> torch.Tensor:
    """The static ensemble ``[2, D]``: per state, the mean of the raw embeddings of its prompts with
    ``"object"`` (``ac.py`` ``prepare_static_text_feature``)."""
    tower = text_tower(backbone)
    rows = []
    for prompts in state_prompts(STATIC_OBJECT, "anomalib"):
        tokens = backbone.tokenizer(prompts).to(backbone.device)
        rows.append(encode_truncated(tower, tokens).float().mean(dim=0))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# Scores


def text_scores(image: torch.Tensor, patches: torch.Tensor, text: torch.Tensor, size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image logits ``[B, 2]`` = ``cos(image, text) / T`` and the map ``[B, 2, size, size]`` =
    ``softmax(cos(patch, text) / T)`` over normal/anomalous, bilinear from the grid
    (``ac.py`` ``compute_global_local_score``, ``compute_similarity``, ``get_similarity_map``)."""
    text = F.normalize(text, dim=-1)
    logits = F.normalize(image, dim=-1) @ text.T / TEMPERATURE
    probs = torch.softmax(F.normalize(patches[:, 1:], dim=-1) @ text.T / TEMPERATURE, dim=-1)  # B, P, 2
    B, P, _ = probs.shape
    side = int(round(P ** 0.5))
    grid = probs.transpose(1, 2).reshape(B, 2, side, side)
    return logits, F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)


def visual_scores(head: AdaptClipHead, image: torch.Tensor, patches: torch.Tensor, static: torch.Tensor,
                  size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The visual adapter: ``text_scores`` of the adapted image feature and last-tap tokens against
    the static ensemble (``ac.py`` ``VisualAdapter.forward``)."""
    return text_scores(head.visual_global(image), head.visual_local(patches), static, size)


def prompt_query_scores(head: AdaptClipHead, patches: Sequence[torch.Tensor],
                        references: Sequence[torch.Tensor],
                        size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The prompt–query adapter (``ac.py`` ``PQAdapter.forward``): per tap, query tokens ``[B, 1 + P, D]``
    against reference tokens ``[B, K, 1 + P, D]`` (K shots) → image logits ``[B, 2]``, the head's map
    ``[B, 2, size, size]`` (softmax) and the alignment map ``[B, 1, size, size]`` (``min (1 − cos)``)."""
    pq = head.prompt_query
    logits, maps, aligns = [], [], []
    for index, (query, reference) in enumerate(zip(patches, references)):
        q = F.normalize(query, dim=-1)[:, 1:]  # B, P, D
        r = F.normalize(reference, dim=-1)[:, :, 1:].flatten(1, 2)  # B, K·P, D
        B, P, D = q.shape
        side = int(round(P ** 0.5))
        align, nearest = (1.0 - q @ r.transpose(1, 2)).min(dim=-1)  # B, P
        aligns.append(F.interpolate(align.view(B, 1, side, side), size=(size, size), mode="bilinear",
                                    align_corners=False))
        matched = torch.gather(r, 1, nearest[..., None].expand(-1, -1, D))  # B, P, D
        fused = (q if head.config.pq_context else 0) + (q - matched).abs()
        fused = pq.norms[index](fused.transpose(1, 2).reshape(B, D, side, side))  # B, D, s, s
        local = torch.softmax(pq.local_head(fused), dim=1)
        maps.append(F.interpolate(local, size=(size, size), mode="bilinear", align_corners=False))
        flat = fused.flatten(2)  # B, D, P
        pooled = (flat.mean(dim=-1) + flat.topk(TOP_K, dim=-1).values.mean(dim=-1)) / 2.0
        logits.append(pq.global_head(pooled))
    return logits, maps, aligns


def harmonic(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise harmonic mean ``n / Σ 1/x`` (``ac.py`` ``harmonic_mean``; a 0 gives 0)."""
    return len(tensors) / torch.stack([1.0 / t for t in tensors]).sum(dim=0)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(m, sigma)`` of each ``[H, W]`` map of ``maps [B, H, W]``:
    separable, radius ``int(truncate·σ + 0.5)``, borders reflected about the edge (``d c b a | a b c d``),
    accumulated in float64."""
    if sigma <= 0:
        return maps
    radius = int(truncate * float(sigma) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * offsets ** 2 / float(sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.device)
    x = maps.double()
    for axis in (1, 2):
        n = x.shape[axis]
        index = torch.arange(-radius, n + radius, device=maps.device) % (2 * n)  # period 2n
        index = torch.where(index >= n, 2 * n - 1 - index, index)  # -1 → 0, n → n − 1
        padded = x.index_select(axis, index)
        windows = padded.unfold(axis, 2 * radius + 1, 1)  # …, n, …, 2r+1
        x = windows @ kernel
    return x.to(maps.dtype)


def fuse(visual: tuple[torch.Tensor, torch.Tensor], textual: tuple[torch.Tensor, torch.Tensor],
         prompt_query: tuple[list, list, list] | None, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``test.py`` fusion (module docstring): ``(logits, maps)`` of each adapter →
    image scores ``[B]`` and smoothed maps ``[B, S, S]``."""
    v_score, t_score = (torch.softmax(logits, dim=-1)[:, 1] for logits, _ in (visual, textual))
    v_map, t_map = visual[1][:, 1], textual[1][:, 1]
    if prompt_query is None:
        maps = gaussian_blur((v_map + t_map) / 2.0, sigma)
        return (v_score + t_score + maps.flatten(1).max(dim=1).values) / 3.0, maps
    logits, local, aligns = prompt_query
    p_map = torch.stack([m[:, 1] for m in local]).mean(dim=0)
    p_score = torch.stack([torch.softmax(g, dim=-1)[:, 1] for g in logits]).mean(dim=0)
    align = harmonic(aligns)[:, 0]
    maps = gaussian_blur(harmonic([(v_map + t_map + p_map) / 3.0, align]), sigma)
    return harmonic([(v_score + t_score + p_score) / 3.0, maps.flatten(1).max(dim=1).values]), maps


# --------------------------------------------------------------------------------------------
# Inference


class AdaptClip:
    """AdaptCLIP's anomaly maps (zero-shot; few-shot after ``set_references``), the shape of ``WinClip``.

    Args:
        backbone: the shared backbone the adapters were trained on (the paper: OpenAI ViT-L/14@336).
        object_name: kept in the results only: AdaptCLIP's prompts say ``"object"`` for every category.
        head_checkpoint: a file written by ``save_head`` (``tools/model_converters/adaptclip2ovdense.py``
            converts the published ones); ``None``: the one that ships for the backbone (toy only).
        references: normal images of the object (few-shot, ``set_references``); ``None``: zero-shot.
        head: adapters already in memory (instead of a file).
    """

    def __init__(self, backbone: ClipBackbone, object_name: str = STATIC_OBJECT,
                 head_checkpoint: str | Path | None = None,
                 references: Sequence[ImageInput] | None = None, head: AdaptClipHead | None = None):
        self.backbone = backbone
        self.object_name = (object_name or STATIC_OBJECT).strip() or STATIC_OBJECT
        if head is None:
            head = load_head(head_checkpoint or default_head_checkpoint(backbone), backbone)
        self.head = head.to(backbone.device).eval()
        self.config = head.config
        with torch.no_grad():
            self.static = static_text(backbone)
            self.text = learned_text(backbone, self.head)
        self.memory: list[torch.Tensor] | None = None
        self.reference_size: tuple[int, int] | None = None
        if references is not None:
            self.set_references(references)

    @property
    def shots(self) -> int:
        return 0 if self.memory is None else int(self.memory[0].shape[1])

    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB arrays → ``[B, 3, S, S]`` at ``image_size`` (bicubic, no crop), normalised."""
        S = self.config.image_size
        arrays = [np.asarray(Image.fromarray(rgb).resize((S, S), Image.BICUBIC)) for rgb in images]
        x = torch.from_numpy(np.stack(arrays)).to(self.backbone.device).permute(0, 3, 1, 2).float() / 255
        return self.backbone.normalize(x).to(self.backbone.dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image, patches = encode_image(self.backbone, x, self.head.taps, self.head.dual_from)
        return image.float(), [p.float() for p in patches]

    @torch.no_grad()
    def set_references(self, images: Sequence[ImageInput]) -> None:
        """Few-shot: remember the tapped tokens of ``K`` normal images (all of one size, the size the
        queries must have)."""
        if len(images) == 0:
            raise OvdenseError("no reference images given for AdaptCLIP's few-shot memory (the normal folder "
                               "is empty?)")
        rgbs = [load_image(image) for image in images]
        sizes = sorted({rgb.shape[:2] for rgb in rgbs})
        if len(sizes) > 1:
            raise OvdenseError(f"the reference images have different sizes {sizes}: AdaptCLIP compares "
                               "patches "
                               "position by position, give normal images of one size, the queries' size")
        _, patches = self.encode(self.prepare(rgbs))
        self.memory = [p[None] for p in patches]  # 1, K, 1+P, D
        self.reference_size = tuple(sizes[0])

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared images ``[B, 3, S, S]`` → image scores ``[B]`` and maps ``[B, S, S]``."""
        image, patches = self.encode(x)
        S = self.config.image_size
        visual = visual_scores(self.head, image, patches[-1], self.static, S)
        textual = text_scores(image, patches[-1], self.text, S)
        pq = None
        if self.memory is not None:
            references = [m.expand(len(x), -1, -1, -1) for m in self.memory]
            pq = prompt_query_scores(self.head, patches, references, S)
        return fuse(visual, textual, pq, self.config.sigma)

    def predict(self, images: Sequence[ImageInput] | ImageInput) -> list[AnomalyResult]:
        """Anomaly scores and maps (at each image's own size) for one image or a list."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        rgbs = [load_image(image) for image in images]
        if self.reference_size is not None:
            for rgb in rgbs:
                if rgb.shape[:2] != self.reference_size:
                    raise OvdenseError(
                        f"an image of {rgb.shape[1]}x{rgb.shape[0]} px against references of "
                        f"{self.reference_size[1]}x{self.reference_size[0]} px: AdaptCLIP's few-shot "
                        "comparison needs normal images of the queries' size")
        scores, maps = self.score(self.prepare(rgbs))
        results = []
        for rgb, score, grid_map in zip(rgbs, scores, maps):
            full = F.interpolate(grid_map[None, None].float(), size=rgb.shape[:2], mode="bilinear",
                                 align_corners=False)[0, 0]
            results.append(AnomalyResult(float(score), full.cpu().numpy().astype(np.float32),
                                         self.object_name,
                                         self.shots, "adaptclip", method="AdaptCLIP"))
        return results
