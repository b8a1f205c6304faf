r"""Per-class MM-SHAP T-SHAP of a toyshop MMBT against each class's designed text share.

  PYTHONPATH=. python scripts/toyshop_reliance.py --workdir=W --out=DIR
  PYTHONPATH=. python scripts/toyshop_reliance.py --out=DIR --split=test \
      --workdir=default=W0 --workdir=margin=W1 ...      # several MM-SHAP variants, one table

W is a finished toyshop workdir: W/mmbt (its config.json holds the toyshop spec, hence each class's
designed `text_share`) and W/mmshap/mmshap_{split}.npz (per-example T-SHAP of the MMBT). Writes
DIR/toyshop_reliance.json (per variant and class: designed share, measured mean T-SHAP over the
class's examples with its std and a bootstrap 95% CI, n; per reliance group means; the mean
absolute deviation (MAD) of the class means from the designed shares) and DIR/toyshop_reliance.png
(measured vs designed per class, grouped by reliance group).

`--modality_table` also restores each workdir's MMBT and records, per class, what it predicts from
the title alone, the image alone and neither (every player of the other modality masked as in that
workdir's MM-SHAP run): the corners of the game whose Shapley values MM-SHAP splits, which show
where a measured share comes from.

Why a class mean, not an example-weighted mean: toyshop classes have equal sizes per split, and the
issue's goal is stated per class, so every class counts once in the MAD.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from absl import app, flags

import jax
from flax import nnx

from jmmshap import (builders, classifier, errors, games, input_pipeline, mmshap_stage,
                     toyshop, workdir)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position



def _define_flags() -> None:
  """Only when run as a script: tests import the functions beside other scripts' flags."""
  flags.DEFINE_multi_string(
      "workdir", None, "A finished toyshop workdir, or NAME=WORKDIR to label a variant; repeatable.")
  flags.DEFINE_string("out", None, "Where toyshop_reliance.{json,png} go.")
  flags.DEFINE_enum("split", "test", ["validation", "test"], "The split whose shares to read.")
  flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples for the 95% CIs.")
  flags.DEFINE_bool(
      "modality_table", False, "Also run each MMBT on title-only, image-only and empty inputs.")

GROUP_ORDER = ("text", "both", "image")  # Plot and table order: designed share 1.0, 0.5, 0.0.
MMSHAP_SETTINGS = ("value", "target", "text_masking", "image_masking", "text_players", "image_players",
                   "patch_grid", "method")


@dataclasses.dataclass(frozen=True)
class ClassShare:
  """One class's measured T-SHAP (over its examples, by true label) against its designed share.

  mean/std/ci are over the examples whose T-SHAP is defined (num_undefined counts the 0/0 ones);
  they are NaN when none is.
  """
  name: str
  reliance: str
  designed: float
  mean: float
  std: float
  ci_low: float
  ci_high: float
  count: int
  num_undefined: int

  @property
  def deviation(self) -> float:
    return self.mean - self.designed


def designed_classes(root: str) -> list[toyshop.ClassInfo]:
  """The toyshop classes the MMBT in `root` was trained on, from its saved data config."""
  path = workdir.path(root, classifier.MMBT.name, workdir.CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {root} holds no trained MMBT; run "
                            f"python train.py --config=configs/meta.py --workdir={root}")
  with open(path) as f:
    data = json.load(f).get("data", {})
  if data.get("name") != "toyshop":
    raise ValueError(f"{path}: data.name is {data.get('name')!r}, not 'toyshop'; designed shares "
                     "exist only for toyshop data.")
  try:
    spec = toyshop.ToyshopSpec(**data.get("toyshop", {}))
  except TypeError as error:
    raise ValueError(f"{path}: data.toyshop is not a toyshop spec ({error}).") from error
  return toyshop.classes(spec)


def load_shares(root: str, split: str) -> dict[str, np.ndarray]:
  """t_shap, labels, targets and class_names of W/mmshap/mmshap_{split}.npz."""
  path = workdir.path(root, mmshap_stage.STAGE, workdir.shares_file(split))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: run the mmshap stage into {root} "
                            f"(python train.py --config=configs/mmshap.py --workdir={root}).")
  with np.load(path) as arrays:
    missing = {"t_shap", "labels", "targets", "class_names"} - set(arrays.files)
    if missing:
      raise ValueError(f"{path} lacks {sorted(missing)}: rerun the mmshap stage.")
    return {key: arrays[key] for key in ("t_shap", "labels", "targets", "class_names")}


def mmshap_settings(root: str) -> dict[str, Any]:
  """How the shares were computed (value, target, maskings), from W/mmshap/summary.json."""
  path = workdir.path(root, mmshap_stage.STAGE, workdir.SUMMARY)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    summary = json.load(f)
  return {key: summary.get(key) for key in MMSHAP_SETTINGS}


def _bootstrap_ci(values: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
  """Percentile 95% CI of the mean: T-SHAP is bounded and skewed, so no normal approximation."""
  if values.size < 2:
    return float(values.mean()), float(values.mean())
  means = rng.choice(values, size=(resamples, values.size), replace=True).mean(axis=1)
  low, high = np.quantile(means, [0.025, 0.975])
  return float(low), float(high)


def per_class_shares(t_shap: np.ndarray, labels: np.ndarray, classes: Sequence[toyshop.ClassInfo],
                     *, class_names: Sequence[str] | None = None, resamples: int = 2000,
                     seed: int = 0) -> list[ClassShare]:
  """Each class's T-SHAP over the examples whose true label it is, next to its designed share.

  t_shap, labels (n,): per-example shares (NaN: undefined) and label indices into `classes`.
  class_names: the label order of the shares (the npz's); must equal the designed classes' names,
    so a share is never compared with another class's design.
  """
  t_shap = np.asarray(t_shap, np.float64)
  labels = np.asarray(labels)
  if t_shap.shape != labels.shape or t_shap.ndim != 1:
    raise ValueError(f"t_shap {t_shap.shape} and labels {labels.shape} must be the same 1-D shape.")
  names = [info.name for info in classes]
  if class_names is not None and list(class_names) != names:
    raise ValueError(f"the shares' classes {list(class_names)} are not the toyshop spec's classes "
                     f"{names}: the MM-SHAP outputs and the MMBT's config come from different runs.")
  outside = labels[(labels < 0) | (labels >= len(names))]
  if outside.size:
    raise ValueError(f"labels {sorted(set(outside.tolist()))} are not class indices 0..{len(names) - 1}.")
  rng = np.random.default_rng(seed)
  shares = []
  for index, info in enumerate(classes):
    members = t_shap[labels == index]
    defined = members[np.isfinite(members)]
    if defined.size:
      mean, std = float(defined.mean()), float(defined.std())
      ci_low, ci_high = _bootstrap_ci(defined, resamples, rng)
    else:
      mean = std = ci_low = ci_high = float("nan")
    shares.append(ClassShare(name=info.name, reliance=info.reliance, designed=float(info.text_share),
                             mean=mean, std=std, ci_low=ci_low, ci_high=ci_high,
                             count=int(defined.size), num_undefined=int(members.size - defined.size)))
  return shares


def mean_absolute_deviation(shares: Sequence[ClassShare]) -> float:
  """Mean over classes of |measured mean - designed|; NaN if a class has no defined share."""
  if not shares:
    raise ValueError("no classes to compare.")
  return float(np.mean([abs(share.deviation) for share in shares]))


def group_summary(shares: Sequence[ClassShare]) -> dict[str, dict[str, float]]:
  """Per reliance group: designed share, mean of the class means, and the group's MAD."""
  groups = {}
  for group in GROUP_ORDER:
    members = [share for share in shares if share.reliance == group]
    if members:
      groups[group] = {"designed": members[0].designed,
                       "mean": float(np.mean([share.mean for share in members])),
                       "mad": mean_absolute_deviation(members), "num_classes": len(members)}
  return groups


def variant_report(name: str, root: str, split: str, resamples: int = 2000) -> dict[str, Any]:
  """The JSON entry of one workdir: its MM-SHAP settings, per-class shares, groups and MAD."""
  classes = designed_classes(root)
  arrays = load_shares(root, split)
  shares = per_class_shares(arrays["t_shap"], arrays["labels"], classes,
                            class_names=arrays["class_names"].tolist(), resamples=resamples)
  return {
      "name": name, "workdir": os.path.abspath(root), "split": split,
      "settings": mmshap_settings(root),
      "num_examples": int(arrays["labels"].size),
      "num_explaining_another_class": int((arrays["targets"] != arrays["labels"]).sum()),
      "mad": mean_absolute_deviation(shares),
      "groups": group_summary(shares),
      "per_class": [{**dataclasses.asdict(share), "deviation": share.deviation} for share in shares],
  }


def plot(reports: Sequence[Mapping[str, Any]], path: str) -> None:
  """Measured T-SHAP (mean, 95% CI) per class and variant, the designed share as a red bar."""
  first = reports[0]["per_class"]
  order = sorted(range(len(first)), key=lambda i: (GROUP_ORDER.index(first[i]["reliance"]), i))
  positions = np.arange(len(order))
  width = 0.8 / len(reports)
  figure, axis = plt.subplots(figsize=(max(7.0, 0.6 * len(order) + 2.5), 5), dpi=110)
  start = 0
  for group in GROUP_ORDER:  # Shaded spans label the reliance groups.
    size = sum(first[i]["reliance"] == group for i in order)
    if size:
      if GROUP_ORDER.index(group) % 2 == 0:
        axis.axvspan(start - 0.5, start + size - 0.5, color="0.93", zorder=0)
      axis.text(start + (size - 1) / 2, 1.08, f"{group}-decided" if group != "both" else "both",
                ha="center", fontsize=9)
      start += size
  axis.hlines([first[i]["designed"] for i in order], positions - 0.42, positions + 0.42,
              colors="tab:red", linewidths=2.5, zorder=4, label="designed text share")
  for k, report in enumerate(reports):
    entries = [report["per_class"][i] for i in order]
    means = np.array([e["mean"] for e in entries])
    errors = np.array([[e["mean"] - e["ci_low"] for e in entries],
                       [e["ci_high"] - e["mean"] for e in entries]])
    offset = (k - (len(reports) - 1) / 2) * width
    axis.errorbar(positions + offset, means, yerr=errors, fmt="o", markersize=4, capsize=2,
                  zorder=5, label=f"{report['name']} (MAD {report['mad']:.3f})")
  axis.set_xticks(positions, [first[i]["name"] for i in order], rotation=50, ha="right", fontsize=8)
  axis.set_xlim(-0.6, len(order) - 0.4)
  axis.set_ylim(-0.05, 1.15)
  axis.set_ylabel(f"T-SHAP, mean over the class's {reports[0]['split']} examples (95% CI)")
  axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


CORNERS = {"full": (True, True), "text_only": (True, False), "image_only": (False, True),
           "empty": (False, False)}


def corner_masks(word_ids: np.ndarray, num_image_embeddings: int
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """text_keep (B, L) and image_keep (B, N) of each corner: a modality all present or all masked.

  [CLS], [SEP] and [PAD] (word id -1) are never players and always kept, as in MM-SHAP.
  """
  special = np.asarray(word_ids) < 0
  size = special.shape[0]
  return {corner: (special | text, np.full((size, num_image_embeddings), image))
          for corner, (text, image) in CORNERS.items()}


def corner_table(probabilities: Mapping[str, np.ndarray], labels: np.ndarray,
                 class_names: Sequence[str]) -> list[dict[str, Any]]:
  """Per class and corner: the true class's mean probability and the class of highest mean one.

  probabilities: corner -> (n, C) softmax outputs; labels (n,).
  """
  labels = np.asarray(labels)
  table = []
  for index, name in enumerate(class_names):
    members = labels == index
    entry: dict[str, Any] = {"class": name, "count": int(members.sum())}
    for corner, probs in probabilities.items():
      if not members.any():
        entry[corner] = None
        continue
      mean = np.asarray(probs, np.float64)[members].mean(axis=0)
      entry[corner] = {"p_true": float(mean[index]), "top_class": class_names[int(mean.argmax())],
                       "p_top": float(mean.max())}
    table.append(entry)
  return table


def modality_table(root: str, split: str, batch_size: int = 100) -> list[dict[str, Any]]:
  """`corner_table` of the root's MMBT on a split, each modality masked as its MM-SHAP run did.

  The masking comes from W/mmshap/summary.json's text_masking / image_masking.
  """
  settings = mmshap_settings(root)
  trained = classifier.load_trained(root, classifier.MMBT)
  model = games.with_masking(trained.model, settings.get("text_masking"),
                             settings.get("image_masking"))
  graphdef, state = nnx.split(model)

  @jax.jit
  def probabilities(state, inputs, text_keep, image_keep):
    logits = nnx.merge(graphdef, state)(
        inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
        inputs["pixel_values"], text_keep=text_keep, image_keep=image_keep)["logits"]
    return jax.nn.softmax(logits, axis=-1)

  source = builders.data_source(builders.prepare(trained.config.data), split)
  outputs = {corner: [] for corner in CORNERS}
  labels = []
  for start in range(0, len(source), batch_size):
    batch = trained.preprocess.normalised(trained.preprocess(input_pipeline.read_records(
        source, range(start, min(start + batch_size, len(source))))))
    inputs = {key: np.asarray(batch[key]) for key in
              ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
    masks = corner_masks(batch["word_ids"], model.config.num_image_embeddings)
    for corner, (text_keep, image_keep) in masks.items():
      outputs[corner].append(np.asarray(probabilities(state, inputs, text_keep, image_keep)))
    labels.append(batch["label"])
  return corner_table({corner: np.concatenate(parts) for corner, parts in outputs.items()},
                      np.concatenate(labels), trained.class_names)


def _finite_or_none(tree: Any) -> Any:
  """NaN (a class without a defined share) as JSON null: NaN is not valid JSON."""
  if isinstance(tree, dict):
    return {key: _finite_or_none(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return [_finite_or_none(value) for value in tree]
  if isinstance(tree, float) and not np.isfinite(tree):
    return None
  return tree


def _named(workdirs: Sequence[str]) -> list[tuple[str, str]]:
  named = []
  for entry in workdirs:
    name, sep, root = entry.partition("=")
    named.append((name, root) if sep else (os.path.basename(os.path.normpath(entry)), entry))
  duplicates = {name for name, _ in named if [n for n, _ in named].count(name) > 1}
  if duplicates:
    raise ValueError(f"variant names {sorted(duplicates)} repeat: label them NAME=WORKDIR.")
  return named


def write_reports(workdirs: Sequence[str], out: str, *, split: str = "test", bootstrap: int = 2000,
                  with_modality_table: bool = False) -> list[dict]:
  """toyshop_reliance.{json,png} in `out` for workdirs given as WORKDIR or NAME=WORKDIR."""
  reports = []
  for name, root in _named(workdirs):
    report = variant_report(name, root, split, bootstrap)
    if with_modality_table:
      report["modality_table"] = modality_table(root, split)
    reports.append(report)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "toyshop_reliance.json"), "w") as f:
    json.dump(_finite_or_none({"split": split, "variants": reports}), f, indent=2)
  plot(reports, os.path.join(out, "toyshop_reliance.png"))
  return reports


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  if not args.workdir or not args.out:
    raise app.UsageError("--workdir and --out are required.")
  reports = write_reports(args.workdir, args.out, split=args.split, bootstrap=args.bootstrap,
                          with_modality_table=args.modality_table)
  for report in reports:
    groups = ", ".join(f"{g} {v['mean']:.3f} (designed {v['designed']:.1f})"
                       for g, v in report["groups"].items())
    print(f"{report['name']}: MAD {report['mad']:.4f}; {groups}")


if __name__ == "__main__":
  _define_flags()
  app.run(errors.exit_on_user_error(main))
