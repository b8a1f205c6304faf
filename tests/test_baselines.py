"""scripts/baselines.py on a tiny generated catalogue: builder class selection, bad rows, end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from jmmshap import builders

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import baselines  # pylint: disable=wrong-import-position  # scripts/baselines.py

# article_type -> (sub_category, photo colour). Shirts and Jeans are frequent; Socks has too few
# items for sub_category's min_count, and Belts is below article_type's top_k.
CLASSES = {"Shirts": ("Topwear", (200, 30, 30)), "Jeans": ("Bottomwear", (30, 30, 200)),
           "Watches": ("Watches", (30, 200, 30)), "Socks": ("Socks", (220, 220, 30)),
           "Belts": ("Belts", (120, 60, 20))}
ROWS_PER_SPLIT = {"Shirts": 12, "Jeans": 12, "Watches": 10, "Socks": 2, "Belts": 1}
FIELDS = ["id", "title", "master_category", "sub_category", "article_type", "base_colour", "usage",
          "split"]


def _write_catalog(root, extra_rows: list[dict] | None = None) -> str:
  """products.csv + images/{id}.jpg: the title names the class and the photo's colour depends on it."""
  rng = np.random.default_rng(0)
  os.makedirs(root / "images")
  rows, next_id = [], 1
  for split in builders.SPLITS:
    for article_type, (sub_category, colour) in CLASSES.items():
      for i in range(ROWS_PER_SPLIT[article_type]):
        noise = rng.integers(-20, 21, size=(80, 60, 3))
        pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{next_id}.jpg", quality=90)
        brand = ("Puma", "Nike", "Levis")[i % 3]
        rows.append({"id": str(next_id), "title": f"{brand} Men {article_type} {i}",
                     "master_category": "Apparel", "sub_category": sub_category,
                     "article_type": article_type, "base_colour": "Red", "usage": "Casual",
                     "split": split})
        next_id += 1
  rows += extra_rows or []
  with open(root / "products.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  return str(root)


@pytest.fixture(name="catalog_dir")
def fixture_catalog_dir(tmp_path) -> str:
  return _write_catalog(tmp_path)


def test_task_classes_match_the_builders_selection(catalog_dir, monkeypatch):
  # Counts over all three splits: Socks has 6 items, so sub_category's min_count=5 keeps it.
  monkeypatch.setitem(baselines.TASKS, "article_type", {"top_k": 3, "min_count": None})
  monkeypatch.setitem(baselines.TASKS, "sub_category", {"top_k": None, "min_count": 5})
  for task in baselines.TASKS:
    config = builders.fashion_products_config(catalog_dir, label_field=task, **baselines.TASKS[task])
    assert baselines.task_classes(catalog_dir, task) == list(config.class_names)
  assert baselines.task_classes(catalog_dir, "article_type") == ["Jeans", "Shirts", "Watches"]
  assert baselines.task_classes(catalog_dir, "sub_category") == [
      "Bottomwear", "Topwear", "Watches", "Socks"]


def test_load_splits_excludes_unselected_classes_and_counts_them(catalog_dir):
  classes = ["Jeans", "Shirts", "Watches"]
  splits, report = baselines.load_splits(catalog_dir, "article_type", classes)
  for name in builders.SPLITS:
    assert len(splits[name]) == 34
    assert splits[name].pixels.shape == (34, 32 * 24 * 3)
    assert splits[name].pixels.dtype == np.uint8
    assert sorted(np.bincount(splits[name].labels).tolist()) == [10, 12, 12]
  assert report["excluded_by_selection"] == {"train": 3, "validation": 3, "test": 3}
  assert report["skipped"] == {"train": 0, "validation": 0, "test": 0, "unassigned": 0}
  first = splits["train"].labels[0], splits["train"].titles[0]
  assert classes[first[0]] in first[1]  # Labels index the class list.


def test_image_pixels_keep_the_photos_colour_at_24x32(catalog_dir):
  pixels = baselines.image_pixels(os.path.join(catalog_dir, "images", "1.jpg"))
  image = pixels.reshape(32, 24, 3).astype(np.float64)
  np.testing.assert_allclose(image.mean(axis=(0, 1)), CLASSES["Shirts"][1], atol=8)


def test_bad_rows_stop_the_run_naming_line_and_file_or_are_skipped_and_counted(tmp_path):
  bad = [{"id": "900", "title": "Puma Men Shirts missing photo", "sub_category": "Topwear",
          "article_type": "Shirts", "split": "test"},
         {"id": "901", "title": "", "sub_category": "Topwear", "article_type": "Shirts",
          "split": "train"},
         {"id": "902", "title": "Puma Men Shirts corrupt photo", "sub_category": "Topwear",
          "article_type": "Shirts", "split": "validation"}]
  catalog_dir = _write_catalog(tmp_path, [dict.fromkeys(FIELDS, "x") | row for row in bad])
  Image.new("RGB", (60, 80)).save(os.path.join(catalog_dir, "images", "901.jpg"))
  with open(os.path.join(catalog_dir, "images", "902.jpg"), "wb") as f:
    f.write(b"\xff\xd8 not a jpeg")
  classes = ["Jeans", "Shirts", "Watches"]
  with pytest.raises(builders.BadRowError, match=r"line 114 \(id '901'\): empty title.*on_bad_row=skip"):
    baselines.load_splits(catalog_dir, "article_type", classes)
  splits, report = baselines.load_splits(catalog_dir, "article_type", classes, on_bad_row="skip")
  assert report["skipped"] == {"train": 1, "validation": 1, "test": 1, "unassigned": 0}
  reasons = [(row["id"], row["reason"]) for row in report["bad_rows"]]
  assert reasons[:2] == [("900", "missing image file"), ("901", "empty title in column 'title'")]
  assert reasons[2][0] == "902" and reasons[2][1].startswith("corrupt image")
  assert report["bad_rows"][0]["file"] == os.path.join(catalog_dir, "images", "900.jpg")
  assert "900" not in splits["test"].ids and len(splits["test"]) == 34
  assert "902" not in splits["validation"].ids and len(splits["validation"]) == 34


def test_text_baseline_separates_classes_and_all_methods_score(catalog_dir):
  classes = ["Jeans", "Shirts", "Watches"]
  splits, _ = baselines.load_splits(catalog_dir, "article_type", classes)
  text = baselines.tfidf_logreg(splits, len(classes), cs=(1, 10))
  assert baselines.evaluate(splits["test"].labels, text.test_probs)["f1_macro"] == 1.0
  assert text.C in (1, 10) and set(text.validation_f1_by_C) == {"1", "10"}
  pixels = baselines.pixel_logreg(splits, len(classes), cs=(0.1,), max_iter=50)
  assert baselines.evaluate(splits["test"].labels, pixels.test_probs)["accuracy"] > 0.9
  mean = baselines.average([text, pixels])
  np.testing.assert_allclose(mean.test_probs.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(mean.test_probs, (text.test_probs + pixels.test_probs) / 2)


def test_run_task_writes_every_method_and_split(catalog_dir, monkeypatch):
  monkeypatch.setitem(baselines.TASKS, "sub_category", {"top_k": None, "min_count": 30})
  result = baselines.run_task(catalog_dir, "sub_category", text_cs=(10,), pixel_cs=(0.1,),
                              pixel_max_iter=30)
  assert result["classes"] == ["Bottomwear", "Topwear", "Watches"]
  assert (result["num_train"], result["num_validation"], result["num_test"]) == (34, 34, 34)
  assert set(result["methods"]) == set(baselines.METHODS)
  for method in baselines.METHODS:
    for split in ("test", "validation"):
      assert set(result["methods"][method][split]) == {
          "accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
          "recall_weighted", "f1_weighted"}
  assert result["methods"]["tfidf_logreg"]["C"] == 10
  assert "C" not in result["methods"]["average"]
  json.dumps(result)  # The script writes it as JSON.
  table = baselines.markdown_table({"sub_category": result})
  assert table.count("\n") == 2 + len(baselines.METHODS) - 1
  assert "| sub_category | 3 | tfidf_logreg | 10 | 1.000 | 1.000 |" in table


def test_missing_scikit_learn_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now raises ImportError.
  spec = importlib.util.spec_from_file_location("baselines_without_sklearn", baselines.__file__)
  with pytest.raises(ImportError, match="pip install scikit-learn"):
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
