"""The one training loop of the pipeline: the classifier stages and clip_pretrain train through `fit`.

The models are NNX modules, but the loop is functional: `nnx.split` gives a static graph and pure
states (params, other model state such as BatchNorm statistics and dropout RNG counters), and one
jitted step maps (train state, batch) -> (train state, metrics) with the state replicated and
donated and the batch sharded over the `data` mesh axis. A stage gives the loop what differs: its
loss (`LossFn`), its validation scores, and the score that selects the best model (`Selection`).
The loop does the rest: optimiser and schedule, sharding, prefetching, logging, checkpoints.

Everything a resumed run needs (params, model state, optimizer state, step) is one Orbax checkpoint
(`checkpoints.StageCheckpoints`), and the data order is a function of the step, so a run restarted
from its latest checkpoint ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from tqdm.auto import tqdm

from jmmshap import checkpoints, input_pipeline, parallel, plots, tensorboard, workdir

# (params, model state or None, batch) -> (loss, (step metrics, new model state or None)).
LossFn = Callable[[Any, Any, dict[str, jax.Array]], tuple[jax.Array, tuple[dict, Any]]]


# ---------------------------------------------------------------------------------------------------
# Optimisation.


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  peak = config.learning_rate
  warmup = int(config.get("warmup_fraction", 0.0) * total_steps)
  kind = config.get("schedule", "cosine")
  if kind == "constant":
    decay = optax.constant_schedule(peak)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  elif kind == "linear":
    decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule={kind!r}: use 'constant', 'cosine' or 'linear'")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Optax optimizer from `config.optimizer`; weight decay only on matrices (not biases or norms)."""
  schedule = learning_rate_schedule(config, total_steps)
  name = config.name
  if name == "adamw":
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    optimizer = optax.adamw(schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                            weight_decay=config.get("weight_decay", 0.0), mask=decay_mask)
  elif name == "sgd":
    optimizer = optax.sgd(schedule, momentum=config.get("momentum", None) or None,
                          nesterov=config.get("nesterov", False))
  else:
    raise ValueError(f"optimizer.name={name!r}: use 'adamw' or 'sgd'")
  if config.get("grad_clip_norm"):
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
  return optimizer, schedule


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against integer labels.

  With `label_smoothing` a > 0 the target is (1 - a) one-hot + a / C (Szegedy et al., 2016): the
  model is not pushed towards infinite logits on labels that are sometimes wrong or ambiguous.
  a = 0 is the plain loss, computed as before.
  """
  logits = logits.astype(jnp.float32)
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def ema_update(average: Any, latest: Any, step: jax.Array, decay: float) -> Any:
  """The debiased exponential moving average after `step` (>= 1) updates, given the one before.

  Equal to sum_t decay^(step - t) (1 - decay) x_t / (1 - decay^step) over the iterates x_1..x_step:
  a weighted mean of the iterates only (the initial value gets weight 0), so that early evaluations
  are not dragged towards the random initialisation. Leaves that are not floating point (RNG keys,
  counters) take the latest value.
  """
  # 1 - decay^step as -expm1(step log decay): accurate in float32 for decay close to 1.
  weight = (1.0 - decay) / -jnp.expm1(step.astype(jnp.float32) * math.log(decay))

  def update(old, new):
    if not jnp.issubdtype(new.dtype, jnp.floating):
      return new
    return (old + weight.astype(new.dtype) * (new - old)).astype(new.dtype)

  return jax.tree.map(update, average, latest)


def evaluated_model(state: dict) -> dict:
  """What validation, `best/` and every output use: the moving average of the params (and model
  state) where the run keeps one (`ema_decay` > 0), else the trained ones."""
  source = state.get("ema", state)
  return {"params": source["params"], "model_state": source.get("model_state")}


def initial_state(config: ml_collections.ConfigDict, params: Any, model_state: Any,
                  optimizer: optax.GradientTransformation) -> dict:
  """The train state before step 1: {step, params, opt_state[, model_state][, ema]}; also the
  tree a saved train state is restored into."""
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
  if model_state is not None:
    state["model_state"] = model_state
  if config.get("ema_decay", 0.0):
    # Its starting value gets weight 0 (`ema_update`); it only fixes the tree. Copies: the state is
    # donated to the step, and one buffer cannot be donated twice.
    state["ema"] = {name: jax.tree.map(jnp.copy, state[name])
                    for name in ("params", "model_state") if name in state}
  return state


# (batch as it left the host, 0-based step) -> the batch the loss reads (e.g. photos normalised
# and augmented on the device).
PrepareBatch = Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    ema_decay: float = 0.0, prepare_batch: PrepareBatch | None = None) -> Callable:
  """(state, batch) -> (state, metrics); state = {step, params, opt_state[, model_state][, ema]}.

  `prepare_batch(batch, step)` runs first, inside the same program, with the step the batch is
  for (the state's step before the update). With `ema_decay` > 0 the state's `ema`
  ({params[, model_state]}) is updated after every step; BatchNorm statistics are averaged with
  the params so that the two match.
  """

  def train_step(state, batch):
    if prepare_batch is not None:
      batch = prepare_batch(batch, state["step"])
    def objective(params):
      return loss_fn(params, state.get("model_state"), batch)

    (loss, (step_metrics, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
        state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = {**state, "step": state["step"] + 1,
                 "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
    if model_state is not None:
      new_state["model_state"] = model_state
    if ema_decay:
      latest = {name: new_state[name] for name in state["ema"]}
      new_state["ema"] = ema_update(state["ema"], latest, new_state["step"], ema_decay)
    return new_state, {"loss": loss, **step_metrics}

  return train_step


# ---------------------------------------------------------------------------------------------------
# Bookkeeping.


class Logger:
  """log.jsonl records (process 0 only), kept in memory too for the curves, and the same numbers
  as TensorBoard scalars in the folder's event file (`tensorboard.Events`)."""

  def __init__(self, path: str):
    self.path = path
    self.records = []
    # Opened by the first write, from the records kept so far: the event file always holds what
    # log.jsonl does, and a finished stage's folder, which writes nothing, is left as it is.
    self.events: tensorboard.Events | None = None
    if os.path.isfile(path):
      with open(path) as f:
        lines = [line for line in f if line.strip()]
      for number, line in enumerate(lines, 1):
        try:
          self.records.append(json.loads(line))
        except json.JSONDecodeError:
          if number < len(lines):
            raise ValueError(f"{path}, line {number}: not JSON; delete or repair the line") from None
          # A run killed mid-write; it was past any checkpoint, so truncate_after drops it anyway.
          logging.warning("%s: ignoring the unfinished last line %r", path, line)

  def write(self, record: dict) -> None:
    if not workdir.is_writer():
      return
    if self.events is None:
      self.events = tensorboard.Events(os.path.dirname(self.path), self.records)
    self.records.append(record)
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self.events.log(record)

  def truncate_after(self, step: int) -> None:
    """A resumed run drops what its killed predecessor logged past the checkpoint it restarts from."""
    self.close()  # The next write replaces the event file with the records kept.
    self.records = [r for r in self.records if r.get("step", 0) <= step]
    if workdir.is_writer() and os.path.isfile(self.path):
      workdir.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

  def close(self) -> None:
    """Closes the event file (a later write opens a new one, from every record)."""
    if self.events is not None:
      self.events.close()
      self.events = None


def step_plan(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int, int, int]:
  """(total steps, eval every, checkpoint every, log every) in steps, from the epoch or step settings."""
  per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  total_steps = config.get("total_steps") or config.num_epochs * per_epoch
  eval_every = config.get("eval_every_steps") or per_epoch * config.get("eval_every_epochs", 1)
  checkpoint_every = (config.get("checkpoint_every_steps")
                      or per_epoch * config.get("checkpoint_every_epochs", 1))
  log_every = max(1, min(config.get("log_every_steps", 50), total_steps))
  return total_steps, eval_every, checkpoint_every, log_every


def train_record(step: int, window: list[dict], learning_rate: float, examples: int,
                 elapsed: float) -> dict:
  """A log.jsonl training record: the window's mean step metrics (read from the devices only now)
  and its throughput (None when the window timed no step)."""
  values = jax.device_get(window)
  return {"split": "train", "step": step,
          **{name: float(np.mean([v[name] for v in values])) for name in values[0]},
          "learning_rate": learning_rate,
          "examples_per_sec": examples / max(elapsed, 1e-9) if examples else None}


@dataclasses.dataclass(frozen=True)
class Selection:
  """The validation score that picks the model kept in `best/` (and used by every later stage)."""
  metric: str
  higher_is_better: bool

  @property
  def worst(self) -> float:
    return -math.inf if self.higher_is_better else math.inf

  def improves(self, score: float, best: float) -> bool:
    return score > best if self.higher_is_better else score < best


# ---------------------------------------------------------------------------------------------------
# The loop.


def fit(config: ml_collections.ConfigDict, directory: str, name: str, *, params: Any,
        model_state: Any, loss_fn: LossFn, train_source: input_pipeline.RecordSource,
        preprocess: Callable, evaluate: Callable[[dict], dict[str, float]], selection: Selection,
        best_model: Callable[[dict], Any], mesh: jax.sharding.Mesh,
        prepare_batch: PrepareBatch | None = None) -> None:
  """Trains from `params` (or resumes from the newest checkpoint in `directory`) to the end.

  `evaluate(state)` gives the validation scores (every `eval_every`, and after the last step);
  `best_model(state)` is what `best/` keeps when `selection` says they improved; both should read
  the state through `evaluated_model`, which gives the moving average where `config.ema_decay` > 0
  keeps one (in the train state, so in every checkpoint). `preprocess` turns records into host
  batches in grain's workers (`data.worker_count`); `prepare_batch` finishes them on the device
  (`make_train_step`). Writes config.json, log.jsonl (and its TensorBoard event file), the
  checkpoints (each with grain's iterator state) and the training curves.
  """
  replicated, batch_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
  parallel.check_batch_size(config.batch_size)
  total_steps, eval_every, checkpoint_every, log_every = step_plan(config, len(train_source))
  optimizer, schedule = make_optimizer(config.optimizer, total_steps)
  ema_decay = config.get("ema_decay", 0.0)
  state = parallel.replicate(initial_state(config, params, model_state, optimizer), mesh)

  store = checkpoints.StageCheckpoints(directory, config.get("keep_checkpoints", 2))
  batches = logger = None
  try:
    start_step = store.latest_step()
    logger = Logger(os.path.join(directory, workdir.LOG))
    # A run killed before its first checkpoint may still have logged and saved a best model:
    # replaying the same steps reproduces both, so only the log needs trimming.
    logger.truncate_after(start_step)
    saved_best = store.best_scores()
    best_score = selection.worst if saved_best is None else saved_best[selection.metric]
    workers = input_pipeline.worker_count(config.data)
    position = None
    if start_step:
      state = store.restore_latest(start_step, checkpoints.abstract(state, replicated))
      position = store.data_position(start_step)
      logging.info("%s: resumed from step %d of %d", name, start_step, total_steps)
    if workdir.is_writer():
      workdir.write_text(os.path.join(directory, workdir.CONFIG), config.to_json(indent=2))
    if start_step >= total_steps:
      return

    train_step = jax.jit(make_train_step(loss_fn, optimizer, ema_decay, prepare_batch),
                         in_shardings=(replicated, batch_sharding),
                         out_shardings=(replicated, replicated), donate_argnums=0)
    batches, first_step = _train_batches(config, train_source, preprocess, mesh, total_steps,
                                         start_step, position, workers)
    progress = tqdm(total=total_steps, initial=start_step, desc=name, unit="step",
                    disable=not workdir.is_writer(), dynamic_ncols=True)
    pending, window_start, window_steps = [], time.perf_counter(), 0
    for step in range(start_step + 1, total_steps + 1):
      state, step_metrics = train_step(state, next(batches))
      pending.append(step_metrics)  # Stays on device until the next log interval.
      window_steps += 1
      progress.update(1)
      if step == start_step + 1 and step != total_steps:  # Throughput excludes the compilation.
        jax.block_until_ready(step_metrics)
        window_start, window_steps = time.perf_counter(), 0
      if step % log_every == 0 or step == total_steps:
        record = train_record(step, pending, float(schedule(step - 1)),
                              window_steps * config.batch_size, time.perf_counter() - window_start)
        logger.write(record)
        progress.set_postfix(loss=f"{record['loss']:.4f}",
                             ex_s=f"{record['examples_per_sec'] or 0:.0f}")
        pending, window_start, window_steps = [], time.perf_counter(), 0
      if step % eval_every == 0 or step == total_steps:
        scores = evaluate(state)
        logger.write({"split": "validation", "step": step, **scores})
        if selection.improves(scores[selection.metric], best_score):
          best_score = scores[selection.metric]
          store.save_best(step, best_model(state), scores)
        window_start = time.perf_counter()  # Evaluation time is not training throughput.
      if step % checkpoint_every == 0 or step == total_steps:
        store.save_latest(step, state, {"first_step": first_step, "worker_count": workers,
                                        "iterator": batches.get_state()})
    progress.close()
    # Every process joins every save above in the same order; all of them are complete here.
    store.wait_until_finished()
    if workdir.is_writer():
      plots.training_curves(logger.records, os.path.join(directory, ""), name)
  finally:
    if batches is not None:
      batches.close()  # Stops grain's workers and prefetch thread, on errors too.
    if logger is not None:
      logger.close()
    store.close()


def _train_batches(config: ml_collections.ConfigDict, source: input_pipeline.RecordSource,
                   preprocess: Callable, mesh: jax.sharding.Mesh, total_steps: int, start_step: int,
                   position: dict | None, workers: int) -> tuple[Any, int]:
  """(grain iterator over the steps after `start_step`, on the devices; its first step).

  A checkpoint's saved position ({first_step, worker_count, iterator}) is restored into the
  iterator it came from (grain's `set_state`). A checkpoint without one, or saved with another
  worker count (whose state does not fit), starts a new iterator at the step instead: batch s is a
  function of s (`input_pipeline.TrainOrder`), so both resume the same batches.
  """
  order = input_pipeline.TrainOrder(len(source), config.batch_size, config.seed)
  restore = position is not None and position.get("worker_count") == workers
  first_step = position["first_step"] if restore else start_step
  batches = input_pipeline.loader(
      source, preprocess, order, global_batch_size=config.batch_size, start=first_step,
      stop=total_steps, worker_count=workers,
      transform=lambda batch: parallel.to_global(batch, mesh))  # Copied while the step runs.
  if restore:
    batches.set_state(position["iterator"])
    logging.info("input pipeline: grain's iterator state restored (%d workers, first step %d)",
                 workers, first_step)
  return batches, first_step
