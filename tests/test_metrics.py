import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from jmmshap import metrics


def _sklearn(labels, predictions):
  out = {"accuracy": sk_metrics.accuracy_score(labels, predictions)}
  for average in ("macro", "weighted"):
    precision, recall, f1, _ = sk_metrics.precision_recall_fscore_support(
        labels, predictions, average=average, zero_division=0)
    out.update({f"precision_{average}": precision, f"recall_{average}": recall, f"f1_{average}": f1})
  return out


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn_on_random_predictions(seed):
  rng = np.random.default_rng(seed)
  num_classes = 7
  labels = rng.integers(0, num_classes, 200)
  # Mostly right, some wrong, one class never predicted and one never present.
  predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, num_classes, 200))
  predictions[predictions == 3] = 4
  labels[labels == 6] = 5
  ours = metrics.classification_metrics(labels, predictions, num_classes)
  theirs = _sklearn(labels, predictions)
  assert set(ours) == set(metrics.METRIC_NAMES)
  for name in metrics.METRIC_NAMES:
    assert ours[name] == pytest.approx(theirs[name], abs=1e-12), name


def test_perfect_predictions_score_one():
  labels = np.array([0, 1, 2, 2, 1])
  scores = metrics.classification_metrics(labels, labels, 3)
  assert all(value == 1.0 for value in scores.values())


def test_confusion_matrix_counts_true_by_predicted():
  counts = metrics.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
  np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


def test_mismatched_shapes_are_refused():
  with pytest.raises(ValueError, match="equal 1-D shapes"):
    metrics.classification_metrics(np.zeros(3, int), np.zeros(4, int), 2)


def test_macro_averages_skip_classes_that_are_neither_labelled_nor_predicted():
  """A split may lack some of the dataset's classes: they must not count as F1 0 in the macro mean
  (scikit-learn's default). Classes 3 and 4 of 5 never occur here."""
  labels, predictions = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])
  scores = metrics.classification_metrics(labels, predictions, 5)
  assert scores["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)  # By hand: per-class F1.
  assert scores["precision_macro"] == pytest.approx((1 + 1 + 1 / 2) / 3)
  assert scores["recall_macro"] == pytest.approx((1 + 1 / 2 + 1) / 3)
  theirs = _sklearn(labels, predictions)
  for name in metrics.METRIC_NAMES:
    assert scores[name] == pytest.approx(theirs[name], abs=1e-12), name
