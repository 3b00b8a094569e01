"""The shared CLIP backbone: one open_clip ViT, its preprocessing, and the two contracts
every head builds on — ``encode_dense`` (patch embeddings in the joint space) and
``encode_text`` (prompt-ensembled class embeddings).

Name resolution (``create_backbone``) — config, preprocessing and weights travel together:

* ``name`` is an open_clip model name (``ViT-B-16``, ``ViT-L-14-336``, ``ViT-B-16-plus-240``…),
  ``hf-hub:org/repo``, ``local-dir:/path``, or a path to an open_clip JSON model config
  (``{"embed_dim": …, "vision_cfg": …, "text_cfg": …}``) for custom architectures.
* ``pretrained`` is an open_clip tag (``openai``, ``laion400m_e31``…), a local checkpoint file,
  or ``None`` for random weights. A tag takes its preprocessing (mean, std) and its activation
  (QuickGELU for OpenAI weights) from the tag's config, also when the file comes from the local
  cache. A tag whose weights are not cached and cannot be downloaded fails at once with a
  message naming the cache folder and the ``pretrained=/path/to/file`` fix.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone import dense
from ovdense.backbone.model_config import (  # noqa: F401 (ASSETS, TOY_NAMES: public here too)
    ASSETS,
    TOY_CLIPSELF_NAME,
    TOY_NAME,
    TOY_NAMES,
    read_defaults,
    toy_clipself_visual,
    toy_files,
)
from ovdense.backbone.prompts import Templates, TextCache, default_cache_dir, fill, resolve_templates
from ovdense.backbone.text import causal_text_tower, encode_prompts  # noqa: F401 (causal_text_tower: public here too)
from ovdense.errors import OvdenseError, checkpoint_error_text
from ovdense.io import read_weights, sha256_file

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights came from: ``kind`` is ``tag``, ``file`` or ``random``."""

    kind: str
    value: str | None = None


class ClipBackbone(nn.Module):
    """A frozen open_clip ViT with dense and text encoders.

    Attributes:
        model: the open_clip ``CLIP`` model (parameters frozen).
        name: the model name it was created from.
        weights: where its weights came from.
        mean, std: the RGB normalisation of its weights (on ``[0, 1]`` pixels).
        patch_size: ``p``; dense outputs have ``H/p × W/p`` cells.
        embed_dim: ``D``, the joint image–text embedding size.
        width: the vision transformer's token width.
        num_layers: the number of vision transformer blocks.
        defaults: the model's own inference defaults (``templates``, ``short_side``,
            ``window``, ``method``) from the ``"ovdense"`` entry of its JSON config
            (``model_config.read_defaults``), used where the caller gives none: by heads, and
            ``method`` by the CLI and the demo (the toy model's are its training wording, its
            native size and its best training-free head); empty for open_clip models.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        name: str,
        weights: WeightsSource,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        cache_dir: str | os.PathLike | None = None,
        defaults: dict | None = None,
    ):
        super().__init__()
        dense.check_supported(model.visual, name)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights = weights
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.defaults = dict(defaults or {})
        visual = model.visual
        self.patch_size = int(visual.patch_size[0])
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        self.embed_dim = int(visual.output_dim)
        self.width = int(visual.transformer.width)
        self.num_layers = len(visual.transformer.resblocks)
        self._fingerprint: str | None = None
        self._identity: str | None = None

    # ----------------------------------------------------------------------------------------
    # Properties and preprocessing

    @property
    def device(self) -> torch.device:
        return self.model.visual.positional_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    @property
    def native_size(self) -> tuple[int, int]:
        """The training resolution ``(H, W)`` in pixels."""
        return (self.native_grid[0] * self.patch_size, self.native_grid[1] * self.patch_size)

    @property
    def logit_scale(self) -> float:
        """The model's learned contrastive temperature ``exp(t)`` (100 for OpenAI CLIP)."""
        return float(self.model.logit_scale.exp())

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images[B, 3, H, W]`` in ``[0, 1]`` → normalised by the weights' mean and std."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB ``uint8 [H, W, 3]`` → normalised ``[1, 3, H, W]`` on the backbone's device/dtype."""
        x = torch.as_tensor(np.array(rgb)).to(self.device)  # a copy: arrays from PIL are read-only
        x = x.permute(2, 0, 1).unsqueeze(0).float() / 255.0  # 1, 3, H, W
        return self.normalize(x).to(self.dtype)

    # ----------------------------------------------------------------------------------------
    # Image side

    def encode_dense(self, images: torch.Tensor, method: str = "maskclip", **options) -> torch.Tensor:
        """Dense patch embeddings in the joint image–text space.

        Args:
            images: normalised ``[B, 3, H, W]``; ``H`` and ``W`` multiples of the patch size.
            method: a training-free last-block variant (``dense.METHODS``).
            options: the method's options (see its function in ``ovdense.backbone.dense``).
        Returns:
            ``[B, D, H/p, W/p]``, L2-normalised along ``D`` (ProxyCLIP: on its VFM's grid).
        """
        patches = dense.encode_patches(self.model.visual, images, method, **options)  # B, D, h, w
        return F.normalize(patches, dim=1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embeddings ``[B, D]`` (class token), L2-normalised; any size ``× p``."""
        tokens = dense.encode_tokens(self.model.visual, images, "vanilla")  # B, 1+hw, D
        return F.normalize(tokens[:, 0], dim=-1)

    def forward_intermediates(self, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Token maps after the given blocks (0-indexed), each ``[B, width, H/p, W/p]``."""
        return dense.intermediate_maps(self.model.visual, images, indices)

    # ----------------------------------------------------------------------------------------
    # Text side

    @property
    def fingerprint(self) -> str:
        """A key that changes whenever the text tower's weights change (for the text cache)."""
        if self._fingerprint is None:
            if self.weights.kind == "tag":
                ident = f"tag:{self.weights.value}"
            elif self.weights.kind == "file":
                path = Path(self.weights.value)
                stat = path.stat()
                ident = f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            else:  # random or in-memory weights: hash the text tower itself
                digest = hashlib.sha256()
                for key, tensor in sorted(self.model.state_dict().items()):
                    if not key.startswith("visual."):
                        digest.update(key.encode())
                        digest.update(tensor.detach().float().cpu().numpy().tobytes())
                ident = f"params:{digest.hexdigest()}"
            self._fingerprint = f"{self.name}|{ident}"
        return self._fingerprint

    @property
    def identity(self) -> str:
        """What a trained head's file records of the backbone it was trained on (SAN and F-ViT
        heads alike): the model name with the weights' tag, or the SHA-256 of the weights file's
        content (so a head survives a fresh clone or a copied file; its path and time do not
        count), or for random or in-memory weights a hash of every tensor. Independent of the
        precision the backbone runs in."""
        if self._identity is None:
            if self.weights.kind == "file":
                self._identity = f"{self.name}|sha256:{sha256_file(self.weights.value)[:32]}"
            elif self.weights.kind == "tag":
                self._identity = self.fingerprint
            else:
                digest = hashlib.sha256()
                for key, tensor in sorted(self.model.state_dict().items()):
                    digest.update(key.encode())
                    digest.update(tensor.detach().float().cpu().numpy().tobytes())
                self._identity = f"{self.name}|params:{digest.hexdigest()[:32]}"
        return self._identity

    @torch.no_grad()
    def encode_text(
        self,
        class_names: Sequence[str],
        templates: Templates = "imagenet80",
        use_cache: bool = True,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Prompt-ensembled text embeddings, one per name.

        Each name is put in every template; the per-template embeddings are L2-normalised,
        averaged and renormalised (CLIP's zero-shot recipe, Radford et al. 2021, §3.1.4).
        Embeddings are cached on disk under ``cache_dir/text`` keyed by the model's
        fingerprint, the templates and the name. The prompts run through the text tower on the
        shortest context that holds them (``encode_prompts``); a progress bar shows beyond
        1,000 prompts.

        Returns:
            ``[C, D]`` float32 on the backbone's device, L2-normalised.
        """
        names = list(class_names)
        if not names:
            raise OvdenseError("the class list is empty: give at least one class name")
        resolved = resolve_templates(templates)
        cache = TextCache(self.cache_dir, self.fingerprint, resolved) if use_cache else None
        found = {n: cache.get(n) for n in names} if cache is not None else {}
        missing = [n for n in dict.fromkeys(names) if found.get(n) is None]
        prompts = [fill(t, n) for n in missing for t in resolved]  # M*T
        if missing:
            encoded = encode_prompts(self.model, self.tokenizer, prompts, batch_size, self.device)
            per_template = encoded.view(len(missing), len(resolved), -1)  # M, T, D
            ensembled = F.normalize(per_template.mean(dim=1), dim=-1)  # M, D
            for name, embedding in zip(missing, ensembled):
                found[name] = embedding.cpu().numpy()
                if cache is not None:
                    cache.put(name, found[name])
        stacked = np.stack([found[n] for n in names])  # C, D
        return torch.from_numpy(stacked).to(self.device)


# --------------------------------------------------------------------------------------------
# Name resolution


def create_backbone(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
    weights_cache_dir: str | None = None,
) -> ClipBackbone:
    """Create the shared backbone from an open_clip ViT.

    Args:
        name: open_clip model name, ``hf-hub:…``, ``local-dir:…``, a JSON model config path, or
            ``"toy"``, the embedded toy CLIP of the synthetic world (no network needed), or
            ``"toy-clipself"``, the same CLIP with its image tower refined by CLIPSelf
            (``docs/clipself.md``: better patch tokens, a weaker class token).
        pretrained: open_clip tag, local checkpoint path, or ``None`` for random weights (for
            the toy models: ``None`` = their embedded weights; a path: a whole toy CLIP's weights).
        device: ``"cpu"``, ``"cuda"``, …
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the latter two for GPUs).
        cache_dir: ovdense's cache folder (text embeddings); default ``default_cache_dir()``.
        weights_cache_dir: where open_clip looks for downloaded weights (its ``cache_dir``).
    Raises:
        OvdenseError: unknown model, not a ViT, weights missing offline, wrong checkpoint.
    """
    import open_clip

    if precision not in ("fp32", "fp16", "bf16"):
        raise OvdenseError(f"precision must be fp32, fp16 or bf16, not {precision!r}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise OvdenseError(f"unknown device {device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OvdenseError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")

    if name in TOY_NAMES:
        config, weights = toy_files()
        model, tokenizer, source, mean, std, defaults = _from_config_file(
            str(config), pretrained or str(weights)
        )
        if name == TOY_CLIPSELF_NAME and pretrained is None:
            source = _load_visual_tower(model, toy_clipself_visual())
    elif name.endswith(".json"):
        model, tokenizer, source, mean, std, defaults = _from_config_file(name, pretrained)
    else:
        model, tokenizer, source, mean, std = _from_open_clip(name, pretrained, weights_cache_dir)
        defaults = {}
    model = model.to(device)
    if precision != "fp32":
        open_clip.model.convert_weights_to_lp(
            model, dtype=torch.float16 if precision == "fp16" else torch.bfloat16
        )
    return ClipBackbone(model, tokenizer, name, source, mean, std, cache_dir, defaults)


def _from_config_file(path: str, pretrained: str | None):
    import json

    import open_clip

    config_path = Path(path)
    if not config_path.is_file():
        raise OvdenseError(f"model config not found: {config_path}")
    try:
        cfg = json.loads(config_path.read_text())
        model = open_clip.CLIP(**{k: v for k, v in cfg.items() if k not in ("preprocess_cfg", "ovdense")})
    except (ValueError, TypeError) as e:
        raise OvdenseError(f"{config_path} is not an open_clip model config: {e}") from e
    source = WeightsSource("random")
    if pretrained is not None:
        _load_checkpoint_file(model, pretrained)
        source = WeightsSource("file", str(pretrained))
    context = cfg.get("text_cfg", {}).get("context_length", 77)
    tokenizer = open_clip.SimpleTokenizer(context_length=context)
    pre = cfg.get("preprocess_cfg", {})
    defaults = read_defaults(cfg, config_path)
    return model, tokenizer, source, pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD), defaults


def _load_checkpoint_file(model: nn.Module, path: str) -> None:
    """Strictly load a weights file (``weights_only`` torch.load or safetensors)."""
    file = Path(path)
    if not file.is_file():
        raise OvdenseError(f"checkpoint not found: {file}")
    try:
        state = read_weights(file)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's wrong checkpoint
        raise OvdenseError(
            f"{file} is not a readable weights file ({checkpoint_error_text(e)}); ovdense reads only "
            "tensors (torch.save(state_dict) or .safetensors)"
        ) from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise OvdenseError(f"{file} holds no state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    _check_fits(file, state, model.state_dict())
    model.load_state_dict(state, strict=True)


def _check_fits(file, state: dict, expected: dict[str, torch.Tensor]) -> None:
    """Refuse ``file``'s ``state`` unless it has exactly ``expected``'s keys, all tensors of
    ``expected``'s shapes (one message each: the keys, a non-tensor, the first wrong shape)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise OvdenseError(_key_mismatch_message(file, missing, unexpected))
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise OvdenseError(f"{file} is not a weights file: {not_tensors[0]} holds a "
                           f"{type(state[not_tensors[0]]).__name__}, not a tensor "
                           f"({len(not_tensors)} entries are not tensors)")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise OvdenseError(
            f"{file} does not fit this model: {k} has shape {tuple(state[k].shape)}, the model "
            f"expects {tuple(expected[k].shape)} ({len(wrong)} tensors differ); check the model config"
        )


def _load_visual_tower(model: nn.Module, path: Path) -> WeightsSource:
    """Put a ``visual.*``-only safetensors file (any float dtype) on ``model``'s image tower, every
    key of the tower present and no other; the result's source is that file (a head trained on
    it records the file's hash under the model's name)."""
    try:
        state = read_weights(path)
    except Exception as e:  # noqa: BLE001 - an unreadable file is a broken install
        raise OvdenseError(f"{path} is not a readable safetensors file ({checkpoint_error_text(e)})") from e
    _check_fits(path, state, {f"visual.{k}": v for k, v in model.visual.state_dict().items()})
    dtype = model.visual.conv1.weight.dtype
    model.visual.load_state_dict({k[len("visual."):]: v.to(dtype) for k, v in state.items()}, strict=True)
    return WeightsSource("file", str(path))


def _key_mismatch_message(file, missing: Sequence[str], unexpected: Sequence[str]) -> str:
    def short(keys):
        keys = list(keys)
        return ", ".join(keys[:5]) + (f" … ({len(keys)} in all)" if len(keys) > 5 else "")

    return (
        f"{file} does not fit this model: missing keys [{short(missing)}], "
        f"unexpected keys [{short(unexpected)}]; check the model name matches the checkpoint"
    )


def _from_open_clip(name: str, pretrained: str | None, weights_cache_dir: str | None):
    import open_clip

    schema = name.split(":", 1)[0] if name.startswith(("hf-hub:", "local-dir:")) else None
    if schema is None and open_clip.get_model_config(name) is None:
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")]
        raise OvdenseError(
            f"unknown model {name!r}; open_clip ViTs include: {', '.join(vits[:12])} … "
            "(or pass a path to a JSON model config)"
        )
    kwargs: dict = {"cache_dir": weights_cache_dir}
    source = WeightsSource("random")
    if schema is not None:
        source = WeightsSource("tag", name)
        if schema == "hf-hub" and not _online():
            raise OvdenseError(
                f"cannot reach the Hugging Face Hub to load {name!r} (offline); download the "
                "repository elsewhere and use 'local-dir:/path/to/it'"
            )
    elif pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if tag_cfg:
            source = WeightsSource("tag", pretrained)
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            kwargs["force_preprocess_cfg"] = {
                k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg
            }
            local = _cached_weights(tag_cfg, weights_cache_dir)
            if local is not None:
                kwargs["pretrained"] = local
            elif _online():
                kwargs["pretrained"] = pretrained
            else:
                raise OvdenseError(_offline_message(name, pretrained, tag_cfg, weights_cache_dir))
        elif os.path.isfile(pretrained):
            source = WeightsSource("file", str(pretrained))
            kwargs["pretrained"] = pretrained
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise OvdenseError(
                f"pretrained {pretrained!r} is neither a file nor a tag of {name}; "
                f"tags: {', '.join(tags) or 'none'}"
            )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, require_pretrained=source.kind != "random", **kwargs
        )
    except OvdenseError:
        raise
    except RuntimeError as e:
        text = str(e)
        if "Missing key" in text or "Unexpected key" in text or "size mismatch" in text:
            raise OvdenseError(
                f"checkpoint {pretrained} does not fit model {name}: {text.splitlines()[0][:300]}"
            ) from e
        raise OvdenseError(f"cannot create {name} with weights {pretrained}: {text[:300]}") from e
    except Exception as e:  # noqa: BLE001 - unreadable files end up here
        raise OvdenseError(f"cannot load weights {pretrained} for {name}: {e}") from e
    tokenizer = open_clip.get_tokenizer(name, cache_dir=weights_cache_dir)
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    return model, tokenizer, source, pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD)


def _online(host: str = "huggingface.co") -> bool:
    """True unless offline mode is set or the host's name cannot be resolved."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _cached_weights(tag_cfg: dict, weights_cache_dir: str | None) -> str | None:
    """The local file of a tag's weights if it is already downloaded, else ``None``."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, filename = os.path.split(hub)
            candidates = [filename] if filename else []
            candidates += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for candidate in candidates:
                found = try_to_load_from_cache(repo, candidate, cache_dir=weights_cache_dir)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = tag_cfg.get("url", "")
    if url:
        folder = weights_cache_dir or os.path.expanduser("~/.cache/clip")
        target = os.path.join(folder, os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


def _offline_message(name: str, tag: str, tag_cfg: dict, weights_cache_dir: str | None) -> str:
    hub = tag_cfg.get("hf_hub", "").rstrip("/") or tag_cfg.get("url", "")
    folder = weights_cache_dir or os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
    return (
        f"the {tag!r} weights of {name} are not in the local cache ({folder}) and cannot be "
        f"downloaded (no network). Download them where there is network ({hub}) and pass the "
        f"file: pretrained='/path/to/open_clip_pytorch_model.bin' (CLI: --pretrained PATH), "
        "or copy the Hugging Face cache folder to this machine"
    )
