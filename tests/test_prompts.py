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
    monkeypatch.setattr(tiny_backbone, "cache_dir", tmp_path)
    calls = []
    original = tiny_backbone.model.encode_text

    def counting(tokens, *args, **kwargs):
        calls.append(tokens.shape[0])
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(tiny_backbone.model, "encode_text", counting)
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
