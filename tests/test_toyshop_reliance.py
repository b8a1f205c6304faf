"""scripts/toyshop_reliance.py: per-class shares against the design, MAD, and the files it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from jmmshap import toyshop

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "toyshop_reliance.py")
_SPEC = importlib.util.spec_from_file_location("toyshop_reliance", _PATH)
reliance = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = reliance  # Dataclasses look their module up while being defined.
_SPEC.loader.exec_module(reliance)

CLASSES = [toyshop.ClassInfo("lamp", "text", 1.0), toyshop.ClassInfo("design/red-circle", "image", 0.0),
           toyshop.ClassInfo("mug/orange", "both", 0.5)]


def test_per_class_shares_average_each_true_class_and_count_undefined_shares():
  t_shap = np.array([0.9, 0.7, 0.2, np.nan, 0.4, 0.6, 0.5])
  labels = np.array([0, 0, 1, 1, 2, 2, 2])
  shares = reliance.per_class_shares(t_shap, labels, CLASSES, resamples=200)
  assert [s.name for s in shares] == ["lamp", "design/red-circle", "mug/orange"]
  np.testing.assert_allclose([s.mean for s in shares], [0.8, 0.2, 0.5])
  np.testing.assert_allclose([s.std for s in shares], [0.1, 0.0, np.std([0.4, 0.6, 0.5])])
  assert [s.count for s in shares] == [2, 1, 3]
  assert [s.num_undefined for s in shares] == [0, 1, 0]
  np.testing.assert_allclose([s.deviation for s in shares], [-0.2, 0.2, 0.0], atol=1e-12)
  for share in shares:
    assert share.ci_low <= share.mean <= share.ci_high
  assert shares[1].ci_low == shares[1].ci_high == 0.2  # One example: no spread to resample.


def test_bootstrap_ci_narrows_with_more_examples_and_covers_the_mean():
  rng = np.random.default_rng(0)
  small = rng.uniform(0.6, 1.0, 10)
  large = rng.uniform(0.6, 1.0, 1000)
  values = np.concatenate([small, large])
  labels = np.array([0] * 10 + [2] * 1000)
  shares = reliance.per_class_shares(values, labels, CLASSES, resamples=500)
  assert shares[0].ci_high - shares[0].ci_low > shares[2].ci_high - shares[2].ci_low
  assert shares[2].ci_low < 0.8 < shares[2].ci_high
  assert np.isnan(shares[1].mean) and shares[1].count == 0


def test_mean_absolute_deviation_weighs_every_class_once():
  # Class 0 has many examples, class 1 one: the MAD is over class means, not examples.
  t_shap = np.array([0.9] * 8 + [0.3, 0.5])
  labels = np.array([0] * 8 + [1, 2])
  shares = reliance.per_class_shares(t_shap, labels, CLASSES, resamples=10)
  assert reliance.mean_absolute_deviation(shares) == pytest.approx((0.1 + 0.3 + 0.0) / 3)
  groups = reliance.group_summary(shares)
  assert list(groups) == ["text", "both", "image"]
  assert groups["image"] == {"designed": 0.0, "mean": pytest.approx(0.3), "mad": pytest.approx(0.3),
                             "num_classes": 1}


def test_perfect_shares_have_zero_deviation():
  t_shap = np.array([1.0, 1.0, 0.0, 0.5])
  labels = np.array([0, 0, 1, 2])
  shares = reliance.per_class_shares(t_shap, labels, CLASSES, resamples=10)
  assert reliance.mean_absolute_deviation(shares) == 0.0


def test_shares_of_other_classes_than_the_design_are_refused():
  with pytest.raises(ValueError, match="not the toyshop spec's classes"):
    reliance.per_class_shares(np.zeros(3), np.arange(3), CLASSES,
                              class_names=["lamp", "mug/orange", "design/red-circle"])
  with pytest.raises(ValueError, match=r"labels \[3\] are not class indices 0..2"):
    reliance.per_class_shares(np.zeros(2), np.array([0, 3]), CLASSES)


def _fake_workdir(root, spec: toyshop.ToyshopSpec, t_shap_of_class, mmbt_data=None) -> str:
  """A workdir with only what the script reads: mmbt/config.json and mmshap/mmshap_test.npz."""
  workdir = os.path.join(root, "w")
  os.makedirs(os.path.join(workdir, "mmbt"))
  os.makedirs(os.path.join(workdir, "mmshap"))
  data = mmbt_data or {"name": "toyshop", "toyshop": {"num_text_classes": 4, "seed": 3}}
  with open(os.path.join(workdir, "mmbt", "config.json"), "w") as f:
    json.dump({"stage": "mmbt", "data": data}, f)
  infos = toyshop.classes(spec)
  labels = np.repeat(np.arange(len(infos)), 4)
  t_shap = np.array([t_shap_of_class(infos[label]) for label in labels])
  np.savez(os.path.join(workdir, "mmshap", "mmshap_test.npz"), t_shap=t_shap, labels=labels,
           targets=labels, class_names=np.asarray([info.name for info in infos]))
  with open(os.path.join(workdir, "mmshap", "summary.json"), "w") as f:
    json.dump({"value": "logit", "target": "predicted", "text_masking": "mask_token"}, f)
  return workdir


def test_variant_report_reads_the_designed_shares_from_the_saved_spec(tmp_path):
  spec = toyshop.ToyshopSpec(num_text_classes=4, seed=3)
  workdir = _fake_workdir(str(tmp_path), spec, lambda info: 0.8 * info.text_share + 0.1)
  report = reliance.variant_report("default", workdir, "test", resamples=10)
  assert [c["designed"] for c in report["per_class"]] == [c.text_share for c in toyshop.classes(spec)]
  # 0.8 s + 0.1 deviates by 0.1 at s = 0 and 1, by 0 at s = 0.5: 8 of 12 classes by 0.1.
  assert report["mad"] == pytest.approx(0.1 * 8 / 12)
  assert report["groups"]["both"]["mean"] == pytest.approx(0.5)
  assert report["settings"]["value"] == "logit"
  assert report["num_examples"] == 48 and report["num_explaining_another_class"] == 0


def test_workdir_of_other_data_or_without_mmshap_is_named_in_the_error(tmp_path):
  spec = toyshop.ToyshopSpec()
  workdir = _fake_workdir(str(tmp_path), spec, lambda info: 0.5,
                          mmbt_data={"name": "fashion_products"})
  with pytest.raises(ValueError, match=r"config.json: data.name is 'fashion_products'"):
    reliance.variant_report("x", workdir, "test")
  with pytest.raises(FileNotFoundError, match=r"mmshap_validation.npz not found"):
    reliance.load_shares(workdir, "validation")


def test_reports_write_json_and_plot_for_several_variants(tmp_path):
  spec = toyshop.ToyshopSpec(num_text_classes=4, seed=3)
  near = _fake_workdir(str(tmp_path / "a"), spec, lambda info: info.text_share)
  far = _fake_workdir(str(tmp_path / "b"), spec, lambda info: 0.5)
  out = str(tmp_path / "out")
  reliance.write_reports([f"near={near}", f"far={far}"], out, bootstrap=10)
  with open(os.path.join(out, "toyshop_reliance.json")) as f:
    written = json.load(f)
  assert [v["name"] for v in written["variants"]] == ["near", "far"]
  assert written["variants"][0]["mad"] == 0.0
  assert written["variants"][1]["mad"] == pytest.approx(0.5 * 8 / 12)
  assert os.path.getsize(os.path.join(out, "toyshop_reliance.png")) > 10_000


def test_corner_masks_drop_a_whole_modality_but_never_special_tokens():
  word_ids = np.array([[-1, 0, 1, 1, -1, -1], [-1, 0, -1, -1, -1, -1]])
  masks = reliance.corner_masks(word_ids, num_image_embeddings=3)
  assert list(masks) == ["full", "text_only", "image_only", "empty"]
  special = word_ids < 0
  for corner, (text_keep, image_keep) in masks.items():
    text, image = reliance.CORNERS[corner]
    np.testing.assert_array_equal(text_keep, special | text)
    assert image_keep.shape == (2, 3) and (image_keep == image).all()


def test_corner_table_names_the_most_probable_class_per_true_class():
  names = ["lamp", "design/red-circle", "mug/orange"]
  labels = np.array([0, 0, 2])
  full = np.array([[0.9, 0.05, 0.05], [0.7, 0.1, 0.2], [0.1, 0.1, 0.8]])
  empty = np.array([[0.2, 0.2, 0.6], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6]])
  table = reliance.corner_table({"full": full, "empty": empty}, labels, names)
  assert [entry["count"] for entry in table] == [2, 0, 1]
  assert table[0]["full"] == {"p_true": pytest.approx(0.8), "top_class": "lamp",
                              "p_top": pytest.approx(0.8)}
  assert table[0]["empty"]["top_class"] == "mug/orange"
  assert table[0]["empty"]["p_true"] == pytest.approx(0.2)
  assert table[1]["full"] is None  # No example of the class: nothing to average.
  assert table[2]["full"]["p_true"] == pytest.approx(0.8)
