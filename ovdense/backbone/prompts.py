"""Prompts: template sets, class vocabularies with synonyms, and the on-disk text-embedding cache.

* Template sets: ``"imagenet80"`` is CLIP's 80 ImageNet prompt templates (Radford et al. 2021,
  the zero-shot notebook; taken from open_clip's copy so there is one source), ``"single"`` is
  ``"a photo of a {}."``, ``"vild"`` ViLD's 63 hand-crafted detection templates (Gu et al., ICLR
  2022; as CLIPSelf's ``tools/generate_text_embeddings.py`` writes them: ``{article}`` is "a" or
  "an" by the name's first letter, "This is " before each that starts with "a" or "the"), or any
  list of strings with one ``{}``.
* A vocabulary is a list of classes; a class is one name or several synonyms. A string entry
  with commas is split into synonyms (``"person, man, woman"``), the convention of the
  ``cls_*.txt`` files of SCLIP / ClearCLIP / NACLIP. The first synonym names the class.
* The cache stores one L2-normalised embedding per (model fingerprint, templates, name) as a
  ``.npy`` file, so a vocabulary is encoded once, and a second vocabulary that shares names
  with the first encodes only the new ones. Each entry is written atomically (a temporary
  file, then ``os.replace``), so processes encoding the same prompts at once each leave a
  whole entry (the last one wins; they are equal); a damaged entry is re-encoded with a
  warning, and a cache folder that cannot be written only costs the caching (a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovdense.errors import OvdenseError
from ovdense.io import write_bytes

Templates = str | Sequence[str]
ClassSpec = str | Sequence[str]

SINGLE_TEMPLATE = ("a photo of a {}.",)

_VILD = (
    "There is {article} {} in the scene.", "There is the {} in the scene.",
    "a photo of {article} {} in the scene.", "a photo of the {} in the scene.",
    "a photo of one {} in the scene.", "itap of {article} {}.", "itap of my {}.", "itap of the {}.",
    "a photo of {article} {}.", "a photo of my {}.", "a photo of the {}.", "a photo of one {}.",
    "a photo of many {}.", "a good photo of {article} {}.", "a good photo of the {}.",
    "a bad photo of {article} {}.", "a bad photo of the {}.", "a photo of a nice {}.",
    "a photo of the nice {}.", "a photo of a cool {}.", "a photo of the cool {}.", "a photo of a weird {}.",
    "a photo of the weird {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of a clean {}.",
    "a photo of the clean {}.", "a photo of a dirty {}.", "a photo of the dirty {}.",
    "a bright photo of {article} {}.", "a bright photo of the {}.", "a dark photo of {article} {}.",
    "a dark photo of the {}.", "a photo of a hard to see {}.", "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.", "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.", "a cropped photo of the {}.", "a close-up photo of {article} {}.",
    "a close-up photo of the {}.", "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of {article} {}.", "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.", "a pixelated photo of the {}.",
    "a black and white photo of the {}.", "a black and white photo of {article} {}.", "a plastic {}.",
    "the plastic {}.", "a toy {}.", "the toy {}.", "a plushie {}.", "the plushie {}.", "a cartoon {}.",
    "the cartoon {}.", "an embroidered {}.", "the embroidered {}.", "a painting of the {}.",
    "a painting of a {}.",
)
VILD_TEMPLATES = tuple("This is " + t if t.startswith(("a", "the")) else t for t in _VILD)

#: CLIPer's ``template/car_template.txt`` (linsun449/cliper.code; its 15 lines, stripped): most of its
#: configs use it; its ``openai_template.txt`` is ``"imagenet80"``, line for line
CAR_TEMPLATES = (
    "a clean origami {}.", "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene",
    "There is the {} in the scene", "a photo of a {} in the scene", "a photo of a small {}.",
    "a photo of a medium {}.", "a photo of a large {}.", "This is a photo of a small {}.",
    "This is a photo of a medium {}.", "This is a photo of a large {}.", "There is a small {} in the scene.",
    "There is a medium {} in the scene.", "There is a large {} in the scene.",
)


def fill(template: str, name: str) -> str:
    """``template`` with ``name`` in its ``{}`` and, where it has one, ``{article}`` as ViLD's rule
    writes it ("an" before a vowel, else "a")."""
    if "{article}" in template:
        return template.format(name, article="an" if name[:1] in "aeiou" else "a")
    return template.format(name)


def imagenet80_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet templates as format strings (from ``open_clip.zero_shot_metadata``)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def resolve_templates(templates: Templates) -> tuple[str, ...]:
    """Turn a template-set name or a list of templates into a tuple of format strings."""
    if isinstance(templates, str):
        if templates == "imagenet80":
            return imagenet80_templates()
        if templates == "single":
            return SINGLE_TEMPLATE
        if templates == "vild":
            return VILD_TEMPLATES
        if templates == "car":
            return CAR_TEMPLATES
        if "{}" in templates:
            return (templates,)
        raise OvdenseError(
            f"unknown template set {templates!r}: use 'imagenet80', 'single', 'vild', 'car' or a list of "
            "strings with '{}' where the class name goes"
        )
    resolved = tuple(templates)
    if not resolved:
        raise OvdenseError("the template list is empty")
    for template in resolved:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise OvdenseError(f"a template must be a string with exactly one '{{}}': {template!r}")
    return resolved


@dataclass(frozen=True)
class Vocabulary:
    """Classes with synonyms, flattened into prompts.

    Attributes:
        names: ``C`` class names (each class's first synonym).
        prompts: ``Q`` prompt words, every synonym of every class, class by class.
        class_of_prompt: ``Q`` indices into ``names``.
    """

    names: tuple[str, ...]
    prompts: tuple[str, ...]
    class_of_prompt: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)

    def synonyms(self) -> list[tuple[str, ...]]:
        """Each class's words, in class order: ``[("person", "man"), ("dog",), …]``."""
        groups: list[list[str]] = [[] for _ in self.names]
        for word, index in zip(self.prompts, self.class_of_prompt):
            groups[index].append(word)
        return [tuple(g) for g in groups]

    @classmethod
    def parse(cls, classes: Sequence[ClassSpec]) -> Vocabulary:
        """Build a vocabulary from class entries (a string, commas for synonyms, or a list)."""
        if isinstance(classes, str):
            raise OvdenseError(
                "classes must be a list of class names, not one string; "
                "for example ['cat', 'dog'] (use 'person, man, woman' for synonyms)"
            )
        if not isinstance(classes, (list, tuple)):
            try:
                classes = list(classes)
            except TypeError:
                raise OvdenseError(f"classes must be a list of class names, not {type(classes).__name__}"
                                   ) from None
        if len(classes) == 0:
            raise OvdenseError("the class list is empty: give at least one class name")
        names: list[str] = []
        prompts: list[str] = []
        class_of_prompt: list[int] = []
        for index, entry in enumerate(classes):
            if isinstance(entry, str):
                words = entry.split(",")
            elif isinstance(entry, (list, tuple)):
                words = list(entry)
            else:
                raise OvdenseError(f"class {index} is a {type(entry).__name__}, not a name or a list of "
                                   f"synonyms: {entry!r}")
            words = [w.strip() for w in words if isinstance(w, str) and w.strip()]
            if not words:
                raise OvdenseError(f"class {index} has an empty name: {entry!r}")
            names.append(words[0])
            prompts.extend(words)
            class_of_prompt.extend([index] * len(words))
        return cls(tuple(names), tuple(prompts), tuple(class_of_prompt))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a class file: one class per line, synonyms separated by commas."""
        path = Path(path)
        if path.is_dir():
            raise OvdenseError(f"class file {path} is a folder; give a text file, one class per line")
        if not path.is_file():
            raise OvdenseError(f"class file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise OvdenseError(f"class file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8"
                               ) from e
        except OSError as e:
            raise OvdenseError(f"cannot read class file {path}: {e.strerror or e}") from e
        lines = [line.strip() for line in text.splitlines()]
        entries = [line for line in lines if line and not line.startswith("#")]
        if not entries:
            raise OvdenseError(f"class file {path} has no class names")
        return cls.parse(entries)


def default_cache_dir() -> Path:
    """``$OVDENSE_CACHE`` if set, else ``~/.cache/ovdense``: the one folder for ovdense caches."""
    return Path(os.environ.get("OVDENSE_CACHE", Path.home() / ".cache" / "ovdense"))


class TextCache:
    """One ``.npy`` file per (model fingerprint, templates, prompt word) under ``root/text``.

    The fingerprint must change whenever the text tower's weights change (see
    ``ClipBackbone.fingerprint``); the templates are part of the key, so a different prompt
    ensemble never reuses an embedding.
    """

    VERSION = 1

    def __init__(self, root: str | os.PathLike, fingerprint: str, templates: tuple[str, ...]):
        key = json.dumps({"v": self.VERSION, "model": fingerprint, "templates": list(templates)})
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
        self.folder = Path(root) / "text" / digest
        self.dim: int | None = None  # D, once an entry has been read or written

    def _path(self, word: str) -> Path:
        return self.folder / (hashlib.sha256(word.encode("utf-8")).hexdigest()[:32] + ".npy")

    def get(self, word: str) -> np.ndarray | None:
        """The cached ``[D]`` float32 embedding of ``word``, or ``None`` when there is none or
        it is damaged (then with a warning: the caller re-encodes and overwrites it)."""
        path = self._path(word)
        if not path.is_file():
            return None
        try:
            embedding = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            self._warn(f"text cache entry {path} is damaged ({type(e).__name__}); re-encoding {word!r}")
            return None
        unit = (embedding.ndim == 1 and embedding.dtype == np.float32 and np.isfinite(embedding).all()
                and abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-3)
        if not unit or embedding.shape[0] != (self.dim or embedding.shape[0]):
            self._warn(f"text cache entry {path} holds {embedding.dtype} {embedding.shape}, not this model's "
                       f"unit vector; re-encoding {word!r}")
            return None
        self.dim = embedding.shape[0]  # every entry of one folder (one model) has the same size
        return embedding

    def put(self, word: str, embedding: np.ndarray) -> None:
        """Store ``word``'s embedding atomically; a cache that cannot be written is a warning."""
        import io

        buffer = io.BytesIO()
        np.save(buffer, embedding.astype(np.float32), allow_pickle=False)
        self.dim = self.dim or int(embedding.shape[0])
        try:
            write_bytes(self._path(word), buffer.getvalue(), durable=False)  # get() checks entries
        except OSError as e:
            self._warn(f"cannot write the text cache under {self.folder} ({e.strerror or e}); "
                       "embeddings are not cached (set OVDENSE_CACHE to a writable folder)")

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Plain class lists (one name per class: detection, the command line's detect)


def check_vocabulary(classes: Sequence[str]) -> list[str]:
    """A clean class list: non-empty, strings, no duplicates; else one ``OvdenseError``."""
    if isinstance(classes, str):
        classes = [classes]
    names = [c.strip() if isinstance(c, str) else c for c in classes]
    if not names:
        raise OvdenseError("the class list is empty: give at least one class name")
    bad = [c for c in names if not isinstance(c, str) or not c]
    if bad:
        raise OvdenseError(f"class names must be non-empty strings, got {bad[0]!r}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise OvdenseError(f"class {name!r} is listed twice; give each class once")
        seen.add(name)
    return names


def read_classes(classes) -> list[str]:
    """A class list, or a class file (one name per line; a ``background`` line is skipped)."""
    if isinstance(classes, (str, os.PathLike)) and Path(classes).suffix == ".txt":
        path = Path(classes)
        if not path.is_file():
            raise OvdenseError(f"class file not found: {path}")
        classes = [line.strip() for line in path.read_text().splitlines()]
        classes = [c for c in classes if c and c != "background"]
    return check_vocabulary(classes)


def single_names(groups: Sequence[Sequence[str]], what: str = "detection", how: str = "") -> list[str]:
    """The one name of each class, from classes given as synonym groups (``Vocabulary.synonyms()``
    or the demo's tuples), checked by ``check_vocabulary``; a class with synonyms is one
    ``OvdenseError`` (``how``: how synonyms were written, for the message)."""
    joined = [tuple(words) for words in groups if len(words) > 1]
    if joined:
        raise OvdenseError(f"{what} takes one name per class, got synonyms{how} in "
                           f"{' | '.join(joined[0])!r}; give them as separate classes")
    return check_vocabulary([words[0] for words in groups])
