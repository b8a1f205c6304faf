"""MM-SHAP weighting of the meta-features (the paper's Algorithm 1, lines 13-15).

For example i with base logits z_text(i), z_image(i), z_mmbt(i) (each in R^C):

    13:  T_i, V_i = T-SHAP, V-SHAP of the MMBT's prediction    (W/mmshap/mmshap_{split}.npz)
    14:  u_i = [ T_i * z_text(i),  V_i * z_image(i) ]
    15:  x_i = [ u_i,  w_mm * z_mmbt(i) ]                      (+ [T_i, V_i] with meta.append_shares)

`meta.weighting` picks T_i and V_i, and each weighting is its own meta-MLP and its own reported method:

  none     T_i = V_i = 1: plain stacking of the three learners' logits ('stacked').
  dataset  T_i = mean T-SHAP, V_i = mean V-SHAP over the validation examples MM-SHAP explained, for
           every validation and test example ('mmshap_dataset').
  sample   each example's own shares; needs MM-SHAP on every validation and test example
           ('mmshap_sample'). An example whose shares are undefined (every Shapley value 0, so T-SHAP
           is 0/0) gets the dataset shares; how many did is written to training.json and report.md.

  complement  (beyond the paper) each example's own shares, complemented:
           u_i = [ (1 - T_i) * z_text(i),  (1 - V_i) * z_image(i) ]  (= [V_i z_text, T_i z_image]
           where the shares are defined, as T_i + V_i = 1). Each unimodal learner counts for what
           the MMBT did *not* draw from its modality: when the MMBT has collapsed onto the title
           (T_i near 1), the photo learner keeps its full logits, where the paper's weighting would
           scale them toward 0 and so amplify the collapse. Needs every example's shares, as
           'sample' does, with the same fallback ('mmshap_complement').

w_mm is `meta.mmbt_weight` (1). `meta.append_shares` appends [T_i, V_i] to the weighted variants'
features only; 'stacked' stays the paper's plain 3C-feature baseline. A constant per-learner scale
(`dataset`) is something W_1 could absorb: it changes the meta-model through initialisation,
optimisation and weight decay only. `sample` weighting changes what the meta-model sees per example.
The features are not standardised: per-column standardisation would undo the dataset weighting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jmmshap.builders import EVAL_SPLITS
from jmmshap.learner_outputs import Shares, SplitOutputs

WEIGHTINGS = ("none", "dataset", "sample", "complement")
METHOD_OF_WEIGHTING = {"none": "stacked", "dataset": "mmshap_dataset", "sample": "mmshap_sample",
                       "complement": "mmshap_complement"}
# The weightings that read each example's own shares: MM-SHAP must have explained every example.
PER_EXAMPLE = ("sample", "complement")


def dataset_shares(shares: Shares) -> tuple[float, float]:
  """Mean T-SHAP and V-SHAP over the examples with defined shares."""
  defined = shares.defined
  if not defined.any():
    raise ValueError(f"{shares.path}: no example has defined MM-SHAP shares (every Shapley value 0 "
                     "or none computed), so there are no dataset shares to weight with; check the "
                     "mmbt model and rerun mmshap (--config.rerun=mmbt,mmshap).")
  return float(shares.t_shap[defined].mean()), float(shares.v_shap[defined].mean())


def sample_shares(shares: Shares, fallback: tuple[float, float], split: str,
                  weighting: str = "sample") -> tuple[np.ndarray, np.ndarray, int]:
  """Per-example (T, V) for a PER_EXAMPLE weighting; undefined shares -> `fallback`; and how many
  were."""
  if not shares.explained.all():
    missing = np.flatnonzero(~shares.explained)
    raise ValueError(
        f"{shares.path} has MM-SHAP for {int(shares.explained.sum())} of {len(shares.explained)} "
        f"{split} examples (first missing: row {int(missing[0])}); meta.weighting '{weighting}' "
        "needs every example's shares: rerun mmshap on all of them "
        "(--config.stages.mmshap.max_examples=0 --config.rerun=mmshap) or drop "
        f"'{weighting}' from --config.meta.weighting.")
  defined = shares.defined
  t_shap = np.where(defined, shares.t_shap, fallback[0])
  v_shap = np.where(defined, shares.v_shap, fallback[1])
  return t_shap, v_shap, int((~defined).sum())


def weighted_features(logits: Mapping[str, np.ndarray], text_share: np.ndarray | float,
                      image_share: np.ndarray | float, *, mmbt_weight: float = 1.0,
                      append_shares: bool = False) -> np.ndarray:
  """Algorithm lines 14-15: [T * z_text, V * z_image, w_mm * z_mmbt] (+ [T, V]); see module doc."""
  count = len(logits["text"])
  text = np.broadcast_to(np.asarray(text_share, np.float32), (count,))[:, None]
  image = np.broadcast_to(np.asarray(image_share, np.float32), (count,))[:, None]
  parts = [text * logits["text"], image * logits["image"],
           np.float32(mmbt_weight) * logits["mmbt"]]
  if append_shares:
    parts += [text, image]
  return np.concatenate(parts, axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MethodData:
  """One weighting's meta-features on validation and test, and what went into them."""
  method: str
  weighting: str
  features: dict[str, np.ndarray]  # split -> (N, F)
  labels: dict[str, np.ndarray]
  shares: dict[str, Any]  # JSON-able: the shares used, undefined counts.


def parse_weightings(value: str) -> tuple[str, ...]:
  names = tuple(name.strip() for name in value.split(",") if name.strip())
  unknown = [name for name in names if name not in WEIGHTINGS]
  if unknown or not names:
    raise ValueError(f"meta.weighting={value!r}: use a comma-separated subset of "
                     f"{', '.join(WEIGHTINGS)}.")
  return tuple(dict.fromkeys(names))


def method_data(outputs: Mapping[str, SplitOutputs], shares: Mapping[str, Shares] | None,
                weighting: str, meta_config: ml_collections.ConfigDict) -> MethodData:
  """The meta-features of one weighting on every split (`shares` may be None for 'none')."""
  method = METHOD_OF_WEIGHTING[weighting]
  labels = {split: outputs[split].labels for split in EVAL_SPLITS}
  if weighting == "none":
    features = {split: split_features(weighting, outputs[split].logits, meta_config)[0]
                for split in EVAL_SPLITS}
    return MethodData(method, weighting, features, labels, {})
  mean_shares = dataset_shares(shares["validation"])
  used = {"dataset_t_shap": mean_shares[0], "dataset_v_shap": mean_shares[1],
          "dataset_examples": int(shares["validation"].defined.sum())}
  features = {}
  for split in EVAL_SPLITS:
    features[split], undefined = split_features(weighting, outputs[split].logits, meta_config,
                                                mean_shares, shares.get(split), split)
    if weighting in PER_EXAMPLE:
      used[f"undefined_{split}"] = undefined
  return MethodData(method, weighting, features, labels, used)


def split_features(weighting: str, logits: Mapping[str, np.ndarray],
                   meta_config: ml_collections.ConfigDict,
                   mean_shares: tuple[float, float] | None = None, shares: Shares | None = None,
                   split: str = "") -> tuple[np.ndarray, int]:
  """One weighting's meta-features of a set of examples (a split, or new products: the predictor
  calls this too, so they are made as the meta-model was trained), and how many examples fell back
  to the dataset shares. `mean_shares`: the validation means (every weighting but 'none');
  `shares`: the examples' own (PER_EXAMPLE)."""
  if weighting == "none":
    return weighted_features(logits, 1.0, 1.0, mmbt_weight=meta_config.mmbt_weight), 0
  undefined = 0
  if weighting == "dataset":
    text_share, image_share = mean_shares
  else:
    text_share, image_share, undefined = sample_shares(shares, mean_shares, split, weighting)
    if undefined:
      logging.warning("meta %s: %d %s examples have undefined MM-SHAP shares; they are weighted "
                      "with the dataset shares", METHOD_OF_WEIGHTING[weighting], undefined, split)
    if weighting == "complement":
      text_share, image_share = 1.0 - text_share, 1.0 - image_share
  return weighted_features(logits, text_share, image_share, mmbt_weight=meta_config.mmbt_weight,
                           append_shares=meta_config.append_shares), undefined
