"""The meta stage: every weighting's meta-model, each method evaluated on test, and the report.

Methods (`W/meta/metrics.json`): each base learner alone (text, image, mmbt), `average` (the mean
of their softmax outputs), and one meta-MLP per `meta.weighting` (`weighting.py`): stacked,
mmshap_dataset, mmshap_sample, mmshap_complement. The meta-MLPs train on validation (`meta.py`);
every number is on test.
`predictions_test.npz` keeps every method's test probabilities by example id.

Predict's default method ('auto', `W/meta/selection.json`): the method with the best validation
macro F1, as AutoGluon picks its best model. Each is scored on examples it was not trained on: the
learners and `average` on all of validation (they trained on train only), each meta-MLP out of fold
(`meta.cross_fit`: each validation example predicted by the member that held it out). Neither score
is quite unbiased: a learner's checkpoint was picked by its validation macro F1, and with early
stopping a member's stopping step by its fold. Early stopping without cross-fit scores a meta-MLP on
a fraction of validation, which is not compared with scores on all of it. Without out-of-fold
scores (`meta.cross_fit=0`, the paper's single MLP) the fixed `PREFERENCE` decides, as predict did
before the selection; it also breaks ties. The predictor reads the file (`read_selection`) and takes
the first method of its ranking that its predictions have (`auto_method`).

The pipeline (`pipeline.py`) has run the upstream stages before this one reads their outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jmmshap import config_checks, learner_outputs, meta, metrics, report, weighting, workdir
from jmmshap.builders import EVAL_SPLITS

STAGE = "meta"
# Ties in the selection, and the whole rule without out-of-fold scores: the meta-models (the
# order of the fixed preference predict used before the selection), then the learners' mean, then
# the learners.
PREFERENCE = ("mmshap_sample", "mmshap_dataset", "mmshap_complement", "stacked", "average", "mmbt",
              "text", "image")
SELECTION_METRIC = "f1_macro"
VALIDATION, OUT_OF_FOLD = "validation", "out-of-fold"  # What a method's selection score is on.
BEST_RULE = (f"best validation macro F1 (the learners and average on validation, the meta-models "
             f"out of fold); ties: the first of {', '.join(PREFERENCE)}")


def check_config(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """The meta-model's settings, and what they need of the nested mmshap stage."""
  problems: list[str] = []
  try:
    weightings = weighting.parse_weightings(config.meta.weighting)
  except ValueError as error:
    problems.append(str(error))
    weightings = ()
  mmshap_config = config.stages.get("mmshap")
  for name in (name for name in weightings if name in weighting.PER_EXAMPLE):
    if mmshap_config is not None and mmshap_config.max_examples:
      problems.append(
          f"meta.weighting includes '{name}', which needs MM-SHAP shares of every validation and "
          f"test example, but stages.mmshap.max_examples={mmshap_config.max_examples} explains only "
          f"the first ones: set stages.mmshap.max_examples=0 or drop '{name}' from meta.weighting.")
    if mmshap_config is not None and mmshap_config.get("target") == "label":
      problems.append(
          f"meta.weighting includes '{name}' but stages.mmshap.target='label': each test example's "
          "weights would come from explaining its true label, so the test score would read the test "
          f"labels. Use stages.mmshap.target='predicted' or drop '{name}' from meta.weighting.")
  config_checks.positive(problems, config.meta, f"{prefix}meta.", "num_steps", "hidden_size",
                         "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints")
  every, checkpoint_every = config.meta.eval_every_steps, config.meta.checkpoint_every_steps
  if isinstance(every, int) and every > 0 and checkpoint_every % every:
    problems.append(f"{prefix}meta.checkpoint_every_steps={checkpoint_every} is not a multiple of "
                    f"meta.eval_every_steps={every}.")
  config_checks.check_optimizer(problems, config.meta.optimizer, f"{prefix}meta.optimizer.")
  return problems


def output_dir(root: str, config: ml_collections.ConfigDict) -> str:
  return os.path.join(root, config.get("output_dir") or STAGE)


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


def learner_probabilities(logits: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each base learner's softmax and their mean ('average'): the methods before the meta-models,
  for a split here and for new products in the predictor."""
  probabilities = {learner: _softmax(logits[learner]) for learner in learner_outputs.LEARNERS}
  probabilities["average"] = np.mean([probabilities[learner] for learner in learner_outputs.LEARNERS],
                                     axis=0)
  return probabilities


def write_test_predictions(directory: str, outputs: learner_outputs.SplitOutputs,
                           probabilities: Mapping[str, np.ndarray]) -> None:
  """`predictions_test.npz`: every method's test probabilities by example id, so that what the
  predictor says about the same products can be held against what this stage reported."""
  if not workdir.is_writer():
    return
  methods = list(probabilities)
  arrays = {"ids": outputs.ids, "labels": outputs.labels,
            "class_names": np.asarray(outputs.class_names), "methods": np.asarray(methods),
            "probabilities": np.stack([probabilities[m] for m in methods]).astype(np.float32)}
  workdir.write_atomically(os.path.join(directory, workdir.PREDICTIONS_TEST),
                           lambda partial: np.savez(partial, **arrays))


def _validation_scores(member_probabilities: np.ndarray, labels: np.ndarray,
                       holdout: np.ndarray, num_classes: int) -> dict | None:
  """Metrics on the held-out validation examples, each predicted by the member that held it out."""
  if not holdout.any():
    return None
  rows = np.flatnonzero(holdout.any(axis=0))
  member = holdout[:, rows].argmax(axis=0)
  predictions = member_probabilities[member, rows].argmax(-1)
  return {"examples": int(len(rows)),
          **metrics.classification_metrics(labels[rows], predictions, num_classes)}


def selection_scores(outputs: learner_outputs.SplitOutputs,
                     training: Mapping[str, dict]) -> tuple[dict[str, float], dict[str, str]]:
  """(method -> validation macro F1, method -> what it was scored on) of every method scored on
  examples it did not train on (module docstring); a meta-model's held-out score counts only when it
  covers every validation example (cross-fit)."""
  labels = outputs.labels
  scores, scored_on = {}, {}
  for method, probabilities in learner_probabilities(outputs.logits).items():
    scores[method] = metrics.classification_metrics(
        labels, probabilities.argmax(-1), outputs.num_classes)[SELECTION_METRIC]
    scored_on[method] = VALIDATION
  for method, info in training.items():
    held_out = info.get("held_out_validation")
    if held_out and held_out["examples"] == len(labels):
      scores[method], scored_on[method] = held_out[SELECTION_METRIC], OUT_OF_FOLD
  return scores, scored_on


def select_method(methods: Sequence[str], scores: Mapping[str, float],
                  scored_on: Mapping[str, str], unscored_reason: str) -> dict[str, Any]:
  """selection.json: predict's default method and its evidence. The best score wins (ties: the
  first in PREFERENCE); where a method has no score (`unscored_reason` says why), the scores do not
  compare every method and PREFERENCE alone ranks them. `ranking`: the order 'auto' walks when
  predictions lack the chosen method (mmshap_sample without the products' MM-SHAP)."""
  order = {method: (PREFERENCE.index(method) if method in PREFERENCE else len(PREFERENCE), i)
           for i, method in enumerate(methods)}
  unscored = [method for method in methods if method not in scores]
  if unscored:
    ranking = sorted(methods, key=order.get)
    rule = (f"fixed preference {', '.join(ranking)}: no score for {', '.join(unscored)} "
            f"({unscored_reason})")
  else:
    ranking = sorted(methods, key=lambda method: (-scores[method], order[method]))
    rule = BEST_RULE
  return {"rule": rule, "metric": SELECTION_METRIC, "scores": dict(scores),
          "scored_on": dict(scored_on), "chosen": ranking[0], "ranking": ranking}


def method_names(weightings: Sequence[str]) -> list[str]:
  """Every method of the meta stage, in its order: the learners, average, the meta-models."""
  return [*learner_outputs.LEARNERS, "average",
          *(weighting.METHOD_OF_WEIGHTING[name] for name in weightings)]


def read_selection(directory: str, weightings: Sequence[str]) -> dict[str, Any]:
  """The meta stage's selection.json in `directory`; for a workdir that predates it, the fixed
  preference (saying so in its rule)."""
  path = os.path.join(directory, workdir.SELECTION)
  if os.path.isfile(path):
    return workdir.read_json(path)
  return select_method(method_names(weightings), {}, {},
                       f"{path} not found: the meta stage ran before predict's selection existed")


def auto_method(selection: Mapping[str, Any], available: Collection[str]) -> tuple[str, str | None]:
  """What 'auto' is for predictions with the `available` methods: the selection's choice, else the
  first of its ranking they have; and why the choice was passed over (None when it was not)."""
  method = next((name for name in selection["ranking"] if name in available), None)
  if method is None:
    raise ValueError(f"none of the selection's methods ({', '.join(selection['ranking'])}) is "
                     f"among the predictions' ({', '.join(available)}).")
  chosen = selection["chosen"]
  if method == chosen:
    return method, None
  per_example = {weighting.METHOD_OF_WEIGHTING[name] for name in weighting.PER_EXAMPLE}
  needs = " (it needs the products' MM-SHAP)" if chosen in per_example else ""
  return method, (f"{chosen} is not among these predictions' methods{needs}: {method}, next in "
                  "the ranking")


def evaluate_methods(root: str, config: ml_collections.ConfigDict) -> dict:
  """Trains (train mode) or restores (eval mode) every weighting's meta-model; writes the report."""
  meta_config = config.meta
  weightings = weighting.parse_weightings(meta_config.weighting)
  directory = output_dir(root, config)
  os.makedirs(directory, exist_ok=True)
  outputs = {split: learner_outputs.load_base_outputs(root, split) for split in EVAL_SPLITS}
  learner_outputs.check_class_names(
      outputs["validation"].class_names, outputs["validation"].paths["text"],
      outputs["test"].class_names, outputs["test"].paths["text"])
  class_names = outputs["test"].class_names
  num_classes = len(class_names)
  needs_shares = any(name != "none" for name in weightings)
  shares = None
  if needs_shares or os.path.isfile(learner_outputs.shares_path(root, "validation")):
    shares = {"validation": learner_outputs.load_shares(root, outputs["validation"])}
    per_example = set(weightings) & set(weighting.PER_EXAMPLE)
    if per_example or os.path.isfile(learner_outputs.shares_path(root, "test")):
      shares["test"] = learner_outputs.load_shares(root, outputs["test"])

  test_labels = outputs["test"].labels
  probabilities = learner_probabilities(outputs["test"].logits)
  training = {}
  for name in weightings:
    data = weighting.method_data(outputs, shares, name, meta_config)
    method_dir = os.path.join(directory, data.method)
    if config.mode == "train":
      meta.train(data, meta_config, method_dir, config.seed, class_names)
    predict, progress = meta.restore(data, meta_config, method_dir, config.seed, class_names)
    members = predict(data.features["test"])
    probabilities[data.method] = members.mean(axis=0)
    _, holdout = meta.member_masks(data.labels["validation"], meta_config, config.seed)
    training[data.method] = {
        "weighting": data.weighting, "num_features": int(data.features["test"].shape[1]),
        "members": int(len(holdout)), "steps": progress["step"], "kept_steps": progress["kept_step"],
        "held_out_validation": _validation_scores(predict(data.features["validation"]),
                                                  data.labels["validation"], holdout, num_classes),
        **data.shares}

  methods = list(probabilities)
  predictions = {method: probabilities[method].argmax(-1) for method in methods}
  scores = {"methods": {method: metrics.classification_metrics(test_labels, predictions[method],
                                                               num_classes)
                        for method in methods}}
  best = max(methods, key=lambda method: scores["methods"][method]["f1_macro"])
  selection = select_method(methods, *selection_scores(outputs["validation"], training),
                            f"meta.cross_fit={meta_config.cross_fit}: no out-of-fold scores")
  learners = {}
  for learner in learner_outputs.LEARNERS:
    saved = workdir.path(root, learner, workdir.CONFIG)
    learners[learner] = report.describe_learner(
        workdir.read_json(saved) if os.path.isfile(saved) else None)
  report.write(directory, scores, predictions, best, shares, outputs, training, learners, selection)
  write_test_predictions(directory, outputs["test"], probabilities)
  for method in methods:
    logging.info("meta test %s: %s", method, json.dumps(scores["methods"][method]))
  logging.info("meta: predict's default method %s (%s)", selection["chosen"], selection["rule"])
  return scores


def run(config: ml_collections.ConfigDict, root: str) -> dict:
  """The meta stage on finished upstream stages: train (or restore) the meta-models, report."""
  directory = output_dir(root, config)
  os.makedirs(directory, exist_ok=True)
  if workdir.is_writer() and config.mode == "train":
    workdir.write_text(os.path.join(directory, workdir.CONFIG), config.to_json(indent=2))
  return evaluate_methods(root, config)
