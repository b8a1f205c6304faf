"""Classification metrics as reported in the paper's Table II, in numpy (checked against scikit-learn).

Macro and weighted averages run over the classes present in the labels or the predictions, as
scikit-learn does by default; a class never predicted has precision 0 (scikit-learn's zero_division=0).
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("accuracy", "precision_macro", "recall_macro", "f1_macro",
                "precision_weighted", "recall_weighted", "f1_weighted")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  labels = np.asarray(labels, np.int64)
  predictions = np.asarray(predictions, np.int64)
  return np.bincount(labels * num_classes + predictions,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
  """Precision, recall, F1 and support for each class."""
  counts = confusion_matrix(labels, predictions, num_classes).astype(np.float64)
  true_positive = np.diag(counts)
  predicted = counts.sum(axis=0)
  support = counts.sum(axis=1)
  precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
  recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
  denominator = precision + recall
  f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive),
                 where=denominator > 0)
  return {"precision": precision, "recall": recall, "f1": f1, "support": support,
          "present": (support > 0) | (predicted > 0)}


def classification_metrics(labels: np.ndarray, predictions: np.ndarray,
                           num_classes: int) -> dict[str, float]:
  """Accuracy and macro/weighted precision, recall and F1."""
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  if labels.shape != predictions.shape or labels.ndim != 1:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be equal 1-D shapes")
  if len(labels) == 0:
    raise ValueError("no examples to compute metrics on")
  scores = per_class(labels, predictions, num_classes)
  present = scores["present"]
  weights = scores["support"] / scores["support"].sum()
  out = {"accuracy": float(np.mean(labels == predictions))}
  for name in ("precision", "recall", "f1"):
    out[f"{name}_macro"] = float(scores[name][present].mean())
    out[f"{name}_weighted"] = float(np.sum(scores[name] * weights))
  return out
