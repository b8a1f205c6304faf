r"""The meta-learner: an MLP stacked on the base learners' (weighted) logits (Algorithm 1, line 16).

    p(y | x_i) = softmax(W_2 relu(W_1 x_i + b_1) + b_2),   trained on validation (3C -> 512 -> C)

where x_i are one weighting's meta-features (`weighting.py`). The base learners are trained on train
only; their logits on validation are the meta-model's training data, and every reported number is
on test, which neither the base learners nor the meta-model saw.

Members, holdouts and cross-fitting. A meta-model is M members trained at once (`jax.vmap` over a
leading member axis), each on a weighted subset of validation:

  * `meta.cross_fit = 0`: one member trained on all of validation (the paper; `,paper` and
    `,meta_paper` in configs/meta.py).
  * `meta.early_stopping` with `cross_fit = 0`: one member trained on validation minus a stratified
    `holdout_fraction`; every `eval_every_steps` its cross-entropy on the held-out part is
    measured, the params of the lowest one are kept, and training ends after `patience`
    evaluations without improvement.
  * `meta.cross_fit = k` (beyond the paper; 5 by default): validation is split into k stratified
    folds (seeded); member j trains on every fold but j. Fold j is member j's held-out part: its
    predictions there are out-of-fold, so together they score the meta-model on all of validation
    without it having seen the scored examples (training.json, report.md; the scores that choose
    predict's default method, `ensemble.select_method`), and with early stopping fold j decides
    member j's stopping point (which makes that score slightly optimistic). Test probabilities are
    the mean of the k members' softmax outputs.

The training loop is functional like `train_lib`'s, but full-batch: the steps between two
evaluations run as one jitted `jax.lax.scan` (the paper's 50,000 epochs are 50,000 steps), examples
sharded over the `data` mesh axis, params replicated. Checkpoints (`checkpoints.manager`):
`W/meta/<method>/checkpoints/` holds the train state (params, optimizer state, the kept params), the
progress and a spec (classes, feature layout, training settings and a SHA-256 of the training
features and labels). A restarted run resumes from the newest checkpoint if the spec matches and
starts over if it does not (the upstream outputs or the settings changed); `restore` gives the kept
params as a predictor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jmmshap import checkpoints, parallel, plots, train_lib, workdir
from jmmshap.learner_outputs import first_values
from jmmshap.models import initializers
from jmmshap.weighting import MethodData

# Settings that change neither the trained meta-model nor its predictions: left out of the spec.
_BOOKKEEPING = ("weighting", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints")


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


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.StandardCheckpointHandler(), "progress": ocp.JsonCheckpointHandler(),
          "spec": ocp.JsonCheckpointHandler()}


def _manager(directory: str, keep: int | None = None, create: bool = False) -> ocp.CheckpointManager:
  return checkpoints.manager(os.path.join(directory, workdir.CHECKPOINTS), _handlers(),
                             max_to_keep=keep, create=create)


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
  optimizer_json = meta_config.optimizer.to_json()
  _, schedule = _optimizer(optimizer_json, total_steps)
  params = model.init(model.keys(seed))
  # The kept params are a copy: the train chunk donates (and so deletes) the params it is given.
  state = {"params": params, "opt_state": _opt_init_fn(optimizer_json, total_steps, mesh)(params),
           "kept": jax.tree.map(jnp.copy, params)}
  progress = {"step": 0, "finished": False, "kept_loss": [None] * model.num_members,
              "kept_step": [0] * model.num_members, "evals_since_improvement": [0] * model.num_members}

  os.makedirs(directory, exist_ok=True)
  manager = _manager(directory, meta_config.keep_checkpoints, create=True)
  logger = train_lib.Logger(os.path.join(directory, workdir.LOG))
  latest = manager.latest_step()
  where = os.path.join(directory, workdir.CHECKPOINTS)
  if latest is not None:
    saved = checkpoints.restore(manager, latest, where, json_items=("spec",))["spec"]
    if saved != model.spec:
      logging.warning("meta %s: the checkpoint in %s was trained on other base outputs or settings "
                      "(%s); training from scratch.", data.method, directory,
                      _spec_difference(saved, model.spec))
      manager.close()
      workdir.remove(where, logger.path)
      manager = _manager(directory, meta_config.keep_checkpoints, create=True)
      logger = train_lib.Logger(logger.path)
    else:
      restored = checkpoints.restore(manager, latest, where,
                                     arrays={"state": checkpoints.abstract(state, replicated)},
                                     json_items=("progress",))
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
      checkpoints.save(manager, step, arrays={"state": state},
                       json_items={"progress": progress, "spec": model.spec})
    if stop:
      logging.info("meta %s: early stop at step %d (held-out loss best at steps %s)", data.method,
                   step, kept_step.tolist())
      break
  bar.close()
  logger.close()
  manager.wait_until_finished()
  manager.close()
  if workdir.is_writer():
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
  saved, current = workdir.flatten(saved), workdir.flatten(current)
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
  path = os.path.join(directory, workdir.CHECKPOINTS)
  manager = _manager(directory)
  latest = manager.latest_step()
  if latest is None:
    manager.close()
    raise workdir.StageNotTrained(f"{path}: no meta checkpoint to restore; train the meta stage "
                                  "first (run without --config.mode=eval).")
  saved = checkpoints.restore(manager, latest, path, json_items=("spec", "progress"))
  spec, progress = saved["spec"], saved["progress"]
  num_classes = len(class_names)
  if spec["num_classes"] != num_classes or spec["class_names"] != list(class_names):
    manager.close()
    raise ValueError(
        f"{path} holds a meta-model for {spec['num_classes']} classes "
        f"({first_values(np.asarray(spec['class_names']))}) but the base learners' logits "
        f"({data.method}) have {num_classes} ({first_values(np.asarray(class_names))}): the checkpoint "
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
  state = checkpoints.restore(manager, latest, path,
                              arrays={"state": checkpoints.abstract(template, replicated)})["state"]
  manager.close()
  predict = _predict_fn(model.graphdef, model.mesh)
  devices = jax.device_count()

  def probabilities(features: np.ndarray) -> np.ndarray:
    padded = _sharded_rows(_pad_rows(features.astype(np.float32), devices), model.mesh)
    return np.asarray(predict(state["kept"], padded))[:, :len(features)]

  return probabilities, progress
