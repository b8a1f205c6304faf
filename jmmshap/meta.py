r"""The MM-SHAP-weighted stacked ensemble (the paper's meta-learner) and the whole-pipeline job.

Stacking protocol (the paper's Algorithm 1). The base learners (text: BERT, image: ResNet, mmbt:
CLIP-MMBT) are trained on train only. Their logits on validation are the meta-model's training data,
and every reported number is on test, which neither the base learners nor the meta-model saw.

Meta-features. For example i with base logits z_text(i), z_image(i), z_mmbt(i) (each in R^C):

    13:  T_i, V_i = T-SHAP, V-SHAP of the MMBT's prediction    (W/mmshap/mmshap_{split}.npz)
    14:  u_i = [ T_i * z_text(i),  V_i * z_image(i) ]
    15:  x_i = [ u_i,  w_mm * z_mmbt(i) ]                      (+ [T_i, V_i] with meta.append_shares)
    16:  p(y | x_i) = softmax(W_2 relu(W_1 x_i + b_1) + b_2), trained on validation (3C -> 512 -> C)

`meta.weighting` picks T_i and V_i, and each weighting is its own meta-MLP and its own reported method:

  none     T_i = V_i = 1: plain stacking of the three learners' logits ('stacked').
  dataset  T_i = mean T-SHAP, V_i = mean V-SHAP over the validation examples MM-SHAP explained, for
           every validation and test example ('mmshap_dataset').
  sample   each example's own shares; needs MM-SHAP on every validation and test example
           ('mmshap_sample'). An example whose shares are undefined (every Shapley value 0, so T-SHAP
           is 0/0) gets the dataset shares; how many did is written to training.json and report.md.

w_mm is `meta.mmbt_weight` (1). `meta.append_shares` appends [T_i, V_i] to the weighted variants'
features only; 'stacked' stays the paper's plain 3C-feature baseline. A constant per-learner scale
(`dataset`) is something W_1 could absorb: it changes the meta-model through initialisation,
optimisation and weight decay only. `sample` weighting changes what the meta-model sees per example.
The features are not standardised: per-column standardisation would undo the dataset weighting.

Members, holdouts and cross-fitting. A meta-model is M members trained at once (`jax.vmap` over a
leading member axis), each on a weighted subset of validation:

  * default: one member trained on all of validation (the paper).
  * `meta.early_stopping`: one member trained on validation minus a stratified `holdout_fraction`;
    every `eval_every_steps` its cross-entropy on the held-out part is measured, the params of the
    lowest one are kept, and training ends after `patience` evaluations without improvement.
  * `meta.cross_fit = k` (beyond the paper): validation is split into k stratified folds (seeded);
    member j trains on every fold but j. Fold j is member j's held-out part: its predictions there
    are out-of-fold, so together they score the meta-model on all of validation without it having
    seen the scored examples (training.json, report.md), and with early stopping fold j decides
    member j's stopping point (which makes that score slightly optimistic). Test probabilities are
    the mean of the k members' softmax outputs.

The training loop is functional like `train_lib`'s: the steps between two evaluations run as one
jitted `jax.lax.scan` of full-batch steps (the paper's 50,000 epochs are 50,000 steps), examples
sharded over the `data` mesh axis, params replicated. Checkpoints are Orbax: `W/meta/<method>/
checkpoints/` holds the train state (params, optimizer state, the kept params), the progress and a
spec (classes, feature layout, training settings and a SHA-256 of the training features and labels).
A restarted run resumes from the newest checkpoint if the spec matches and starts over if it does not
(the upstream outputs or the settings changed); `--config.mode=eval` restores the kept params and
recomputes every reported number from the stored base logits and shares.

Outputs (`W/meta/`): metrics.json (test metrics per method: text, image, mmbt, average, stacked,
mmshap_dataset, mmshap_sample), report.md (Table II, MM-SHAP summary, per-class F1),
confusion_matrix.png (best method), per_class_f1.png (base learners, stacking and the best method),
training.json, config.json, and per method log.jsonl,
loss.png, accuracy.png and checkpoints/.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jmmshap import checkpoints, metrics, parallel, plots, train_lib
from jmmshap.models import initializers

LEARNERS = ("text", "image", "mmbt")
UPSTREAM = ("text", "image", "clip_pretrain", "mmbt", "mmshap")  # Those in config.stages, in order.
SPLITS = ("validation", "test")
WEIGHTINGS = ("none", "dataset", "sample")
METHOD_OF_WEIGHTING = {"none": "stacked", "dataset": "mmshap_dataset", "sample": "mmshap_sample"}
OUTPUT_DIR = "meta"
MMSHAP_DIR = "mmshap"
# Settings that change neither the trained meta-model nor its predictions: left out of the spec.
_BOOKKEEPING = ("weighting", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints")


# --------------------------------------------------------------------------------------------------
# Base learners' outputs and MM-SHAP shares.


@dataclasses.dataclass(frozen=True)
class SplitOutputs:
  """The three base learners' logits on one split, rows aligned by example id."""
  split: str
  ids: np.ndarray  # (N,) str, in the text learner's order.
  labels: np.ndarray  # (N,) int
  logits: dict[str, np.ndarray]  # learner -> (N, C) float32
  class_names: tuple[str, ...]
  paths: dict[str, str]  # learner -> the npz file read

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _load_npz(path: str, keys: Sequence[str], stage: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: run the {stage} stage into this workdir first "
                            f"(python train.py --config=configs/meta.py --workdir=... runs every "
                            "missing stage).")
  with np.load(path, allow_pickle=False) as data:
    missing = [key for key in keys if key not in data.files]
    if missing:
      raise ValueError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(data.files)}): it "
                       f"was not written by the {stage} stage; run that stage again.")
    return {key: data[key] for key in keys}


def _first(values: np.ndarray, count: int = 3) -> str:
  shown = ", ".join(repr(str(v)) for v in values[:count])
  return shown + (", ..." if len(values) > count else "")


def _check_class_names(reference: Sequence[str], reference_path: str, names: Sequence[str],
                       path: str) -> None:
  reference, names = list(reference), list(names)
  if reference == names:
    return
  if len(reference) != len(names) or set(reference) != set(names):
    raise ValueError(
        f"{path} has {len(names)} classes ({_first(np.asarray(names))}) but {reference_path} has "
        f"{len(reference)} ({_first(np.asarray(reference))}): every stage must be trained on the "
        "same dataset; rerun the stages whose data differ (--config.rerun=...).")
  index = next(i for i, (a, b) in enumerate(zip(reference, names, strict=True)) if a != b)
  raise ValueError(
      f"{path} and {reference_path} list the same classes in a different order (index {index}: "
      f"{names[index]!r} vs {reference[index]!r}), so their logit columns mean different classes: "
      "rerun the stages whose data differ (--config.rerun=...).")


def _check_finite(values: np.ndarray, ids: np.ndarray, path: str, what: str, fix: str) -> None:
  bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
  if bad.any():
    row = int(np.argmax(bad))
    raise ValueError(f"{path}: {int(bad.sum())} of {len(bad)} rows of {what} are NaN or infinite "
                     f"(first: row {row}, id {str(ids[row])!r}); {fix}")


def _check_unique(ids: np.ndarray, path: str) -> None:
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"{path}: ids {_first(unique[counts > 1])} occur more than once; each example "
                     "must have one row. Rerun the stage that wrote it.")


def load_base_outputs(workdir: str, split: str) -> SplitOutputs:
  """The text, image and mmbt logits of a split, checked to describe the same examples and classes."""
  reference = None
  logits, paths = {}, {}
  for learner in LEARNERS:
    path = os.path.join(train_lib.stage_dir(workdir, learner), f"logits_{split}.npz")
    arrays = _load_npz(path, ("logits", "labels", "ids", "class_names"), learner)
    ids, labels = arrays["ids"].astype(str), arrays["labels"].astype(np.int32)
    class_names = [str(name) for name in arrays["class_names"]]
    values = arrays["logits"]
    if values.ndim != 2 or values.shape != (len(ids), len(class_names)) or len(labels) != len(ids):
      raise ValueError(f"{path}: logits {values.shape}, {len(ids)} ids, {len(labels)} labels and "
                       f"{len(class_names)} class names do not fit together; rerun the {learner} stage.")
    _check_finite(values, ids, path, "logits",
                  f"the {learner} model diverged or its checkpoint is broken: retrain it "
                  f"(--config.rerun={learner}).")
    _check_unique(ids, path)
    if reference is None:
      reference = {"ids": ids, "labels": labels, "class_names": class_names, "path": path}
      order = np.arange(len(ids))
    else:
      _check_class_names(reference["class_names"], reference["path"], class_names, path)
      order = _align(reference["ids"], reference["path"], ids, path)
      mismatch = labels[order] != reference["labels"]
      if mismatch.any():
        row = int(np.argmax(mismatch))
        raise ValueError(
            f"{path} labels example {str(reference['ids'][row])!r} as class {int(labels[order][row])} but "
            f"{reference['path']} as class {int(reference['labels'][row])}: the stages read "
            "different data; rerun the stages whose data differ (--config.rerun=...).")
    logits[learner] = values[order].astype(np.float32)
    paths[learner] = path
  return SplitOutputs(split, reference["ids"], reference["labels"], logits,
                      tuple(reference["class_names"]), paths)


def _align(reference_ids: np.ndarray, reference_path: str, ids: np.ndarray, path: str) -> np.ndarray:
  """Row order that puts `ids` in `reference_ids`' order; both must hold the same examples."""
  position = {example_id: row for row, example_id in enumerate(ids)}
  missing = np.asarray([i for i in reference_ids if i not in position])
  extra = np.setdiff1d(ids, reference_ids)
  if len(missing) or len(extra):
    raise ValueError(
        f"{path} and {reference_path} do not hold the same examples: {len(missing)} ids of the "
        f"second are missing from the first ({_first(missing)}) and {len(extra)} are extra "
        f"({_first(extra)}). The stages were evaluated on different data; rerun the stages whose "
        "data differ (--config.rerun=...).")
  return np.asarray([position[i] for i in reference_ids], np.int64)


@dataclasses.dataclass(frozen=True)
class Shares:
  """The MMBT's MM-SHAP shares on one split, in the rows of a `SplitOutputs`."""
  t_shap: np.ndarray  # (N,) NaN where not computed or undefined.
  v_shap: np.ndarray
  explained: np.ndarray  # (N,) bool: MM-SHAP ran on this example.
  path: str

  @property
  def defined(self) -> np.ndarray:
    return self.explained & np.isfinite(self.t_shap) & np.isfinite(self.v_shap)


def load_shares(workdir: str, outputs: SplitOutputs) -> Shares:
  """T-SHAP and V-SHAP of `W/mmshap/mmshap_{split}.npz`, checked against the base learners' ids."""
  path = os.path.join(workdir, MMSHAP_DIR, f"mmshap_{outputs.split}.npz")
  arrays = _load_npz(path, ("ids", "t_shap", "v_shap"), "mmshap")
  ids = arrays["ids"].astype(str)
  t_shap, v_shap = arrays["t_shap"].astype(np.float64), arrays["v_shap"].astype(np.float64)
  if t_shap.shape != ids.shape or v_shap.shape != ids.shape:
    raise ValueError(f"{path}: {len(ids)} ids but t_shap {t_shap.shape} and v_shap {v_shap.shape}; "
                     "rerun the mmshap stage (--config.rerun=mmshap).")
  _check_unique(ids, path)
  with np.load(path, allow_pickle=False) as data:
    if "class_names" in data.files:
      _check_class_names(outputs.class_names, outputs.paths["mmbt"],
                         [str(name) for name in data["class_names"]], path)
  row_of = {example_id: row for row, example_id in enumerate(outputs.ids)}
  unknown = np.asarray([i for i in ids if i not in row_of])
  if len(unknown):
    raise ValueError(
        f"{path} explains {len(unknown)} examples that {outputs.paths['mmbt']} does not hold "
        f"({_first(unknown)}): MM-SHAP ran on other data or another model; rerun it "
        "(--config.rerun=mmshap).")
  rows = np.asarray([row_of[i] for i in ids], np.int64)
  count = len(outputs.ids)
  explained = np.zeros(count, bool)
  explained[rows] = True
  t_full, v_full = np.full(count, np.nan), np.full(count, np.nan)
  t_full[rows], v_full[rows] = t_shap, v_shap
  return Shares(t_full, v_full, explained, path)


def dataset_shares(shares: Shares) -> tuple[float, float]:
  """Mean T-SHAP and V-SHAP over the examples with defined shares."""
  defined = shares.defined
  if not defined.any():
    raise ValueError(f"{shares.path}: no example has defined MM-SHAP shares (every Shapley value 0 "
                     "or none computed), so there are no dataset shares to weight with; check the "
                     "mmbt model and rerun mmshap (--config.rerun=mmbt,mmshap).")
  return float(shares.t_shap[defined].mean()), float(shares.v_shap[defined].mean())


def sample_shares(shares: Shares, fallback: tuple[float, float],
                  split: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Per-example (T, V) for `sample` weighting; undefined shares -> `fallback`; and how many were."""
  if not shares.explained.all():
    missing = np.flatnonzero(~shares.explained)
    raise ValueError(
        f"{shares.path} has MM-SHAP for {int(shares.explained.sum())} of {len(shares.explained)} "
        f"{split} examples (first missing: row {int(missing[0])}); meta.weighting 'sample' needs "
        "every example's shares: rerun mmshap on all of them (--config.stages.mmshap.max_examples=0 "
        "--config.rerun=mmshap) or drop 'sample' from --config.meta.weighting.")
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
  labels = {split: outputs[split].labels for split in SPLITS}
  if weighting == "none":
    features = {split: weighted_features(outputs[split].logits, 1.0, 1.0,
                                         mmbt_weight=meta_config.mmbt_weight)
                for split in SPLITS}
    return MethodData(method, weighting, features, labels, {})
  mean_shares = dataset_shares(shares["validation"])
  used = {"dataset_t_shap": mean_shares[0], "dataset_v_shap": mean_shares[1],
          "dataset_examples": int(shares["validation"].defined.sum())}
  features = {}
  for split in SPLITS:
    if weighting == "dataset":
      text_share, image_share = mean_shares
    else:
      text_share, image_share, undefined = sample_shares(shares[split], mean_shares, split)
      used[f"undefined_{split}"] = undefined
      if undefined:
        logging.warning("meta %s: %d %s examples have undefined MM-SHAP shares; they are weighted "
                        "with the dataset shares", method, undefined, split)
    features[split] = weighted_features(outputs[split].logits, text_share, image_share,
                                        mmbt_weight=meta_config.mmbt_weight,
                                        append_shares=meta_config.append_shares)
  return MethodData(method, weighting, features, labels, used)


# --------------------------------------------------------------------------------------------------
# The meta-MLP and which validation examples each member trains on.


class MetaMLP(nnx.Module):
  """Algorithm line 16: one hidden ReLU layer over the stacked (weighted) base-learner logits."""

  def __init__(self, num_features: int, num_classes: int, hidden_size: int = 512, *,
               rngs: nnx.Rngs):
    # LeCun normal kernels, drawn flat: XLA:CPU compiles multi-dimensional draws slowly.
    kernel_init = initializers.conv_kernel(1.0, "fan_in")
    self.hidden = nnx.Linear(num_features, hidden_size, kernel_init=kernel_init, rngs=rngs)
    self.output = nnx.Linear(hidden_size, num_classes, kernel_init=kernel_init, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    return self.output(jax.nn.relu(self.hidden(features)))


def stratified_folds(labels: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
  """Fold index per example; each class dealt round-robin (continuing across classes) after a shuffle."""
  if not 2 <= num_folds <= len(labels):
    raise ValueError(f"meta.cross_fit={num_folds}: use 0 (off) or 2 to {len(labels)} (the number of "
                     "validation examples).")
  rng = np.random.default_rng(seed)
  folds = np.empty(len(labels), np.int32)
  offset = 0
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    rng.shuffle(members)
    folds[members] = (np.arange(len(members)) + offset) % num_folds
    offset += len(members)
  return folds


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Held-out mask: round(fraction * n) examples of each class with n >= 2, at least one."""
  if not 0 < fraction < 1:
    raise ValueError(f"meta.holdout_fraction={fraction}: early stopping needs a fraction in (0, 1).")
  rng = np.random.default_rng(seed)
  holdout = np.zeros(len(labels), bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    if len(members) >= 2:
      rng.shuffle(members)
      holdout[members[:min(len(members) - 1, max(1, round(fraction * len(members))))]] = True
  return holdout


def member_masks(labels: np.ndarray, meta_config: ml_collections.ConfigDict,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, holdout) masks, each (members, N) bool over validation; see the module docstring."""
  count = len(labels)
  if meta_config.cross_fit:
    folds = stratified_folds(labels, meta_config.cross_fit, seed)
    holdout = folds[None, :] == np.arange(meta_config.cross_fit)[:, None]
    return ~holdout, holdout
  if meta_config.early_stopping:
    holdout = stratified_holdout(labels, meta_config.holdout_fraction, seed)[None, :]
    return ~holdout, holdout
  return np.ones((1, count), bool), np.zeros((1, count), bool)


# --------------------------------------------------------------------------------------------------
# Pure steps.


def make_train_chunk(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                     num_steps: int) -> Callable:
  """(params, opt_state, features, labels, weights) -> (params, opt_state, per-step metrics).

  `num_steps` full-batch steps of every member (leading axis of params, opt_state and weights) as
  one `lax.scan`. The loss is each member's weighted mean cross-entropy; padding rows weigh 0.
  """

  def member_loss(params, features, labels, weights):
    logits = nnx.merge(graphdef, params)(features)
    total = jnp.maximum(weights.sum(), 1.0)
    loss = (train_lib.cross_entropy(logits, labels) * weights).sum() / total
    accuracy = ((jnp.argmax(logits, -1) == labels) * weights).sum() / total
    return loss, accuracy

  def member_step(params, opt_state, features, labels, weights):
    (loss, accuracy), grads = jax.value_and_grad(member_loss, has_aux=True)(
        params, features, labels, weights)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  every_member = jax.vmap(member_step, in_axes=(0, 0, None, None, 0))

  def train_chunk(params, opt_state, features, labels, weights):
    def body(carry, _):
      params, opt_state, loss, accuracy = every_member(*carry, features, labels, weights)
      return (params, opt_state), {"loss": loss, "accuracy": accuracy}

    (params, opt_state), history = jax.lax.scan(body, (params, opt_state), length=num_steps)
    return params, opt_state, history

  return train_chunk


def make_predict(graphdef: nnx.GraphDef) -> Callable:
  """(params, features) -> softmax probabilities of every member, (members, N, C)."""

  def predict(params, features):
    logits = jax.vmap(lambda member: nnx.merge(graphdef, member)(features))(params)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return predict


@functools.partial(jax.jit, donate_argnums=0)
def _keep_improved(kept: Any, params: Any, improved: jax.Array) -> Any:
  """Each member's kept params, replaced by its current ones where `improved`."""
  def select(old, new):
    return jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return jax.tree.map(select, kept, params)


# --------------------------------------------------------------------------------------------------
# Training and restoring one method's meta-model.


def _training_settings(meta_config: ml_collections.ConfigDict, seed: int) -> dict:
  settings = json.loads(meta_config.to_json())
  return {**{key: settings[key] for key in sorted(settings) if key not in _BOOKKEEPING},
          "seed": seed}


def features_sha256(data: MethodData) -> str:
  """Identifies the meta-model's training data: the validation meta-features and labels."""
  digest = hashlib.sha256()
  digest.update(np.ascontiguousarray(data.features["validation"], np.float32).tobytes())
  digest.update(np.asarray(data.labels["validation"], np.int64).tobytes())
  return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _graphdef(num_features: int, num_classes: int, hidden_size: int) -> nnx.GraphDef:
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: MetaMLP(num_features, num_classes, hidden_size, rngs=nnx.Rngs(0))))
  return graphdef


# The compiled programs are cached by what they depend on, so the three weightings (same shapes)
# and a restore right after training compile each program once.


@functools.lru_cache(maxsize=None)
def _init_fn(num_features: int, num_classes: int, hidden_size: int,
             mesh: jax.sharding.Mesh) -> Callable:
  """keys (members,) -> fresh params with a leading member axis, replicated."""

  def init(key):
    return nnx.as_pure(nnx.state(MetaMLP(num_features, num_classes, hidden_size,
                                         rngs=nnx.Rngs(params=key))))

  return jax.jit(jax.vmap(init), out_shardings=parallel.replicated(mesh))


def _optimizer(optimizer_json: str, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
  return train_lib.make_optimizer(ml_collections.ConfigDict(json.loads(optimizer_json)), total_steps)


@functools.lru_cache(maxsize=None)
def _opt_init_fn(optimizer_json: str, total_steps: int, mesh: jax.sharding.Mesh) -> Callable:
  optimizer, _ = _optimizer(optimizer_json, total_steps)
  return jax.jit(jax.vmap(optimizer.init), out_shardings=parallel.replicated(mesh))


@functools.lru_cache(maxsize=None)
def _train_chunk_fn(graphdef: nnx.GraphDef, optimizer_json: str, total_steps: int, length: int,
                    mesh: jax.sharding.Mesh) -> Callable:
  optimizer, _ = _optimizer(optimizer_json, total_steps)
  replicated = parallel.replicated(mesh)
  rows = lambda *spec: NamedSharding(mesh, P(*spec))
  return jax.jit(
      make_train_chunk(graphdef, optimizer, length),
      in_shardings=(replicated, replicated, rows(parallel.DATA_AXIS, None), rows(parallel.DATA_AXIS),
                    rows(None, parallel.DATA_AXIS)),
      out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _predict_fn(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh) -> Callable:
  return jax.jit(make_predict(graphdef), out_shardings=parallel.replicated(mesh))


@dataclasses.dataclass
class _Model:
  """A method's meta-model: its structure, its spec, and how to make fresh members."""
  graphdef: nnx.GraphDef
  init: Callable  # keys -> params
  spec: dict
  mesh: jax.sharding.Mesh

  @property
  def num_members(self) -> int:
    return self.spec["members"]

  def keys(self, seed: int) -> jax.Array:
    return jax.random.split(jax.random.key(seed), self.num_members)


def _build(data: MethodData, meta_config: ml_collections.ConfigDict, seed: int,
           class_names: Sequence[str], num_members: int) -> _Model:
  num_features = data.features["validation"].shape[1]
  num_classes = len(class_names)
  hidden = meta_config.hidden_size
  mesh = parallel.make_mesh()
  spec = {"method": data.method, "weighting": data.weighting, "num_classes": num_classes,
          "class_names": list(class_names), "num_features": num_features, "hidden_size": hidden,
          "members": num_members, "settings": _training_settings(meta_config, seed),
          "features_sha256": features_sha256(data)}
  return _Model(_graphdef(num_features, num_classes, hidden),
                _init_fn(num_features, num_classes, hidden, mesh), spec, mesh)


def _sharded_rows(array: np.ndarray, mesh: jax.sharding.Mesh, axis: int = 0) -> jax.Array:
  """A host array with every process holding all of it -> split over `data` along `axis`."""
  spec = [None] * array.ndim
  spec[axis] = parallel.DATA_AXIS
  return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P(*spec)),
                                      lambda index: array[index])


def _pad_rows(array: np.ndarray, multiple: int, axis: int = 0) -> np.ndarray:
  missing = -array.shape[axis] % multiple
  if not missing:
    return array
  widths = [(0, 0)] * array.ndim
  widths[axis] = (0, missing)
  return np.pad(array, widths)


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.StandardCheckpointHandler(), "progress": ocp.JsonCheckpointHandler(),
          "spec": ocp.JsonCheckpointHandler()}


def _manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  return checkpoints.manager(os.path.join(directory, "checkpoints"), _handlers(), max_to_keep=keep,
                             create=True)


def _restore_json(manager: ocp.CheckpointManager, step: int, *items: str) -> dict:
  return manager.restore(step, args=ocp.args.Composite(
      **{item: ocp.args.JsonRestore() for item in items}))


def _remove(*paths: str) -> None:
  """Deletes files or folders once (process 0), and every process waits until they are gone."""
  if jax.process_index() == 0:
    for path in paths:
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jmmshap.meta: removed {paths}")


def _json_loss(value: float) -> float | None:
  return None if not np.isfinite(value) else float(value)


def train(data: MethodData, meta_config: ml_collections.ConfigDict, directory: str, seed: int,
          class_names: Sequence[str]) -> dict:
  """Trains (or resumes, or finds finished) one method's meta-model in `directory`; its progress."""
  train_mask, holdout_mask = member_masks(data.labels["validation"], meta_config, seed)
  model = _build(data, meta_config, seed, class_names, len(train_mask))
  mesh, replicated = model.mesh, parallel.replicated(model.mesh)
  total_steps = meta_config.num_steps
  every = meta_config.eval_every_steps
  checkpoint_every = meta_config.checkpoint_every_steps
  if total_steps < 1 or every < 1 or checkpoint_every < every or checkpoint_every % every:
    raise ValueError(
        f"meta.num_steps={total_steps}, eval_every_steps={every}, checkpoint_every_steps="
        f"{checkpoint_every}: all must be positive and checkpoint_every_steps a multiple of "
        "eval_every_steps.")
  optimizer_json = meta_config.optimizer.to_json()
  _, schedule = _optimizer(optimizer_json, total_steps)
  params = model.init(model.keys(seed))
  # The kept params are a copy: the train chunk donates (and so deletes) the params it is given.
  state = {"params": params, "opt_state": _opt_init_fn(optimizer_json, total_steps, mesh)(params),
           "kept": jax.tree.map(jnp.copy, params)}
  progress = {"step": 0, "finished": False, "kept_loss": [None] * model.num_members,
              "kept_step": [0] * model.num_members, "evals_since_improvement": [0] * model.num_members}

  os.makedirs(directory, exist_ok=True)
  manager = _manager(directory, meta_config.keep_checkpoints)
  logger = train_lib.Logger(os.path.join(directory, "log.jsonl"))
  latest = manager.latest_step()
  if latest is not None:
    saved = _restore_json(manager, latest, "spec")["spec"]
    if saved != model.spec:
      logging.warning("meta %s: the checkpoint in %s was trained on other base outputs or settings "
                      "(%s); training from scratch.", data.method, directory,
                      _spec_difference(saved, model.spec))
      manager.close()
      _remove(os.path.join(directory, "checkpoints"), logger.path)
      manager = _manager(directory, meta_config.keep_checkpoints)
      logger = train_lib.Logger(logger.path)
    else:
      restored = manager.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(state, replicated)),
          progress=ocp.args.JsonRestore()))
      state, progress = restored["state"], restored["progress"]
      logger.truncate_after(progress["step"])
      logging.info("meta %s: resumed at step %d of %d", data.method, progress["step"], total_steps)
  if progress["finished"]:
    manager.close()
    return progress

  devices = jax.device_count()
  features = _sharded_rows(_pad_rows(data.features["validation"], devices), mesh)
  labels = _sharded_rows(_pad_rows(data.labels["validation"].astype(np.int32), devices), mesh)
  weights = _sharded_rows(_pad_rows(train_mask.astype(np.float32), devices, axis=1), mesh, axis=1)
  predict = _predict_fn(model.graphdef, mesh)
  has_holdout = bool(holdout_mask.any())
  early_stopping = has_holdout and meta_config.early_stopping
  kept_loss = np.asarray([np.inf if v is None else v for v in progress["kept_loss"]])
  kept_step = np.asarray(progress["kept_step"])
  evals_since_improvement = np.asarray(progress["evals_since_improvement"])
  step = progress["step"]
  bar = tqdm(total=total_steps, initial=step, desc=f"meta {data.method}", unit="step",
             disable=jax.process_index() != 0, dynamic_ncols=True)
  log_every = max(1, meta_config.log_every_steps)
  while step < total_steps:
    length = min(every, total_steps - step)
    train_chunk = _train_chunk_fn(model.graphdef, optimizer_json, total_steps, length, mesh)
    params, opt_state, history = train_chunk(state["params"], state["opt_state"], features, labels,
                                             weights)
    history = jax.device_get(history)
    for offset in range(length):
      if (step + offset + 1) % log_every == 0 or offset == length - 1:
        logger.write({"split": "train", "step": step + offset + 1,
                      "loss": float(history["loss"][offset].mean()),
                      "accuracy": float(history["accuracy"][offset].mean()),
                      "learning_rate": float(schedule(step + offset))})
    step += length
    improved = np.ones(model.num_members, bool)  # Without early stopping the last params are kept.
    if has_holdout:
      probabilities = np.asarray(predict(params, features))[:, :len(data.labels["validation"])]
      loss, accuracy = _holdout_scores(probabilities, data.labels["validation"], holdout_mask)
      if early_stopping:
        improved = loss < kept_loss
        evals_since_improvement = np.where(improved, 0, evals_since_improvement + 1)
      kept_loss = np.where(improved, loss, kept_loss)
      logger.write({"split": "validation", "step": step, "loss": float(loss.mean()),
                    "accuracy": float(accuracy.mean())})
      bar.set_postfix(loss=f"{history['loss'][-1].mean():.4f}", held_out=f"{loss.mean():.4f}")
    else:
      bar.set_postfix(loss=f"{history['loss'][-1].mean():.4f}")
    kept_step = np.where(improved, step, kept_step)
    kept = _keep_improved(state["kept"], params, jnp.asarray(improved))
    state = {"params": params, "opt_state": opt_state, "kept": kept}
    bar.update(length)
    stop = early_stopping and bool((evals_since_improvement >= meta_config.patience).all())
    finished = step >= total_steps or stop
    progress = {"step": step, "finished": bool(finished),
                "kept_loss": [_json_loss(v) for v in kept_loss], "kept_step": kept_step.tolist(),
                "evals_since_improvement": evals_since_improvement.tolist()}
    if step % checkpoint_every == 0 or finished:
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress),
          spec=ocp.args.JsonSave(model.spec)))
    if stop:
      logging.info("meta %s: early stop at step %d (held-out loss best at steps %s)", data.method,
                   step, kept_step.tolist())
      break
  bar.close()
  manager.wait_until_finished()
  manager.close()
  if jax.process_index() == 0:
    plots.training_curves(logger.records, os.path.join(directory, ""), f"meta-MLP {data.method}")
  return progress


def _holdout_scores(probabilities: np.ndarray, labels: np.ndarray,
                    holdout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per member: mean cross-entropy and accuracy on its held-out examples."""
  picked = np.take_along_axis(probabilities, labels[None, :, None], axis=-1)[..., 0]
  nll = -np.log(np.maximum(picked.astype(np.float64), 1e-12))
  correct = probabilities.argmax(-1) == labels[None, :]
  counts = np.maximum(holdout.sum(axis=1), 1)
  return (nll * holdout).sum(axis=1) / counts, (correct * holdout).sum(axis=1) / counts


def _spec_difference(saved: dict, current: dict) -> str:
  saved, current = _flatten(saved), _flatten(current)
  keys = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
  return ", ".join(f"{key}: {_short(saved.get(key))} -> {_short(current.get(key))}" for key in keys)


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def restore(data: MethodData, meta_config: ml_collections.ConfigDict, directory: str, seed: int,
            class_names: Sequence[str]) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
  """The finished meta-model in `directory` as `features -> probabilities` (members averaged).

  Refuses a checkpoint for another class count, feature layout or training data, and an unfinished
  one, naming the folder and what to run.
  """
  path = os.path.join(directory, "checkpoints")
  manager = checkpoints.manager(path, _handlers())
  latest = manager.latest_step()
  if latest is None:
    manager.close()
    raise FileNotFoundError(f"{path}: no meta checkpoint to restore; train the meta stage first "
                            "(run without --config.mode=eval).")
  saved = _restore_json(manager, latest, "spec", "progress")
  spec, progress = saved["spec"], saved["progress"]
  num_classes = len(class_names)
  if spec["num_classes"] != num_classes or spec["class_names"] != list(class_names):
    manager.close()
    raise ValueError(
        f"{path} holds a meta-model for {spec['num_classes']} classes "
        f"({_first(np.asarray(spec['class_names']))}) but the base learners' logits "
        f"({data.method}) have {num_classes} ({_first(np.asarray(class_names))}): the checkpoint "
        "belongs to another dataset; train the meta stage again (--config.mode=train) or use the "
        "workdir it was trained in.")
  members = spec["members"]
  model = _build(data, meta_config, seed, class_names, members)
  if spec != model.spec:
    manager.close()
    raise ValueError(
        f"{path} was trained on other meta-features or settings than the ones in this workdir and "
        f"config ({_spec_difference(spec, model.spec)}): train the meta stage again "
        "(--config.mode=train) to match them.")
  if not progress["finished"]:
    manager.close()
    raise ValueError(f"{path}: training stopped at step {progress['step']} of "
                     f"{meta_config.num_steps}; finish it first (run without --config.mode=eval).")
  replicated = parallel.replicated(model.mesh)
  params = jax.eval_shape(model.init, model.keys(seed))
  optimizer_json = meta_config.optimizer.to_json()
  template = {"params": params, "kept": params,
              "opt_state": jax.eval_shape(_opt_init_fn(optimizer_json, meta_config.num_steps,
                                                       model.mesh), params)}
  state = manager.restore(latest, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(template, replicated))))["state"]
  manager.close()
  predict = _predict_fn(model.graphdef, model.mesh)
  devices = jax.device_count()

  def probabilities(features: np.ndarray) -> np.ndarray:
    padded = _sharded_rows(_pad_rows(features.astype(np.float32), devices), model.mesh)
    return np.asarray(predict(state["kept"], padded))[:, :len(features)]

  return probabilities, progress


# --------------------------------------------------------------------------------------------------
# The stage: upstream stages, meta-models, report.


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


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


def evaluate_methods(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Trains (train mode) or restores (eval mode) every weighting's meta-model; writes the report."""
  meta_config = config.meta
  weightings = parse_weightings(meta_config.weighting)
  directory = os.path.join(workdir, config.get("output_dir") or OUTPUT_DIR)
  os.makedirs(directory, exist_ok=True)
  outputs = {split: load_base_outputs(workdir, split) for split in SPLITS}
  _check_class_names(outputs["validation"].class_names, outputs["validation"].paths["text"],
                     outputs["test"].class_names, outputs["test"].paths["text"])
  class_names = outputs["test"].class_names
  num_classes = len(class_names)
  needs_shares = any(weighting != "none" for weighting in weightings)
  shares_path = os.path.join(workdir, MMSHAP_DIR, "mmshap_validation.npz")
  shares = None
  if needs_shares or os.path.isfile(shares_path):
    shares = {"validation": load_shares(workdir, outputs["validation"])}
    test_path = os.path.join(workdir, MMSHAP_DIR, "mmshap_test.npz")
    if "sample" in weightings or os.path.isfile(test_path):
      shares["test"] = load_shares(workdir, outputs["test"])

  test_labels = outputs["test"].labels
  probabilities = {learner: _softmax(outputs["test"].logits[learner]) for learner in LEARNERS}
  probabilities["average"] = np.mean([probabilities[learner] for learner in LEARNERS], axis=0)
  training = {}
  for weighting in weightings:
    data = method_data(outputs, shares, weighting, meta_config)
    method_dir = os.path.join(directory, data.method)
    if config.mode == "train":
      train(data, meta_config, method_dir, config.seed, class_names)
    predict, progress = restore(data, meta_config, method_dir, config.seed, class_names)
    members = predict(data.features["test"])
    probabilities[data.method] = members.mean(axis=0)
    _, holdout = member_masks(data.labels["validation"], meta_config, config.seed)
    training[data.method] = {
        "weighting": data.weighting, "num_features": int(data.features["test"].shape[1]),
        "members": int(len(holdout)), "steps": progress["step"], "kept_steps": progress["kept_step"],
        "held_out_validation": _validation_scores(predict(data.features["validation"]),
                                                  data.labels["validation"], holdout, num_classes),
        **data.shares}

  methods = list(probabilities)
  predictions = {method: probabilities[method].argmax(-1) for method in methods}
  report = {"methods": {method: metrics.classification_metrics(test_labels, predictions[method],
                                                               num_classes)
                        for method in methods}}
  best = max(methods, key=lambda method: report["methods"][method]["f1_macro"])
  if jax.process_index() == 0:
    with open(os.path.join(directory, "metrics.json"), "w") as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(directory, "training.json"), "w") as f:
      json.dump(training, f, indent=2)
    plots.confusion_matrix(
        metrics.confusion_matrix(test_labels, predictions[best], num_classes), class_names,
        os.path.join(directory, "confusion_matrix.png"), f"{best} (test)")
    per_class_f1 = {method: metrics.per_class(test_labels, predictions[method], num_classes)["f1"]
                    for method in methods}
    shown = [m for m in ("text", "image", "mmbt", "stacked", best) if m in per_class_f1]
    plots.per_class_f1({m: per_class_f1[m] for m in dict.fromkeys(shown)}, class_names,
                       os.path.join(directory, "per_class_f1.png"), "per-class F1 (test)")
    with open(os.path.join(directory, "report.md"), "w") as f:
      f.write(render_report(report, per_class_f1, shares, outputs, training, best))
  for method in methods:
    logging.info("meta test %s: %s", method, json.dumps(report["methods"][method]))
  return report


_TABLE_COLUMNS = (("accuracy", "accuracy"), ("precision_macro", "P macro"), ("recall_macro", "R macro"),
                  ("f1_macro", "F1 macro"), ("precision_weighted", "P weighted"),
                  ("recall_weighted", "R weighted"), ("f1_weighted", "F1 weighted"))


def _class_t_shap(shares: Shares, labels: np.ndarray, label: int) -> str:
  members = shares.defined & (labels == label)
  mean = f"{shares.t_shap[members].mean():.3f}" if members.any() else "n/a"
  return f"{mean} | {int(members.sum())}"


def render_report(report: dict, per_class_f1: Mapping[str, np.ndarray],
                  shares: Mapping[str, Shares] | None, outputs: Mapping[str, SplitOutputs],
                  training: Mapping[str, dict], best: str) -> str:
  """report.md: Table II, the MM-SHAP summary, per-class F1 and how each meta-model was trained."""
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
            "MM-SHAP-weighted logits (dataset means / each example's own shares).", ""]
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
    for split in SPLITS:
      if info.get(f"undefined_{split}"):
        text += f"; {info[f'undefined_{split}']} {split} examples with undefined shares"
    if held_out:
      text += (f"; held-out validation ({held_out['examples']} examples): macro F1 "
               f"{held_out['f1_macro']:.4f}, accuracy {held_out['accuracy']:.4f}")
    lines.append(text + ".")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The whole pipeline.


def parse_rerun(value: str) -> set[str]:
  names = {name.strip() for name in value.split(",") if name.strip()}
  unknown = sorted(names - set(UPSTREAM))
  if unknown:
    raise ValueError(f"rerun={value!r}: unknown stage(s) {', '.join(unknown)}; use a comma-separated "
                     f"subset of {', '.join(UPSTREAM)}.")
  return names


def final_outputs(workdir: str, stage: str) -> list[str]:
  """The files whose presence means a stage finished (and is reused)."""
  directory = train_lib.stage_dir(workdir, stage)
  if stage == "mmshap":
    names = [f"mmshap_{split}.npz" for split in SPLITS]
  elif stage == "clip_pretrain":
    names = ["metrics.json", os.path.join("export", "model.safetensors")]
  else:
    names = ["metrics.json"] + [f"logits_{split}.npz" for split in SPLITS]
  return [os.path.join(directory, name) for name in names]


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_differences(workdir: str, stage: str, stage_config: ml_collections.ConfigDict) -> list[str]:
  """Settings in which a stage's saved config.json differs from the one requested now."""
  path = os.path.join(train_lib.stage_dir(workdir, stage), "config.json")
  if not os.path.isfile(path):
    return []
  from jmmshap import stages  # pylint: disable=g-import-not-at-top  (stages dispatches to this module)
  with open(path) as f:
    saved = _flatten(json.load(f))
  requested = _flatten(json.loads(stages.resolve_workdir_paths(stage_config, workdir).to_json()))
  return [f"{key}: {saved[key]!r} there, {requested[key]!r} now"
          for key in sorted(set(saved) & set(requested))
          if key != "mode" and saved[key] != requested[key]]


def run_upstream(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Runs the upstream stages whose outputs are missing (or asked for again), in UPSTREAM's order.

  A finished stage is reused; one asked for with `rerun` is deleted and run from scratch; mmshap
  also reruns when the mmbt it explained is newer than its outputs. Returns the stages run.
  """
  from jmmshap import stages  # pylint: disable=g-import-not-at-top  (stages dispatches to this module)

  rerun = parse_rerun(config.rerun)
  ran = []
  for stage in UPSTREAM:
    if stage not in config.stages:
      continue
    stage_config = config.stages[stage]
    directory = train_lib.stage_dir(workdir, stage)
    outputs = final_outputs(workdir, stage)
    if stage in rerun and os.path.isdir(directory):
      logging.info("meta: --config.rerun names %s: deleting %s and running it again", stage, directory)
      _remove(directory)
    differences = config_differences(workdir, stage, stage_config)
    if differences:
      raise ValueError(
          f"{directory} was trained with other settings than config.stages.{stage} asks for "
          f"({'; '.join(differences[:5])}{'; ...' if len(differences) > 5 else ''}): add {stage} "
          f"to --config.rerun to train it again, or use another --workdir.")
    done = all(os.path.isfile(path) for path in outputs)
    if done and stage == "mmshap":
      mmbt_finished = os.path.getmtime(final_outputs(workdir, "mmbt")[0])
      if "mmbt" in ran or min(os.path.getmtime(path) for path in outputs) < mmbt_finished:
        logging.info("meta: %s explains an older mmbt; running mmshap again", directory)
        done = False
    if done:
      logging.info("meta: reusing the finished %s stage in %s", stage, directory)
      continue
    logging.info("meta: running the %s stage into %s", stage, directory)
    stages.run(stage_config, workdir)
    ran.append(stage)
  return ran


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The main job: missing upstream stages (train mode), then every weighting's meta-model."""
  if config.mode not in ("train", "eval"):
    raise ValueError(f"config.mode={config.mode!r}: use 'train' or 'eval'")
  parse_weightings(config.meta.weighting)
  if config.mode == "train":
    run_upstream(config, workdir)
  directory = os.path.join(workdir, config.get("output_dir") or OUTPUT_DIR)
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() == 0 and config.mode == "train":
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  return evaluate_methods(workdir, config)
