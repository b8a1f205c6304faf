"""scripts/compare_image_players.py: per-class F1 of a one-modality learner as a yardstick for shares."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "compare_image_players.py")
_SPEC = importlib.util.spec_from_file_location("compare_image_players", _PATH)
compare = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = compare
_SPEC.loader.exec_module(compare)

NAMES = np.array(["shoe", "shirt", "bag"])


def _logits(tmp_path, labels, predictions) -> str:
  logits = np.eye(len(NAMES), dtype=np.float32)[predictions] * 3.0
  path = os.path.join(tmp_path, "logits_test.npz")
  np.savez(path, logits=logits, labels=np.asarray(labels), ids=np.arange(len(labels)).astype(str),
           class_names=NAMES)
  return path


def test_per_class_f1_reads_the_argmax_of_the_written_logits(tmp_path):
  # shoe: 1 of 2 found, 1 false positive -> P = R = 1/2; shirt: all right; bag: never predicted.
  path = _logits(tmp_path, labels=[0, 0, 1, 1, 2], predictions=[0, 2, 1, 1, 0])
  f1 = compare.per_class_f1(path)
  assert list(f1) == ["shoe", "shirt", "bag"]
  np.testing.assert_allclose([f1["shoe"], f1["shirt"], f1["bag"]], [0.5, 1.0, 0.0])


def test_t_shap_that_follows_the_title_learner_correlates_positively(tmp_path):
  path = _logits(tmp_path, labels=[0, 0, 1, 1, 2, 2], predictions=[0, 1, 1, 1, 0, 1])
  # F1: shoe 2/3, shirt 4/5, bag 0.
  variants = {"follows": {"per_class_t_shap": {"shoe": 0.6, "shirt": 0.9, "bag": 0.1}},
              "opposite": {"per_class_t_shap": {"shoe": 0.6, "shirt": 0.1, "bag": 0.9}},
              "partial": {"per_class_t_shap": {"shoe": 0.5, "shirt": None, "bag": 0.2}}}
  report = compare.against_references(variants, [("text", path)])["text"]["correlation"]
  assert report["follows"]["spearman_t_shap_vs_f1"] == pytest.approx(1.0)
  assert report["opposite"]["spearman_t_shap_vs_f1"] == pytest.approx(-1.0)
  assert report["partial"]["classes"] == 2  # A class without shares is left out, not counted as 0.
  assert report["partial"]["spearman_t_shap_vs_f1"] == pytest.approx(1.0)


def test_tied_f1_share_their_rank_so_the_class_order_does_not_matter(tmp_path):
  # Two classes at F1 1.0 (the common case on real titles) and one at 0.
  path = _logits(tmp_path, labels=[0, 1, 2, 2], predictions=[0, 1, 0, 1])
  forward = {"per_class_t_shap": {"shoe": 0.9, "shirt": 0.5, "bag": 0.1}}
  backward = {"per_class_t_shap": {"shoe": 0.5, "shirt": 0.9, "bag": 0.1}}
  report = compare.against_references({"forward": forward, "backward": backward},
                                      [("text", path)])["text"]["correlation"]
  # F1: shoe 2/3, shirt 2/3, bag 0 -> ranks 1.5, 1.5, 0 for both orders.
  assert report["forward"]["spearman_t_shap_vs_f1"] == pytest.approx(
      report["backward"]["spearman_t_shap_vs_f1"])
  assert report["forward"]["spearman_t_shap_vs_f1"] == pytest.approx(np.sqrt(3) / 2)
