r"""MM-SHAP with the MMBT's image embeddings as players against pixel patches, on finished workdirs
that share their base learners and differ only in `stages.mmshap.image_players` / `patch_grid`.

  PYTHONPATH=. python scripts/compare_image_players.py --out=docs/benchmarks/image_players_toyshop.json \
      --workdir=embeddings=W0 --workdir=patches=W1 --workdir=patches_2x2=W2

Per variant: the MM-SHAP settings, per true class the mean T-SHAP (next to toyshop's designed share,
and their mean absolute deviation, MAD, where the data has one), MM-SHAP seconds per example, the
dataset T-SHAP the `mmshap_dataset` weighting used and every method's test metrics (W/meta; null
where the workdir has no meta stage, e.g. an MMBT and its MM-SHAP run on their own). Per pair
of variants: how the per-example T-SHAP agree on the split (Pearson, Spearman, mean |difference|).

Real data has no designed shares; `--reference=NAME=LOGITS` (e.g. text=W/text/logits_test.npz,
image=W/image/logits_test.npz) gives an outside yardstick instead: per class, that one-modality
learner's F1 on the whole split, and per variant the Spearman correlation over classes between its
per-class T-SHAP and that F1. A game that credits the title where the title alone classifies well
should correlate positively with the text learner and negatively with the image learner.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from jmmshap import errors, metrics, workdir

SETTINGS = ("image_players", "patch_grid", "text_players", "value", "method", "max_exact_players")


def _read_json(root: str, stage: str, name: str) -> dict[str, Any]:
  with open(workdir.path(root, stage, name)) as f:
    return json.load(f)


def variant(root: str, split: str) -> dict[str, Any]:
  summary = _read_json(root, "mmshap", workdir.SUMMARY)
  has_meta = os.path.exists(workdir.path(root, "meta", "metrics.json"))
  training = _read_json(root, "meta", "training.json") if has_meta else {}
  metrics = _read_json(root, "meta", "metrics.json")["methods"] if has_meta else None
  per_class = summary["splits"][split]["per_class"]
  designed = [c for c in per_class if c.get("designed_text_share") is not None
              and c["t_shap_mean"] is not None]
  timing = {s: round(v["seconds"] / v["count"], 4) for s, v in summary["splits"].items()}
  return {
      "workdir": root,
      "settings": {key: summary.get(key) for key in SETTINGS},
      "per_class_t_shap": {c["class"]: c["t_shap_mean"] for c in per_class},
      "designed_text_share": {c["class"]: c["designed_text_share"] for c in designed} or None,
      "mad_to_designed": (float(np.mean([abs(c["t_shap_mean"] - c["designed_text_share"])
                                         for c in designed])) if designed else None),
      "t_shap_mean": summary["splits"][split]["t_shap_mean"],
      "num_exact": summary["splits"][split]["num_exact"],
      "count": summary["splits"][split]["count"],
      "seconds_per_example": timing,
      "dataset_t_shap_used_by_weighting": training.get("mmshap_dataset", {}).get("dataset_t_shap"),
      "test_metrics": None if metrics is None else {
          method: {k: m[k] for k in ("accuracy", "f1_macro", "f1_weighted")}
          for method, m in metrics.items()},
  }


def _shares(root: str, split: str) -> dict[str, float]:
  with np.load(workdir.path(root, "mmshap", workdir.shares_file(split))) as arrays:
    return dict(zip(arrays["ids"].astype(str), arrays["t_shap"]))


def _ranks(values: np.ndarray) -> np.ndarray:
  """Ranks from 0, ties sharing their mean rank (per-class F1 of 1.0 is common), as Spearman's rho
  needs: order-broken ties would make the correlation depend on the class order."""
  values = np.asarray(values)
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  first = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return (first + (counts - 1) / 2.0)[inverse].astype(np.float64)


def agreement(first: str, second: str, split: str) -> dict[str, Any]:
  a, b = _shares(first, split), _shares(second, split)
  ids = sorted(i for i in set(a) & set(b) if np.isfinite(a[i]) and np.isfinite(b[i]))
  x, y = np.asarray([a[i] for i in ids]), np.asarray([b[i] for i in ids])
  return {"examples": len(ids), "pearson": float(np.corrcoef(x, y)[0, 1]), "spearman": spearman(x, y),
          "mean_abs_difference": float(np.mean(np.abs(x - y)))}


def per_class_f1(logits_path: str) -> dict[str, float]:
  """A learner's F1 per class from its written logits (with labels and class names)."""
  with np.load(logits_path) as arrays:
    names = [str(name) for name in arrays["class_names"]]
    scores = metrics.per_class(arrays["labels"], arrays["logits"].argmax(-1), len(names))
  return dict(zip(names, scores["f1"].tolist()))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  return float(np.corrcoef(_ranks(np.asarray(x)), _ranks(np.asarray(y)))[0, 1])


def against_references(variants: dict[str, Any],
                       references: Sequence[tuple[str, str]]) -> dict[str, Any]:
  report = {}
  for name, path in references:
    f1 = per_class_f1(path)
    correlations = {}
    for variant_name, found in variants.items():
      shares = found["per_class_t_shap"]
      classes = [c for c in shares if shares[c] is not None and c in f1]
      correlations[variant_name] = {
          "classes": len(classes),
          "spearman_t_shap_vs_f1": spearman([shares[c] for c in classes], [f1[c] for c in classes])}
    report[name] = {"logits": path, "per_class_f1": f1, "correlation": correlations}
  return report


def compare(named: Sequence[tuple[str, str]], split: str,
            references: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
  variants = {name: variant(root, split) for name, root in named}
  return {
      "split": split,
      "variants": variants,
      "agreement": {f"{n1} vs {n2}": agreement(r1, r2, split)
                    for (n1, r1), (n2, r2) in itertools.combinations(named, 2)},
      "references": against_references(variants, references),
  }


def _pairs(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
  pairs = [tuple(item.split("=", 1)) for item in items]
  if any(len(pair) != 2 for pair in pairs):
    raise app.UsageError(f"--{flag} takes NAME=PATH.")
  return pairs


def define_flags() -> None:
  """Only when run as a script: tests import the functions beside other scripts' flags."""
  flags.DEFINE_multi_string("workdir", None, "NAME=WORKDIR of a finished main job; repeatable.")
  flags.DEFINE_string("out", None, "The JSON to write.")
  flags.DEFINE_string("split", "test", "The split whose per-example shares are compared.")
  flags.DEFINE_multi_string("reference", [], "NAME=LOGITS_NPZ of a one-modality learner (W/<stage>/"
                            "logits_<split>.npz): per-class F1 to correlate per-class T-SHAP with.")


def main(argv: Sequence[str]) -> None:
  del argv
  report = compare(_pairs(flags.FLAGS.workdir, "workdir"), flags.FLAGS.split,
                   _pairs(flags.FLAGS.reference, "reference"))
  os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.out)), exist_ok=True)
  with open(flags.FLAGS.out, "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(errors.exit_on_user_error(main))
