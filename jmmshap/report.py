"""The meta stage's report: Table II and what stands behind it (`W/meta/`).

metrics.json (test metrics per method), training.json (how each meta-model was trained),
selection.json (predict's default method, `ensemble.select_method`), report.md (Table II, that
method and its validation scores, the MMBT's MM-SHAP shares per class, per-class F1, meta-model
training),
confusion_matrix.png (best method) and per_class_f1.png (base learners, stacking and the best).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jmmshap import metrics, plots, workdir
from jmmshap.builders import EVAL_SPLITS
from jmmshap.learner_outputs import Shares, SplitOutputs

_TABLE_COLUMNS = (("accuracy", "accuracy"), ("precision_macro", "P macro"), ("recall_macro", "R macro"),
                  ("f1_macro", "F1 macro"), ("precision_weighted", "P weighted"),
                  ("recall_weighted", "R weighted"), ("f1_weighted", "F1 weighted"))


def _class_t_shap(shares: Shares, labels: np.ndarray, label: int) -> str:
  members = shares.defined & (labels == label)
  mean = f"{shares.t_shap[members].mean():.3f}" if members.any() else "n/a"
  return f"{mean} | {int(members.sum())}"


def describe_learner(config: Mapping[str, Any] | None) -> str:
  """One line on what a base learner is and which checkpoints it started from (its config.json)."""
  if config is None:
    return "(no config.json)"

  def tower(model: Mapping[str, Any], checkpoint: str | None) -> str:
    if model.get("model_type") == "resnet" or "depth" in model:
      size = f"ResNet-{model.get('depth')}"
    else:
      size = (f"{model.get('model_type', 'BERT' if 'vocab_size' in model else 'tower')} "
              f"{model.get('hidden_size')} wide, {model.get('num_hidden_layers')} layers")
    return f"{size}, {'from ' + checkpoint if checkpoint else 'trained from scratch'}"

  model = config.get("model", {})
  if config.get("stage") == "mmbt":
    vision = model.get("image_tower", "clip")  # Configs saved before the ResNet tower were CLIP's.
    return (f"{'CLIP' if vision == 'clip' else 'ResNet'}-MMBT, "
            f"{model.get('num_image_embeddings')} image embeddings, "
            f"{config.get('data', {}).get('image_size')} px; text: "
            f"{tower(model.get('bert', {}), config.get('init_from_text'))}; vision: "
            f"{tower(model.get(vision, {}), config.get('init_from_image'))}")
  return tower(model, config.get("init_from"))


def _selection_lines(selection: Mapping[str, Any]) -> list[str]:
  """Predict's default method, why, and the validation scores behind it (best first)."""
  lines = ["## Predict's default method", "",
           f"predict's default method ('auto'): **{selection['chosen']}**, by {selection['rule']}.",
           ""]
  scored = [method for method in selection["ranking"] if method in selection["scores"]]
  if scored:
    lines += ["| method | validation macro F1 | scored on |", "| --- | ---: | --- |"]
    lines += [f"| {method} | {selection['scores'][method]:.4f} | {selection['scored_on'][method]} |"
              for method in scored]
    lines.append("")
  return lines


def render_report(report: dict, per_class_f1: Mapping[str, np.ndarray],
                  shares: Mapping[str, Shares] | None, outputs: Mapping[str, SplitOutputs],
                  training: Mapping[str, dict], best: str,
                  learners: Mapping[str, str] | None = None,
                  selection: Mapping[str, Any] | None = None) -> str:
  """report.md: Table II, the base learners, the MM-SHAP summary, per-class F1 and how each
  meta-model was trained."""
  class_names = outputs["test"].class_names
  lines = ["# MM-SHAP-weighted stacked ensemble: test results", "",
           f"{len(outputs['test'].ids)} test examples, {len(class_names)} classes; meta-models "
           f"trained on {len(outputs['validation'].ids)} validation examples.", "",
           "## Table II", "",
           "| method | " + " | ".join(label for _, label in _TABLE_COLUMNS) + " |",
           "| --- |" + " ---: |" * len(_TABLE_COLUMNS)]
  for method, scores in report["methods"].items():
    cells = " | ".join(f"{scores[key]:.4f}" for key, _ in _TABLE_COLUMNS)
    lines.append(f"| {'**' + method + '**' if method == best else method} | {cells} |")
  lines += ["", f"Best by test macro F1: **{best}**; its confusion matrix: `confusion_matrix.png`.",
            "text, image, mmbt: each base learner alone; average: mean of their softmax outputs; "
            "stacked: meta-MLP on the plain logits; mmshap_dataset / mmshap_sample: meta-MLP on "
            "MM-SHAP-weighted logits (dataset means / each example's own shares); "
            "mmshap_complement: each unimodal learner weighted by 1 - the MMBT's share of its "
            "modality (jmmshap/weighting.py).", ""]
  if selection:
    lines += _selection_lines(selection)
  if learners:
    lines += ["## Base learners", ""]
    lines += [f"- {name}: {description}" for name, description in learners.items()]
    lines.append("")
  lines += ["## MM-SHAP of the multimodal learner", ""]
  if shares is None:
    lines += ["No MM-SHAP outputs in this workdir.", ""]
  else:
    for split, split_shares in shares.items():
      defined = split_shares.defined
      if defined.any():
        t_mean, v_mean = (split_shares.t_shap[defined].mean(), split_shares.v_shap[defined].mean())
        lines.append(f"- {split}: T-SHAP {t_mean:.3f}, V-SHAP {v_mean:.3f} over {int(defined.sum())} "
                     f"of {len(defined)} examples ({int(split_shares.explained.sum())} explained).")
    lines += ["", "Mean T-SHAP per true class (V-SHAP = 1 - T-SHAP):", "",
              "| class | " + " | ".join(f"{split} T-SHAP | {split} n" for split in shares) + " |",
              "| --- |" + " ---: | ---: |" * len(shares)]
    for index, name in enumerate(class_names):
      cells = " | ".join(_class_t_shap(shares[split], outputs[split].labels, index)
                         for split in shares)
      lines.append(f"| {name} | {cells} |")
    lines.append("")
  methods = list(per_class_f1)
  lines += ["## Per-class F1 (test)", "", "| class | " + " | ".join(methods) + " |",
            "| --- |" + " ---: |" * len(methods)]
  for index, name in enumerate(class_names):
    lines.append(f"| {name} | " + " | ".join(f"{per_class_f1[m][index]:.3f}" for m in methods) + " |")
  lines += ["", "## Meta-model training", ""]
  for method, info in training.items():
    held_out = info.get("held_out_validation")
    text = (f"- {method}: {info['members']} member(s), {info['num_features']} features, "
            f"{info['steps']} steps, params kept from step(s) {info['kept_steps']}")
    if "dataset_t_shap" in info:
      text += (f"; dataset shares T {info['dataset_t_shap']:.3f} / V {info['dataset_v_shap']:.3f}")
    for split in EVAL_SPLITS:
      if info.get(f"undefined_{split}"):
        text += f"; {info[f'undefined_{split}']} {split} examples with undefined shares"
    if held_out:
      text += (f"; held-out validation ({held_out['examples']} examples): macro F1 "
               f"{held_out['f1_macro']:.4f}, accuracy {held_out['accuracy']:.4f}")
    lines.append(text + ".")
  return "\n".join(lines) + "\n"


def write(directory: str, report: dict, predictions: Mapping[str, np.ndarray], best: str,
          shares: Mapping[str, Shares] | None, outputs: Mapping[str, SplitOutputs],
          training: Mapping[str, dict], learners: Mapping[str, str] | None = None,
          selection: Mapping[str, Any] | None = None) -> None:
  """Every report file of the meta stage (process 0 only)."""
  if not workdir.is_writer():
    return
  class_names = outputs["test"].class_names
  num_classes = len(class_names)
  test_labels = outputs["test"].labels
  workdir.write_json(os.path.join(directory, workdir.METRICS), report)
  workdir.write_json(os.path.join(directory, workdir.TRAINING), training)
  if selection is not None:
    workdir.write_json(os.path.join(directory, workdir.SELECTION), selection)
  plots.confusion_matrix(
      metrics.confusion_matrix(test_labels, predictions[best], num_classes), class_names,
      os.path.join(directory, "confusion_matrix.png"), f"{best} (test)")
  per_class_f1 = {method: metrics.per_class(test_labels, predicted, num_classes)["f1"]
                  for method, predicted in predictions.items()}
  shown = [m for m in ("text", "image", "mmbt", "stacked", best) if m in per_class_f1]
  plots.per_class_f1({m: per_class_f1[m] for m in dict.fromkeys(shown)}, class_names,
                     os.path.join(directory, "per_class_f1.png"), "per-class F1 (test)")
  workdir.write_text(os.path.join(directory, workdir.REPORT),
                     render_report(report, per_class_f1, shares, outputs, training, best,
                                   learners, selection))
