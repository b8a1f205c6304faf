"""The training loop shared by every classifier stage (text, image, mmbt).

The model is an NNX module, but the loop is functional: `nnx.split` gives a static graph and pure
states (params, other model state such as BatchNorm statistics and dropout RNG counters), one jitted
step maps (train state, batch) -> (train state, metrics) with the state replicated and donated and the
batch sharded over the `data` mesh axis. Everything a resumed run needs (params, model state, optimizer
state, step) is one Orbax checkpoint, and the data order is a function of the step, so a run restarted
from its latest checkpoint ends exactly where an uninterrupted one does.

Stage directory layout (`{workdir}/{stage}/`):
  checkpoints/        latest full train states (resume)
  best/               params + model state with the best validation macro F1 (eval, later stages)
  tokenizer.json      the title tokenizer the stage was trained with
  config.json         the config of the run
  class_names.json    label index -> class name
  log.jsonl           one JSON record per log interval and per evaluation
  loss.png, accuracy.png   training curves
  metrics.json        {"validation": {...}, "test": {...}} of the best checkpoint
  logits_{validation,test}.npz   logits, labels, ids, class_names
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jmmshap import checkpoints, input_pipeline, metrics, parallel, plots
from jmmshap.tokenizer import TOKENIZER_FILE, TitleTokenizer

SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")
CLASS_NAMES_FILE = "class_names.json"


@dataclasses.dataclass(frozen=True)
class ClassifierStage:
  """What differs between the text, image and multimodal learners."""
  name: str
  inputs: tuple[str, ...]  # batch keys passed to the model by name, e.g. ("input_ids", ...)
  build_model: Callable[[ml_collections.ConfigDict, int, TitleTokenizer | None], nnx.Module]
  uses_text: bool
  uses_image: bool


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


# ---------------------------------------------------------------------------------------------------
# Pure steps.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(graphdef: nnx.GraphDef, inputs: tuple[str, ...],
                    optimizer: optax.GradientTransformation) -> Callable:
  """(state, batch) -> (state, metrics); state = {step, params, model_state, opt_state}."""

  def train_step(state, batch):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["model_state"])
      logits = model(**{name: batch[name] for name in inputs})["logits"]
      _, _, model_state = nnx.split(model, nnx.Param, ...)
      return cross_entropy(logits, batch["label"]).mean(), (logits, nnx.as_pure(model_state))

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                 "model_state": model_state, "opt_state": opt_state}
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new_state, {"loss": loss, "accuracy": accuracy}

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, inputs: tuple[str, ...]) -> Callable:
  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    return model(**{name: batch[name] for name in inputs})["logits"].astype(jnp.float32)
  return eval_step


# ---------------------------------------------------------------------------------------------------
# The run.


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def load_or_train_tokenizer(config: ml_collections.ConfigDict, directory: str,
                            train_source: input_pipeline.RecordSource) -> TitleTokenizer:
  """The stage's saved tokenizer, else a checkpoint's (data.tokenizer or init_from), else train one."""
  saved = os.path.join(directory, TOKENIZER_FILE)
  max_length = config.data.max_length
  if os.path.isfile(saved):
    return TitleTokenizer.from_folder(directory, max_length=max_length)
  folder = config.data.get("tokenizer") or config.get("init_from")
  if folder:
    tokenizer = TitleTokenizer.from_folder(folder, max_length=max_length)
  else:
    titles = (input_pipeline.as_text(r["title"]) for r in
              _iterate(train_source, batch_size=1024))
    tokenizer = TitleTokenizer.train(titles, vocab_size=config.data.vocab_size, max_length=max_length)
  if jax.process_index() == 0:
    write_atomically(saved, tokenizer.save)
  return tokenizer


def _iterate(source: input_pipeline.RecordSource, batch_size: int) -> Iterator[dict]:
  for start in range(0, len(source), batch_size):
    yield from input_pipeline.read_records(source, range(start, min(start + batch_size, len(source))))


def write_atomically(path: str, write: Callable[[str], Any]) -> None:
  """`write(partial)` then a rename over `path`: a run killed mid-write leaves the old file or none.

  A resumed run reads tokenizer.json back, and later stages read config.json and the outputs; half a
  file would break them. Another process reading `path` meanwhile sees one whole version.
  """
  root, extension = os.path.splitext(path)
  partial = f"{root}.partial-{os.getpid()}{extension}"  # np.savez insists on its extension.
  write(partial)
  os.replace(partial, path)


def _write_json(path: str, value: Any) -> None:
  def write(partial):
    with open(partial, "w") as f:
      json.dump(value, f, indent=2)
  write_atomically(path, write)


def make_preprocessor(config: ml_collections.ConfigDict, stage: ClassifierStage,
                      tokenizer: TitleTokenizer | None) -> input_pipeline.Preprocessor:
  return input_pipeline.Preprocessor(
      tokenizer, config.data.image_size if stage.uses_image else None,
      config.data.get("image_mean", input_pipeline.IMAGENET_MEAN),
      config.data.get("image_std", input_pipeline.IMAGENET_STD))


class Logger:
  """log.jsonl records (process 0 only), kept in memory too for the curves."""

  def __init__(self, path: str):
    self.path = path
    self.records = []
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
    if jax.process_index() != 0:
      return
    self.records.append(record)
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def truncate_after(self, step: int) -> None:
    """A resumed run drops what its killed predecessor logged past the checkpoint it restarts from."""
    self.records = [r for r in self.records if r.get("step", 0) <= step]
    if jax.process_index() == 0 and os.path.isfile(self.path):
      def write(partial):
        with open(partial, "w") as f:
          f.writelines(json.dumps(r) + "\n" for r in self.records)
      write_atomically(self.path, write)


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


def evaluate(eval_step: Callable, params: Any, model_state: Any,
             source: input_pipeline.RecordSource, preprocess: input_pipeline.Preprocessor,
             batch_size: int, mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """Logits for every example of a split, in the split's order, with labels and ids."""
  num_examples = len(source)
  logits = None
  labels = np.zeros(num_examples, np.int32)
  ids = np.empty(num_examples, dtype=object)
  batches = input_pipeline.prefetch(
      input_pipeline.eval_batches(source, preprocess, global_batch_size=batch_size))
  for batch in batches:
    batch_logits = multihost_utils.process_allgather(
        eval_step(params, model_state, parallel.to_global(batch, mesh)), tiled=True)
    index = multihost_utils.process_allgather(batch["index"], tiled=True)
    batch_labels = multihost_utils.process_allgather(batch["label"], tiled=True)
    if logits is None:
      logits = np.zeros((num_examples, batch_logits.shape[-1]), np.float32)
    real = index >= 0
    logits[index[real]] = batch_logits[real]
    labels[index[real]] = batch_labels[real]
    local = batch["index"] >= 0
    ids[batch["index"][local]] = batch["id"][local]
  if jax.process_count() > 1:  # Each process saw only its own rows' ids.
    missing = np.flatnonzero(ids == None)  # pylint: disable=singleton-comparison
    for i, record in zip(missing, input_pipeline.read_records(source, missing)):
      ids[i] = input_pipeline.as_text(record["id"])
  return {"logits": logits, "labels": labels, "ids": ids.astype(str)}


def _best_handlers() -> dict:
  # Handlers (not just item names) so that a checkpoint's metadata can be read before restoring.
  return {"model": ocp.StandardCheckpointHandler(), "metrics": ocp.JsonCheckpointHandler()}


def _checkpoint_managers(directory: str, config: ml_collections.ConfigDict):
  """Resumable train states and the best model (see `checkpoints.manager` for why a kill mid-save
  loses nothing and why the two may save the same step at once)."""
  latest = checkpoints.manager(os.path.join(directory, "checkpoints"),
                               {"state": ocp.StandardCheckpointHandler()},
                               max_to_keep=config.get("keep_checkpoints", 2), create=True)
  best = checkpoints.manager(os.path.join(directory, "best"), _best_handlers(), max_to_keep=1,
                             create=True)
  return latest, best


def restore_best(directory: str, abstract_model: dict) -> tuple[dict, dict]:
  """(params + model_state, validation metrics) of the best checkpoint of a stage."""
  path = os.path.join(directory, "best")
  manager = checkpoints.manager(path, _best_handlers())
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint to restore; train the stage first "
                            "(run without --config.mode=eval).")
  checkpoints.check_matches(manager, step, "model", abstract_model, path)
  restored = manager.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(abstract_model), metrics=ocp.args.JsonRestore()))
  manager.close()
  return restored["model"], restored["metrics"]


@dataclasses.dataclass
class TrainedStage:
  """A finished classifier stage, restored for later stages (MM-SHAP, the meta-model)."""
  model: nnx.Module  # In eval mode, with the best checkpoint's weights.
  config: ml_collections.ConfigDict
  tokenizer: TitleTokenizer | None
  class_names: list[str]
  preprocess: input_pipeline.Preprocessor


def load_trained(workdir: str, stage: ClassifierStage) -> TrainedStage:
  """Rebuilds a stage's model from its saved config and restores its best checkpoint."""
  directory = stage_dir(workdir, stage.name)
  paths = [os.path.join(directory, name) for name in ("config.json", CLASS_NAMES_FILE)]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: train the {stage.name} stage into {workdir} first "
                              f"(python train.py --config=configs/{stage.name}.py --workdir={workdir}).")
  with open(paths[0]) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(paths[1]) as f:
    class_names = json.load(f)
  tokenizer = (TitleTokenizer.from_folder(directory, max_length=config.data.max_length)
               if stage.uses_text else None)
  model = stage.build_model(config, len(class_names), tokenizer)
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  abstract = _abstract({"params": nnx.as_pure(params), "model_state": nnx.as_pure(model_state)},
                       parallel.replicated(parallel.make_mesh()))
  best, _ = restore_best(directory, abstract)
  preprocess = make_preprocessor(config, stage, tokenizer)
  return TrainedStage(nnx.merge(graphdef, best["params"], best["model_state"]), config, tokenizer,
                      class_names, preprocess)


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def write_outputs(directory: str, results: dict[str, dict[str, np.ndarray]], class_names: list[str],
                  num_classes: int) -> dict[str, dict[str, float]]:
  """metrics.json and logits_{split}.npz from evaluated splits."""
  report = {}
  for split, result in results.items():
    report[split] = metrics.classification_metrics(result["labels"], result["logits"].argmax(-1),
                                                   num_classes)
    if jax.process_index() == 0:
      arrays = {"logits": result["logits"], "labels": result["labels"], "ids": result["ids"],
                "class_names": np.asarray(class_names)}
      write_atomically(os.path.join(directory, f"logits_{split}.npz"),
                       lambda partial, arrays=arrays: np.savez(partial, **arrays))
  if jax.process_index() == 0:
    _write_json(os.path.join(directory, "metrics.json"), report)
  return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stage: ClassifierStage) -> dict[str, dict[str, float]]:
  """Trains (or with config.mode='eval' only restores) a classifier stage and writes its outputs."""
  from jmmshap import builders  # pylint: disable=g-import-not-at-top

  if config.mode not in ("train", "eval"):
    raise ValueError(f"config.mode={config.mode!r}: use 'train' or 'eval'")
  directory = stage_dir(workdir, stage.name)
  os.makedirs(directory, exist_ok=True)
  mesh = parallel.make_mesh()
  # Process 0 builds the dataset alone; the others then find it ready (on a shared disk) or build
  # their own copy, never racing process 0 into the same directory.
  if jax.process_index() == 0:
    builder = builders.prepare(config.data)
  multihost_utils.sync_global_devices("jmmshap: dataset prepared")
  if jax.process_index() != 0:
    builder = builders.prepare(config.data)
  # A text-only stage never looks at the photos: leave them encoded instead of decoding every one.
  decoders = None if stage.uses_image else {"image": tfds.decode.SkipDecoding()}
  sources = {split: builder.as_data_source(split, decoders=decoders) for split in SPLITS}
  class_names = list(builder.info.features["label"].names)
  num_classes = len(class_names)
  tokenizer = (load_or_train_tokenizer(config, directory, sources["train"])
               if stage.uses_text else None)
  preprocess = make_preprocessor(config, stage, tokenizer)

  if jax.process_index() == 0:
    _write_json(os.path.join(directory, CLASS_NAMES_FILE), class_names)
  model = stage.build_model(config, num_classes, tokenizer)
  model.train()
  train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
  params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
  del model

  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharded(mesh)
  eval_batch_size = config.get("eval_batch_size") or config.batch_size
  parallel.check_batch_size(eval_batch_size, "eval_batch_size")
  eval_step = jax.jit(make_eval_step(eval_graphdef, stage.inputs),
                      in_shardings=(replicated, replicated, batch_sharding), out_shardings=batch_sharding)
  latest_manager, best_manager = _checkpoint_managers(directory, config)

  if config.mode == "train":
    _train(config, directory, stage, sources, preprocess, train_graphdef, params, model_state, mesh,
           eval_step, eval_batch_size, num_classes, latest_manager, best_manager)
  latest_manager.close()
  best_manager.close()

  abstract_model = _abstract({"params": params, "model_state": model_state}, replicated)
  best, best_metrics = restore_best(directory, abstract_model)
  logging.info("%s: evaluating the best checkpoint (step %s, validation f1_macro %.4f)", stage.name,
               best_metrics.get("step"), best_metrics.get("f1_macro", float("nan")))
  results = {split: evaluate(eval_step, best["params"], best["model_state"], sources[split],
                             preprocess, eval_batch_size, mesh) for split in EVAL_SPLITS}
  report = write_outputs(directory, results, class_names, num_classes)
  for split in EVAL_SPLITS:
    logging.info("%s %s: %s", stage.name, split, json.dumps(report[split]))
  return report


def _train(config, directory, stage, sources, preprocess, graphdef, params, model_state, mesh,
           eval_step, eval_batch_size, num_classes, latest_manager, best_manager) -> None:
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharded(mesh)
  parallel.check_batch_size(config.batch_size)
  total_steps, eval_every, checkpoint_every, log_every = step_plan(config, len(sources["train"]))
  optimizer, schedule = make_optimizer(config.optimizer, total_steps)

  state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
           "opt_state": optimizer.init(params)}
  state = parallel.replicate(state, mesh)
  start_step = latest_manager.latest_step() or 0
  logger = Logger(os.path.join(directory, "log.jsonl"))
  # A run killed before its first checkpoint may still have logged and saved a best model: replaying
  # the same steps reproduces both, so only the log needs trimming.
  logger.truncate_after(start_step)
  best_f1 = -1.0
  if best_manager.latest_step() is not None:
    best_f1 = best_manager.restore(best_manager.latest_step(), args=ocp.args.Composite(
        metrics=ocp.args.JsonRestore()))["metrics"]["f1_macro"]
  if start_step:
    abstract_state = _abstract(state, replicated)
    checkpoints.check_matches(latest_manager, start_step, "state", abstract_state,
                              os.path.join(directory, "checkpoints"))
    state = latest_manager.restore(start_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
    logging.info("%s: resumed from step %d of %d", stage.name, start_step, total_steps)
  if jax.process_index() == 0:
    def write_config(partial):
      with open(partial, "w") as f:
        f.write(config.to_json(indent=2))
    write_atomically(os.path.join(directory, "config.json"), write_config)
  if start_step >= total_steps:
    return

  train_step = jax.jit(make_train_step(graphdef, stage.inputs, optimizer),
                       in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
                       donate_argnums=0)
  augment = input_pipeline.random_flip if config.get("random_flip") else None  # Image stage only.
  batches = input_pipeline.prefetch(
      input_pipeline.train_batches(sources["train"], preprocess, global_batch_size=config.batch_size,
                                   seed=config.seed, start_step=start_step, augment=augment),
      transform=lambda batch: parallel.to_global(batch, mesh))  # Copied while the step runs.
  progress = tqdm(total=total_steps, initial=start_step, desc=stage.name, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
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
      result = evaluate(eval_step, state["params"], state["model_state"], sources["validation"],
                        preprocess, eval_batch_size, mesh)
      scores = metrics.classification_metrics(result["labels"], result["logits"].argmax(-1),
                                              num_classes)
      loss = float(cross_entropy(result["logits"], result["labels"]).mean())
      logger.write({"split": "validation", "step": step, "loss": loss, **scores})
      if scores["f1_macro"] > best_f1:
        best_f1 = scores["f1_macro"]
        best_manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave({"params": state["params"],
                                         "model_state": state["model_state"]}),
            metrics=ocp.args.JsonSave({"step": step, **scores})))
      window_start = time.perf_counter()  # Evaluation time is not training throughput.
    if step % checkpoint_every == 0 or step == total_steps:
      latest_manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  progress.close()
  # Every process joined every save above, in the same order; all of them are complete here.
  latest_manager.wait_until_finished()
  best_manager.wait_until_finished()
  if jax.process_index() == 0:
    plots.training_curves(logger.records, os.path.join(directory, ""), stage.name)
