"""Vocabularies with synonyms, template sets, the prompt ensemble and the text cache."""

import pytest
import torch
import torch.nn.functional as F

from ovdense.backbone.prompts import Vocabulary, imagenet80_templates, resolve_templates
from ovdense.errors import OvdenseError


def test_vocabulary_flattens_synonyms():
    vocab = Vocabulary.parse(["background", "person, man,woman", ["dog", "puppy"]])
    assert vocab.names == ("background", "person", "dog")
    assert vocab.prompts == ("background", "person", "man", "woman", "dog", "puppy")
    assert vocab.class_of_prompt == (0, 1, 1, 1, 2, 2)
    assert vocab.synonyms() == [("background",), ("person", "man", "woman"), ("dog", "puppy")]


def test_vocabulary_from_class_file(tmp_path):
    path = tmp_path / "cls_voc21.txt"
    path.write_text("sky\n\n# comment\nperson, man, woman\n")
    assert Vocabulary.from_file(path).prompts == ("sky", "person", "man", "woman")
    with pytest.raises(OvdenseError, match="not found"):
        Vocabulary.from_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("classes, message", [
    ([], "empty"), ("cat,dog", "not one string"), (["cat", " , "], "class 1 has an empty name"),
])
def test_bad_vocabularies(classes, message):
    with pytest.raises(OvdenseError, match=message):
        Vocabulary.parse(classes)


def test_template_sets():
    templates = imagenet80_templates()
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert templates[0] == "a bad photo of a {}."
    assert resolve_templates("single") == ("a photo of a {}.",)
    with pytest.raises(OvdenseError, match="unknown template set"):
        resolve_templates("imagenet81")
    with pytest.raises(OvdenseError, match="exactly one"):
        resolve_templates(["no placeholder"])


def test_prompt_ensemble_is_renormalised_mean(tiny_backbone):
    templates = ["a photo of a {}.", "a drawing of the {}!", "{} in the wild"]
    got = tiny_backbone.encode_text(["cat", "red dog"], templates, use_cache=False)
    model, tokenizer = tiny_backbone.model, tiny_backbone.tokenizer
    want = []
    with torch.no_grad():
        for name in ("cat", "red dog"):
            per = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            want.append(F.normalize(per.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    single = F.normalize(model.encode_text(tokenizer([templates[0].format("cat")])), dim=-1)[0]
    assert not torch.allclose(got[0], single)  # the ensemble is not just the first template


def test_text_cache_second_call_encodes_nothing(tiny_backbone, monkeypatch, tmp_path):
    from ovdense.backbone import clip as clip_module

    monkeypatch.setattr(tiny_backbone, "cache_dir", tmp_path)
    calls = []
    original = clip_module.encode_prompts  # the one path from prompts to the text tower

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return original(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(clip_module, "encode_prompts", counting)
    templates = imagenet80_templates()[:5]
    first = tiny_backbone.encode_text(["cat", "dog"], templates)
    assert sum(calls) == 10
    calls.clear()
    second = tiny_backbone.encode_text(["dog", "cat"], templates)
    assert calls == []
    torch.testing.assert_close(second, first.flip(0))
    tiny_backbone.encode_text(["dog", "cow"], templates)
    assert sum(calls) == 5  # only the new word
    calls.clear()
    tiny_backbone.encode_text(["cat"], templates[:4])  # other templates: another key
    assert sum(calls) == 4


def test_empty_class_list(tiny_backbone):
    with pytest.raises(OvdenseError, match="empty"):
        tiny_backbone.encode_text([], "single")


# --------------------------------------------------------------------------------------------
# The cache under damage and concurrent writers


def test_damaged_cache_entries_are_rebuilt_with_a_warning(tiny_backbone, monkeypatch, tmp_path):
    import numpy as np

    from ovdense.backbone.prompts import TextCache, resolve_templates

    monkeypatch.setattr(tiny_backbone, "cache_dir", tmp_path)
    words = ["cat", "dog", "cow", "owl"]
    fresh = tiny_backbone.encode_text(words, "single", use_cache=False)
    tiny_backbone.encode_text(words, "single")
    cache = TextCache(tmp_path, tiny_backbone.fingerprint, resolve_templates("single"))
    damage = {
        "cat": lambda p: p.write_bytes(p.read_bytes()[:40]),  # truncated
        "dog": lambda p: p.write_bytes(b"garbage"),  # not a .npy
        "cow": lambda p: np.save(p, np.ones(3, np.float32)),  # a vector of another size / norm
        "owl": lambda p: np.save(p, np.full(16, np.nan, np.float32)),
    }
    for word, hurt in damage.items():
        hurt(cache._path(word))
    with pytest.warns(RuntimeWarning, match="text cache entry") as caught:
        again = tiny_backbone.encode_text(words, "single")
    assert len(caught) == len(words)
    torch.testing.assert_close(again, fresh)
    for index, word in enumerate(words):  # rebuilt on disk
        np.testing.assert_allclose(np.load(cache._path(word)), fresh[index].numpy(), rtol=1e-6)


def test_an_unwritable_cache_only_warns(tiny_backbone, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(tiny_backbone, "cache_dir", blocker)
    with pytest.warns(RuntimeWarning, match="cannot write the text cache"):
        got = tiny_backbone.encode_text(["cat"], "single")
    torch.testing.assert_close(got, tiny_backbone.encode_text(["cat"], "single", use_cache=False))


WRITER = """
import sys, time, numpy as np
from pathlib import Path
from ovdense import create_backbone
backbone = create_backbone("toy", cache_dir=sys.argv[1])
words = [f"word {i}" for i in range(int(sys.argv[2]))]
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
for _ in range(3):
    embeddings = backbone.encode_text(words, "single").numpy()
np.save(sys.argv[4], embeddings)
"""


def test_concurrent_writers_share_one_cache(tmp_path):
    """Two processes encode the same 400 prompts into one cache at once (three times each, so
    they also read what the other is writing): both finish, agree with an uncached encoding,
    and leave only whole entries and no temporary file."""
    import os
    import subprocess
    import sys

    import numpy as np

    from ovdense import create_backbone

    cache, go, count = tmp_path / "cache", tmp_path / "go", 400
    env = dict(os.environ, OMP_NUM_THREADS="1")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(cache), str(count), str(go),
                                 str(tmp_path / f"out{i}.npy")], env=env, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    go.touch()
    errors = [w.communicate(timeout=300)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert not any("Warning" in e for e in errors), errors  # no entry was ever seen damaged
    backbone = create_backbone("toy", cache_dir=tmp_path / "unused")
    want = backbone.encode_text([f"word {i}" for i in range(count)], "single", use_cache=False).numpy()
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"out{i}.npy"), want, rtol=1e-5, atol=1e-6)
    entries = list((cache / "text").rglob("*"))
    assert not [p for p in entries if p.name.endswith(".tmp")]
    assert len([p for p in entries if p.suffix == ".npy"]) == count
