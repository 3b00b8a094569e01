"""WinCLIP and WinCLIP+ — Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023 — on the shared backbone.

Conventions follow the paper and, where the paper leaves details open, anomalib 2.7's
``WinClipModel`` (the most used implementation; its official code is not public):

* **Text** (§3.2): the compositional prompt ensemble (``anomaly.prompts``); each state's text
  embedding is the mean of its prompts' raw (unnormalised) embeddings, then L2-normalised;
  row 0 normal, row 1 anomalous.
* **Windows** (§3.3): all ``k × k`` windows of patches, stride 1, for ``k`` in ``scales``
  (2 and 3). Each window is its own token sequence: the class token and the window's patch
  tokens, each with its position embedding from the full grid, through ``ln_pre``, every block,
  ``ln_post`` and the projection; its class token is the window's embedding. All windows of all
  images go through the transformer in batches of ``window_batch`` sequences.
* **Zero-shot score** of an embedding: ``softmax(cos(f, [t_n, t_a]) / T)[anomalous]``,
  ``T = 0.07``. Per scale, a patch's score is the harmonic mean of the scores of the windows
  covering it; the zero-shot map is the harmonic mean of the per-scale maps and the
  image-level score: ``M_zs = (S + 1) / (1 / s_img + Σ_k 1 / H_k)``. Image score: ``s_img``.
* **WinCLIP+** (§3.4): a memory of the reference images' window embeddings per scale and patch
  tokens (last block, after ``ln_post``); a feature's score is ``min (1 − cos) / 2`` over the
  memory of its kind; ``M_fs`` = mean of the patch map and the harmonic window maps; the map is
  ``(M_zs + M_fs) / 2`` and the image score ``(s_img + max M_fs) / 2``.
* **Images** are resized to the backbone's native size (240 for ViT-B-16-plus-240) without
  cropping, bicubic; maps are resized bilinearly back to the input image's size.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovdense.anomaly.prompts import state_prompts
from ovdense.backbone import dense
from ovdense.backbone.clip import ClipBackbone
from ovdense.backbone.dense import interpolate_pos_embed
from ovdense.errors import OvdenseError
from ovdense.io import (
    ImageInput,
    heatmap_overlay,
    load_image,
    ordered,
    write_bytes,
    write_image,
    write_json,
)

TEMPERATURE = 0.07


@dataclass
class AnomalyResult:
    """``score``: the image's anomaly score in [0, 1]; ``map``: ``[H, W]`` float32 pixel scores
    at the input image's resolution; ``object_name``, ``shots`` (0: zero-shot WinCLIP, else
    WinCLIP+ with that many references), ``prompt_set`` and ``method`` (the head's title):
    the head's settings."""

    score: float
    map: np.ndarray
    object_name: str = ""
    shots: int = 0
    prompt_set: str = ""
    method: str = "WinCLIP"

    OUTPUTS = ("_anomaly.npy", "_heatmap.png", "_anomaly.json")  # what ``save`` writes, the JSON last
    JSON_KEYS = ("image", "size", "object", "score", "map_max", "mode", "references", "model", "prompt_set")

    @property
    def mode(self) -> str:
        if self.method == "WinCLIP":
            return f"WinCLIP+ ({self.shots}-shot)" if self.shots else "WinCLIP (zero-shot)"
        return f"{self.method} ({self.shots}-shot)" if self.shots else f"{self.method} (zero-shot)"

    def to_json(self, **info) -> dict:
        """The JSON ``ovdense anomaly`` writes: size, object, image score, the map's maximum, the
        mode and the prompt set, with ``info`` (``image``, ``references``, ``model``) in place."""
        own = {"size": list(self.map.shape), "object": self.object_name, "score": self.score,
               "map_max": float(self.map.max()), "mode": self.mode, "prompt_set": self.prompt_set}
        return ordered(self.JSON_KEYS, own, info)

    def overlay(self, image: ImageInput) -> np.ndarray:
        """The map in JET colours (fixed scale 0–1) blended on the image: RGB ``uint8 [H, W, 3]``."""
        return heatmap_overlay(load_image(image), self.map)

    def save(self, out_dir: str | os.PathLike, stem: str, image: ImageInput, /, **info) -> list[Path]:
        """Write ``<stem>_anomaly.npy`` (the float32 map), ``<stem>_heatmap.png`` and
        ``<stem>_anomaly.json`` (``to_json(**info)``, last) in ``out_dir``."""
        buffer = io.BytesIO()
        np.save(buffer, self.map, allow_pickle=False)
        out = Path(out_dir)
        return [write_bytes(out / f"{stem}_anomaly.npy", buffer.getvalue()),
                write_image(out / f"{stem}_heatmap.png", self.overlay(image)),
                write_json(out / f"{stem}_anomaly.json", self.to_json(**info))]


def window_indices(grid: tuple[int, int], k: int) -> torch.Tensor:
    """``[n, k²]`` row-major patch indices of every ``k × k`` window (stride 1) of a grid,
    windows in row-major order of their top-left patch."""
    gh, gw = grid
    if k > min(gh, gw):
        raise ValueError(f"a {k}x{k} window does not fit a {gh}x{gw} grid")
    index = torch.arange(gh * gw).view(1, 1, gh, gw).float()
    windows = F.unfold(index, kernel_size=k, stride=1)  # 1, k², n
    return windows[0].T.long()


def harmonic_aggregate(window_scores: torch.Tensor, windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it.

    ``window_scores [B, n]``, ``windows [n, k²]`` → ``[B, num_patches]``."""
    B, n = window_scores.shape
    incidence = torch.zeros(n, num_patches, device=window_scores.device)
    incidence.scatter_(1, windows.to(window_scores.device), 1.0)  # n, P
    inverse = (1.0 / window_scores.clamp(min=1e-12)) @ incidence  # B, P
    return incidence.sum(dim=0) / inverse


class WinClip:
    """Zero-shot (and, after ``set_references``, few-shot) anomaly maps for one object class.

    Args:
        backbone: the shared backbone (the paper: ``ViT-B-16-plus-240``, ``laion400m_e31``).
        object_name: the object's name in the prompts (``"bottle"``, ``"pcb"``).
        prompt_set: ``"paper"`` or ``"anomalib"`` (see ``anomaly.prompts``).
        scales: window sizes in patches.
        temperature: ``T`` of the normal/anomalous softmax.
        window_batch: window sequences per transformer batch (bounds memory).
        references: normal images of the object: WinCLIP+ (``set_references``); ``None``: zero-shot.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        object_name: str,
        prompt_set: str = "paper",
        scales: Sequence[int] = (2, 3),
        temperature: float = TEMPERATURE,
        window_batch: int = 1024,
        references: Sequence[ImageInput] | None = None,
    ):
        if not object_name or not object_name.strip():
            raise OvdenseError("the object name is empty: say what the images show, e.g. --object bottle")
        self.backbone = backbone
        self.object_name = object_name.strip()
        self.prompt_set = prompt_set
        self.scales = tuple(int(k) for k in scales)
        self.temperature = float(temperature)
        self.window_batch = int(window_batch)
        self.grid = backbone.native_grid
        self.windows = [window_indices(self.grid, k) for k in self.scales]
        self.text = self._state_embeddings()  # 2, D
        self.memory: dict | None = None
        if references is not None:
            self.set_references(references)

    @torch.no_grad()
    def _state_embeddings(self) -> torch.Tensor:
        try:
            normal, anomalous = state_prompts(self.object_name, self.prompt_set)
        except ValueError as e:
            raise OvdenseError(str(e)) from e
        rows = []
        for prompts in (normal, anomalous):
            tokens = self.backbone.tokenizer(prompts).to(self.backbone.device)
            rows.append(self.backbone.model.encode_text(tokens).float().mean(dim=0))
        return F.normalize(torch.stack(rows), dim=-1)

    # ----------------------------------------------------------------------------------------
    # Encoding

    def prepare(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images → ``[B, 3, H, W]`` at the native size (bicubic, no crop), normalised."""
        H, W = self.backbone.native_size
        arrays = []
        for image in images:
            rgb = load_image(image)
            arrays.append(np.asarray(Image.fromarray(rgb).resize((W, H), Image.BICUBIC)))
        x = torch.from_numpy(np.stack(arrays)).to(self.backbone.device).permute(0, 3, 1, 2).float() / 255
        return self.backbone.normalize(x).to(self.backbone.dtype)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Class + patch tokens with position embeddings, before ``ln_pre``: ``[B, 1 + P, W]``."""
        visual = self.backbone.model.visual
        t = visual.conv1(x)  # B, W, gh, gw
        B, width, gh, gw = t.shape
        t = t.reshape(B, width, gh * gw).transpose(1, 2)
        cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(B, -1, -1)
        pos = interpolate_pos_embed(visual.positional_embedding, visual.grid_size, (gh, gw))
        return torch.cat([cls, t], dim=1) + pos.to(t.dtype)

    @staticmethod
    def _block(block: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
               class_only: bool = False) -> torch.Tensor:
        """One of open_clip's ``ResidualAttentionBlock``s on ``x [n, L, W]``, written out so that
        ``y``, the input projection ``ln_1(x) @ W_inᵀ + b_in`` ``[n, L, 3W]``, can be given
        (rows gathered from a shared computation) and, with ``class_only``, only the class
        token's output ``[n, 1, W]`` is computed (its query against every key)."""
        attn = block.attn
        if y is None:
            y = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # n, L, 3W
        n, L, _ = y.shape
        q, k, v = y.view(n, L, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # each n, heads, L, hd
        if class_only:
            q, x = q[:, :, :1], x[:, :1]
        out = F.scaled_dot_product_attention(q, k, v)  # n, heads, Lq, hd
        out = out.transpose(1, 2).reshape(n, q.shape[2], -1)  # n, Lq, W
        return dense.residual_ffn(block, x, attn.out_proj(out))

    def _run(self, x: torch.Tensor, y: torch.Tensor | None = None, class_only: bool = False) -> torch.Tensor:
        """Every block, then ``ln_post``, on sequences ``x [n, L, W]`` that went through
        ``ln_pre``; ``y``: the first block's input projection if already known. Returns
        ``[n, L, W]``, or ``[n, 1, W]`` (the class token) with ``class_only``."""
        blocks = self.backbone.model.visual.transformer.resblocks
        x = self._block(blocks[0], x, y, class_only=class_only and len(blocks) == 1)
        for i, block in enumerate(blocks[1:], start=2):
            x = self._block(block, x, class_only=class_only and i == len(blocks))
        return self.backbone.model.visual.ln_post(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, patches: bool = True) -> dict:
        """Image embeddings ``[B, D]``, patch tokens ``[B, P, W]`` (``None`` unless ``patches``)
        and, per scale, window embeddings ``[B, n_k, D]`` (all unnormalised).

        Exactly the per-window computation of the module docstring, with two savings: the
        tokens' ``ln_pre`` and first input projection (both per token) are computed once per
        image and gathered into the windows, and the last block computes only the class
        token wherever nothing else is used."""
        visual = self.backbone.model.visual
        first = visual.transformer.resblocks[0]
        tokens = visual.ln_pre(self._tokens(x))  # B, 1+P, W
        attn = first.attn
        projected = F.linear(first.ln_1(tokens), attn.in_proj_weight, attn.in_proj_bias)  # B, 1+P, 3W
        full = self._run(tokens, projected, class_only=not patches)  # B, 1+P or 1, W
        out = {"image": full[:, 0] @ visual.proj, "patches": full[:, 1:] if patches else None, "windows": []}
        B = x.shape[0]
        for windows in self.windows:
            index = torch.cat([torch.zeros(len(windows), 1, dtype=torch.long), windows + 1], dim=1)
            index = index.to(tokens.device)  # n, 1+k²
            # B·n sequences in chunks of window_batch, gathered chunk by chunk (bounds memory)
            rows = torch.arange(B * len(windows), device=tokens.device)
            embedded = []
            for chunk in rows.split(self.window_batch):
                image, window = chunk // len(windows), index[chunk % len(windows)]  # c; c, 1+k²
                sequences = tokens[image[:, None], window]  # c, 1+k², W
                y = projected[image[:, None], window]  # c, 1+k², 3W
                embedded.append(self._run(sequences, y, class_only=True)[:, 0] @ visual.proj)
            out["windows"].append(torch.cat(embedded).view(B, len(windows), -1))
        return out

    # ----------------------------------------------------------------------------------------
    # Scoring

    def _zero_shot(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` → anomalous probability ``[...]``."""
        logits = F.normalize(features.float(), dim=-1) @ self.text.T / self.temperature
        return torch.softmax(logits, dim=-1)[..., 1]

    @torch.no_grad()
    def set_references(self, images: Sequence[ImageInput]) -> None:
        """WinCLIP+: remember the window and patch features of ``k`` normal reference images."""
        if len(images) == 0:
            raise OvdenseError("no reference images given for the few-shot memory")
        encoded = self.encode(self.prepare(images))
        patches = encoded["patches"].float()  # K, P, W
        self.memory = {
            "patches": F.normalize(patches, dim=-1).reshape(-1, patches.shape[-1]),
            "windows": [F.normalize(w.float(), dim=-1).reshape(-1, w.shape[-1]) for w in encoded["windows"]],
            "shots": len(images),
        }

    @staticmethod
    def _nearest_distance(features: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """``min (1 − cos) / 2`` of each ``[B, n, D]`` feature over ``memory [M, D]``: ``[B, n]``."""
        similarity = F.normalize(features.float(), dim=-1) @ memory.T  # B, n, M
        return (1.0 - similarity.max(dim=-1).values) / 2.0

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared images ``[B, 3, H, W]`` → image scores ``[B]`` and grid maps ``[B, gh, gw]``."""
        encoded = self.encode(x, patches=self.memory is not None)
        B = x.shape[0]
        P = self.grid[0] * self.grid[1]
        s_img = self._zero_shot(encoded["image"])  # B
        inverse = 1.0 / s_img.clamp(min=1e-12)[:, None]  # B, 1
        for windows, feats in zip(self.windows, encoded["windows"]):
            inverse = inverse + 1.0 / harmonic_aggregate(self._zero_shot(feats), windows, P)
        zero_shot = (len(self.scales) + 1) / inverse  # B, P
        if self.memory is None:
            return s_img, zero_shot.view(B, *self.grid)
        maps = [self._nearest_distance(encoded["patches"], self.memory["patches"])]
        for windows, feats, memory in zip(self.windows, encoded["windows"], self.memory["windows"]):
            maps.append(harmonic_aggregate(self._nearest_distance(feats, memory), windows, P))
        few_shot = torch.stack(maps).mean(dim=0)  # B, P
        image = (s_img + few_shot.max(dim=1).values) / 2.0
        return image, ((zero_shot + few_shot) / 2.0).view(B, *self.grid)

    def predict(self, images: Sequence[ImageInput] | ImageInput) -> list[AnomalyResult]:
        """Anomaly scores and maps (at each image's own size) for one image or a list."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        rgbs = [load_image(image) for image in images]
        scores, maps = self.score(self.prepare(rgbs))
        results = []
        for rgb, score, grid_map in zip(rgbs, scores, maps):
            full = F.interpolate(grid_map[None, None].float(), size=rgb.shape[:2], mode="bilinear",
                                 align_corners=False)[0, 0]
            shots = self.memory["shots"] if self.memory is not None else 0
            full = full.cpu().numpy().astype(np.float32)  # H, W
            results.append(AnomalyResult(float(score), full, self.object_name, shots, self.prompt_set))
        return results
