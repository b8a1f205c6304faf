"""PNG figures people look at: training curves (the paper's Fig. 2 and 3), confusion matrices,
per-class F1 and the MM-SHAP shares."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np


def training_curves(records: Sequence[dict], path_prefix: str, title: str) -> list[str]:
  """`{prefix}loss.png` and `{prefix}accuracy.png` from log.jsonl records; returns the paths."""
  train = [r for r in records if r.get("split") == "train"]
  validation = [r for r in records if r.get("split") == "validation"]
  paths = []
  for metric, label in (("loss", "loss"), ("accuracy", "accuracy")):
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
      axis.plot([r["step"] for r in train], [r[metric] for r in train], label=f"train {label}")
    if validation and metric in validation[0]:
      axis.plot([r["step"] for r in validation], [r[metric] for r in validation], "o-",
                label=f"validation {label}")
    axis.set_xlabel("step")
    axis.set_ylabel(label)
    axis.set_title(f"{title}: {label}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = f"{path_prefix}{metric}.png"
    figure.savefig(path)
    plt.close(figure)
    paths.append(path)
  return paths


def confusion_matrix(counts: np.ndarray, class_names: Sequence[str], path: str, title: str) -> str:
  """Row-normalised confusion matrix (rows: true class)."""
  counts = np.asarray(counts, np.float64)
  rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  size = max(5.0, 0.3 * len(class_names) + 2)
  figure, axis = plt.subplots(figsize=(size, size), dpi=100)
  image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  axis.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
  axis.set_yticks(range(len(class_names)), class_names, fontsize=7)
  axis.set_xlabel("predicted")
  axis.set_ylabel("true")
  axis.set_title(title)
  figure.colorbar(image, ax=axis, fraction=0.046)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
  return path


def per_class_f1(f1_by_method: dict[str, np.ndarray], class_names: Sequence[str], path: str,
                 title: str) -> str:
  """Grouped horizontal bars: one group per class, one bar per method, so gains show per class."""
  methods = list(f1_by_method)
  height = 0.8 / max(len(methods), 1)
  positions = np.arange(len(class_names))
  figure, axis = plt.subplots(figsize=(7, max(4.0, 0.22 * len(class_names) * max(len(methods), 2) / 2)),
                              dpi=100)
  for offset, method in enumerate(methods):
    axis.barh(positions + offset * height, f1_by_method[method], height, label=method)
  axis.set_yticks(positions + height * (len(methods) - 1) / 2, class_names, fontsize=7)
  axis.invert_yaxis()
  axis.set_xlim(0, 1)
  axis.set_xlabel("F1")
  axis.set_title(title)
  axis.grid(axis="x", alpha=0.3)
  axis.legend(fontsize=7, loc="lower left")
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
  return path


def t_shap_histogram(t_shap: np.ndarray, path: str, title: str) -> None:
  """How the per-example text shares of a split spread (NaN shares left out, and counted)."""
  figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
  defined = t_shap[np.isfinite(t_shap)]
  axis.hist(defined, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
  axis.set_xlim(0, 1)
  axis.set_xlabel("T-SHAP (text share; V-SHAP = 1 - T-SHAP)")
  axis.set_ylabel("examples")
  axis.set_title(f"{title} ({defined.size} of {t_shap.size} examples defined)")
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def t_shap_per_class(summary: dict, path: str, title: str) -> None:
  """Mean T-SHAP per class with its std, and the designed share where the data has one."""
  entries = summary["per_class"]
  names = [f"{e['class']} (n={e['count']})" for e in entries]
  means = [np.nan if e["t_shap_mean"] is None else e["t_shap_mean"] for e in entries]
  stds = [0.0 if e["t_shap_std"] is None else e["t_shap_std"] for e in entries]
  figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 5), dpi=100)
  positions = np.arange(len(names))
  axis.bar(positions, means, yerr=stds, color="tab:blue", alpha=0.8, capsize=3,
           label="measured T-SHAP (mean, std)")
  designed = [e.get("designed_text_share") for e in entries]
  if any(d is not None for d in designed):
    axis.scatter(positions, [np.nan if d is None else d for d in designed], marker="_", s=400,
                 color="tab:red", zorder=3, label="designed text share")
  axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
  axis.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
  axis.set_ylim(0, 1.05)
  axis.set_ylabel("T-SHAP")
  axis.set_title(title, pad=28)
  axis.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
