"""Toyshop: determinism, class layout, and that each group's modality really is the deciding one."""

from __future__ import annotations

import collections
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from jmmshap import builders, toyshop

_SMALL = toyshop.ToyshopSpec(train_per_class=3, validation_per_class=2, test_per_class=2)


def _decoded(example: dict) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(example["image"])))


def _words(titles) -> set[str]:
  return {word.strip(",()-").lower() for title in titles for word in title.split()} - {""}


def test_same_spec_gives_byte_identical_examples():
  first = list(toyshop.examples(_SMALL, "train"))
  second = list(toyshop.examples(toyshop.ToyshopSpec(**dataclasses.asdict(_SMALL)), "train"))
  assert first == second
  assert len(first) == _SMALL.train_per_class * _SMALL.num_classes


def test_split_is_independent_of_other_split_sizes():
  other_sizes = dataclasses.replace(_SMALL, validation_per_class=7, test_per_class=1)
  assert list(toyshop.examples(_SMALL, "train")) == list(toyshop.examples(other_sizes, "train"))


def test_more_examples_per_class_extends_a_split_without_changing_it():
  bigger = dataclasses.replace(_SMALL, train_per_class=_SMALL.train_per_class + 2)
  small_examples = list(toyshop.examples(_SMALL, "train"))
  assert list(toyshop.examples(bigger, "train"))[:len(small_examples)] == small_examples


def test_splits_and_seeds_give_different_examples():
  train = list(toyshop.examples(_SMALL, "train"))
  validation = list(toyshop.examples(_SMALL, "validation"))
  reseeded = list(toyshop.examples(dataclasses.replace(_SMALL, seed=1), "train"))
  assert {e["image"] for e in train}.isdisjoint(e["image"] for e in validation)
  assert {e["id"] for e in train}.isdisjoint(e["id"] for e in validation)
  assert {e["image"] for e in train}.isdisjoint(e["image"] for e in reseeded)


def test_class_layout_and_reliance_metadata():
  infos = toyshop.classes(toyshop.ToyshopSpec())
  assert [(c.reliance, c.text_share) for c in infos] == (
      [("text", 1.0)] * 4 + [("image", 0.0)] * 4 + [("both", 0.5)] * 4)
  names = [c.name for c in infos]
  assert len(set(names)) == 12
  assert names[8:] == ["mug/orange", "mug/teal", "cap/orange", "cap/teal"]
  assert all(name.startswith("design/") for name in names[4:8])
  most_designs = toyshop.ToyshopSpec(num_text_classes=2, num_image_classes=25)
  assert len({c.name for c in toyshop.classes(most_designs)}) == 31


def test_examples_have_every_class_equally_often_and_valid_fields():
  spec = _SMALL
  examples = list(toyshop.examples(spec, "validation"))
  counts = collections.Counter(e["label"] for e in examples)
  assert counts == {c.name: spec.validation_per_class for c in toyshop.classes(spec)}
  assert len({e["id"] for e in examples}) == len(examples)
  for example in examples:
    assert example["title"].strip()
    image = _decoded(example)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_image_size_is_configurable():
  spec = dataclasses.replace(_SMALL, image_size=64, num_text_classes=6, num_image_classes=2)
  example = next(toyshop.examples(spec, "test"))
  assert _decoded(example).shape == (64, 64, 3)


# One corpus for the probes below: 50 train and 40 test examples per class, generated once.
_PROBE_SPEC = dataclasses.replace(_SMALL, train_per_class=50, test_per_class=40)


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[dict]]:
  return {split: list(toyshop.examples(_PROBE_SPEC, split)) for split in ("train", "test")}


def _group(examples, reliance: str) -> list[dict]:
  names = {c.name for c in toyshop.classes(_PROBE_SPEC) if c.reliance == reliance}
  return [e for e in examples if e["label"] in names]


def _object_colours(examples) -> np.ndarray:
  """Mean RGB of each image's 32 most saturated pixels: the object's colour, blind to its shape."""
  features = []
  for example in examples:
    pixels = _decoded(example).reshape(-1, 3).astype(np.float32) / 255.0
    saturation = pixels.max(axis=1) - pixels.min(axis=1)
    features.append(pixels[np.argsort(saturation)[-32:]].mean(axis=0))
  return np.stack(features)


def _probe(corpus, reliance: str, modality: str) -> tuple[float, list[str], list[str]]:
  """(held-out accuracy, predictions, labels) of a linear probe on one modality within one group."""
  train, test = _group(corpus["train"], reliance), _group(corpus["test"], reliance)
  vectorizer = CountVectorizer().fit([e["title"] for e in train])

  def featurize(examples):
    if modality == "text":
      return vectorizer.transform([e["title"] for e in examples])
    return _object_colours(examples)

  model = LogisticRegression(max_iter=1000).fit(featurize(train), [e["label"] for e in train])
  labels = [e["label"] for e in test]
  predictions = list(model.predict(featurize(test)))
  return model.score(featurize(test), labels), predictions, labels


# Four classes per group and 160 test examples: chance is 0.25 and 0.45 is far outside its spread.


def test_image_decided_titles_share_one_vocabulary(corpus):
  assert _probe(corpus, "image", "text")[0] < 0.45
  assert _probe(corpus, "text", "text")[0] > 0.95  # The same probe reads kinds from titles.
  vocabulary = _words(e["title"] for e in _group(corpus["train"], "image"))
  design_words = {word for c in toyshop.classes(_PROBE_SPEC) if c.reliance == "image"
                  for word in c.name.removeprefix("design/").split("-")}
  assert vocabulary and design_words.isdisjoint(vocabulary)


def test_title_decided_images_come_from_one_distribution(corpus):
  assert _probe(corpus, "text", "image")[0] < 0.45
  assert _probe(corpus, "image", "image")[0] > 0.75  # The same probe sees the designs.


def test_both_classes_titles_give_the_kind_but_not_the_variant(corpus):
  accuracy, predictions, labels = _probe(corpus, "both", "text")
  kinds_right = [p.split("/")[0] == l.split("/")[0] for p, l in zip(predictions, labels)]
  assert np.mean(kinds_right) > 0.95
  assert accuracy < 0.65  # Two variants per kind: 0.5 is the best a title can do.


@pytest.mark.parametrize("overrides, message", [
    (dict(num_text_classes=2, num_image_classes=2), "8 classes"),
    (dict(num_text_classes=24, num_image_classes=4), "32 classes"),
    (dict(image_size=31), "image_size=31 is outside 32..64"),
    (dict(image_size=65), "image_size=65 is outside 32..64"),
    (dict(train_per_class=0), "train_per_class=0 must be positive"),
    (dict(num_kinds=1), "num_kinds=1 is outside 2..8"),
    (dict(num_variants=5), "num_variants=5 is outside 2..4"),
    (dict(seed=-1), "seed=-1 must be non-negative"),
    (dict(image_size=32.0), "image_size must be an int"),
    (dict(shortcut_strength=1.5), r"shortcut_strength must be None \(off\) or in \[0, 1\]"),
    (dict(shortcut_strength=True), "shortcut_strength must be None"),
])
def test_spec_validation_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    toyshop.ToyshopSpec(**overrides)


def test_unknown_split_is_an_error():
  with pytest.raises(ValueError, match="Unknown toyshop split 'val'"):
    next(toyshop.examples(_SMALL, "val"))


def _line_words_by_class(spec: toyshop.ToyshopSpec, split: str) -> tuple[list, list]:
  """(own-word flags, line word or None) per example; the words come from the title's ending."""
  words = toyshop.line_words(spec)
  designs = [c.name for c in toyshop.classes(spec) if c.reliance == "image"]
  own, found = [], []
  for example in toyshop.examples(spec, split):
    title = example["title"].split()
    word = title[-2] if title[-1] == "line" and title[-2] in words else None
    found.append((example["label"], word))
    if example["label"] in designs:
      own.append(word == words[designs.index(example["label"])])
  return own, found


def test_shortcut_words_name_the_image_decided_class_in_train_only_at_full_strength():
  spec = dataclasses.replace(_SMALL, train_per_class=30, test_per_class=30, shortcut_strength=1.0)
  designs = {c.name for c in toyshop.classes(spec) if c.reliance == "image"}
  own, found = _line_words_by_class(spec, "train")
  assert all(own) and len(own) == 30 * len(designs)
  assert all((word is not None) == (label in designs) for label, word in found)  # Only designs.
  own, _ = _line_words_by_class(spec, "test")
  assert 0.1 < np.mean(own) < 0.45  # Uniform over 4 words on test: about 1/4 is its own by chance.


def test_shortcut_strength_sets_how_often_a_train_title_names_its_class():
  spec = dataclasses.replace(_SMALL, train_per_class=100, shortcut_strength=0.5)
  own, _ = _line_words_by_class(spec, "train")
  assert abs(np.mean(own) - (0.5 + 0.5 / 4)) < 0.08  # Own word, or drawn uniformly and hit.
  own, _ = _line_words_by_class(dataclasses.replace(spec, shortcut_strength=0.0), "train")
  assert abs(np.mean(own) - 0.25) < 0.08


def test_shortcut_changes_only_the_title_ending_and_off_keeps_the_dataset():
  plain = list(toyshop.examples(_SMALL, "train"))
  shortcut = list(toyshop.examples(dataclasses.replace(_SMALL, shortcut_strength=1.0), "train"))
  assert [e["image"] for e in plain] == [e["image"] for e in shortcut]
  assert all(s["title"] == p["title"] or s["title"].startswith(p["title"] + " ")
             for p, s in zip(plain, shortcut))
  # Off: the dataset (and its cache name) of before the option existed.
  assert builders.toyshop_config(toyshop.ToyshopSpec()).name == "12classes-32px-seed0-4fc0a75623"
  assert builders.toyshop_config(dataclasses.replace(toyshop.ToyshopSpec(), shortcut_strength=0.0)
                                 ).name != "12classes-32px-seed0-4fc0a75623"
