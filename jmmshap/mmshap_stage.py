"""The mmshap stage: MM-SHAP of the trained MMBT on validation and test (`W/mmshap/`).

The data, tokenizer and masking come from the MMBT saved in the workdir, so this stage's config says
only how to explain (`mmshap.Options`), which examples, and where the data lives now. The meta stage
reads the per-example shares it writes (`workdir.shares_file`).

Several processes (`jax.distributed`) split the work by example: `examples_per_group` and
`chunk_size` are global, as a training batch is, and each process explains its own rows of every
group of examples (`input_pipeline.process_slice`) on its own devices, with no collective per
forward call. The finished values are gathered once per split and put back in split order; process
0 writes the files.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jmmshap import (builders, classifier, config_checks, games, input_pipeline, mmshap, parallel,
                     plots, shapley, tensorboard, workdir)

STAGE = "mmshap"
T_SHAP_BINS = np.linspace(0, 1, 21)  # The TensorBoard histograms', in 0.05 steps like the PNGs'.


def check_config(config: ml_collections.ConfigDict, prefix: str = "", devices: int = 1,
                 num_image_embeddings: int | None = None) -> list[str]:
  """How to explain, and whether an exact explanation fits the engine's player cap."""
  problems: list[str] = []
  config_checks.one_of(problems, prefix, "method", config.get("method"), mmshap.METHODS)
  config_checks.one_of(problems, prefix, "value", config.get("value"), mmshap.VALUES)
  config_checks.one_of(problems, prefix, "text_players", config.get("text_players"),
                       mmshap.TEXT_GROUPINGS)
  config_checks.one_of(problems, prefix, "image_players", config.get("image_players", "embeddings"),
                       mmshap.IMAGE_PLAYERS)
  config_checks.at_least(problems, config, prefix, 0, "patch_grid", why=" (0: the authors' rule)")
  cap = shapley.MAX_EXACT_PLAYERS
  if not 0 <= config.max_exact_players <= cap:
    problems.append(f"{prefix}max_exact_players={config.max_exact_players}: exact Shapley values "
                    f"enumerate 2**p coalitions; use at most {cap} (KernelSHAP takes over above).")
  if config.method == "exact":
    if not config.max_text_players:
      problems.append(f"{prefix}method='exact' with max_text_players=0 (one player per word): a long "
                      f"title exceeds the exact cap of {cap} players; set max_text_players or use "
                      "method='auto'.")
    elif config.get("image_players", "embeddings") == "patches":
      grid = config.get("patch_grid", 0)
      if not grid:
        problems.append(f"{prefix}method='exact' with image_players='patches' and patch_grid=0: the "
                        "authors' grid grows with the title and can exceed the exact cap of "
                        f"{cap} players; set patch_grid or use method='auto'.")
      elif config.max_text_players + grid ** 2 > cap:
        problems.append(f"{prefix}method='exact': max_text_players={config.max_text_players} + "
                        f"{grid ** 2} patches exceed the exact cap of {cap}.")
    elif num_image_embeddings is not None and config.max_text_players + num_image_embeddings > cap:
      problems.append(f"{prefix}method='exact': max_text_players={config.max_text_players} + "
                      f"{num_image_embeddings} image players exceed the exact cap of {cap}.")
  config_checks.positive(problems, config, prefix, "examples_per_group")
  config_checks.at_least(problems, config, prefix, 0, "chunk_size", why=" (0: the backend's default)")
  config_checks.divisible(problems, config, prefix, devices, "chunk_size", "examples_per_group")
  if not isinstance(config.get("memory_gb", 0.0), (int, float)) or config.get("memory_gb", 0.0) < 0:
    problems.append(f"{prefix}memory_gb={config.get('memory_gb')!r}: must be >= 0 (0: measured).")
  return problems


def options_from_config(config: ml_collections.ConfigDict) -> mmshap.Options:
  return mmshap.Options(
      text_players=config.text_players, tokens_per_player=config.tokens_per_player,
      max_text_players=config.max_text_players, value=config.value, method=config.method,
      max_exact_players=config.max_exact_players, budget=config.budget,
      chunk_size=config.chunk_size, memory_gb=config.get("memory_gb", 0.0),
      examples_per_group=config.examples_per_group,
      image_players=config.get("image_players", "embeddings"),
      patch_grid=config.get("patch_grid", 0), patch_fill=config.get("patch_fill", 0.0),
      seed=config.seed)


def data_config(config: ml_collections.ConfigDict,
                mmbt_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The MMBT's own data config; this stage's config may only say where the data now lives."""
  if config.variant != mmbt_config.variant:
    raise ValueError(
        f"config.variant={config.variant!r} but the MMBT in the workdir was trained on "
        f"{mmbt_config.variant!r}: use --config=configs/mmshap.py:{mmbt_config.variant}.")
  data = ml_collections.ConfigDict(mmbt_config.data.to_dict())
  for key, value in config.data.items():
    if value is not None:
      data[key] = value
  return data


def _targets(config: ml_collections.ConfigDict, labels: np.ndarray,
             class_names: Sequence[str]) -> np.ndarray | None:
  if config.target == "predicted":
    return None
  if config.target == "label":
    return labels
  if config.target in class_names:
    return np.full(len(labels), list(class_names).index(config.target), np.int32)
  raise ValueError(f"config.target={config.target!r}; use one of {mmshap.TARGETS} or a class name "
                   f"({', '.join(class_names)}).")


def _groups(source: input_pipeline.RecordSource, count: int, size: int,
            preprocess: input_pipeline.Preprocessor,
            worker_count: int) -> Iterator[tuple[np.ndarray, dict]]:
  """(split positions, batch with normalised photos) of this process's rows of each group of `size`
  of the first `count` examples (`input_pipeline.process_slice`); a group past its last row is
  skipped."""
  batches = input_pipeline.eval_loader(source, preprocess, global_batch_size=size, count=count,
                                       worker_count=worker_count)
  try:
    for batch in batches:
      index = batch.pop("index")
      del batch["mask"]
      real = index >= 0
      if real.any():
        yield index[real], preprocess.normalised({k: v[real] for k, v in batch.items()})
  finally:
    batches.close()


def process_share(count: int, group: int) -> int:
  """How many of the first `count` examples this process explains in groups of `group`."""
  rows = input_pipeline.process_slice(group)
  within = np.arange(count) % group
  return int(((within >= rows.start) & (within < rows.stop)).sum())


def process_options(options: mmshap.Options) -> mmshap.Options:
  """One process's share of the global `examples_per_group` and `chunk_size` (rows per forward
  call over every device; the backend's default when 0): per device the calls are those of one
  process with every device."""
  processes = jax.process_count()
  if processes == 1:
    return options
  local = jax.local_device_count()
  rows = options.chunk_size or mmshap.DEFAULT_CHUNK_ROWS.get(jax.local_devices()[0].platform,
                                                             mmshap.ACCELERATOR_CHUNK_ROWS)
  return dataclasses.replace(options, examples_per_group=options.examples_per_group // processes,
                             chunk_size=max(local, rows // processes // local * local))


def process_explainer(model: Any, options: mmshap.Options, *,
                      tokenizer: Any = None) -> mmshap.Explainer:
  """The explainer `explain_split` needs: this process's share of the options, on its own devices
  (its examples are explained without waiting for the others)."""
  return mmshap.Explainer(model, process_options(options),
                          mesh=parallel.make_mesh(jax.local_devices()), tokenizer=tokenizer)


def gather_processes(arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """Every process's arrays (any dtype, any shapes), in process order, on every process. They travel
  as npz bytes, so floats arrive bit for bit (JAX without x64 would turn float64 into float32)."""
  if jax.process_count() == 1:
    return [dict(arrays)]
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  data = np.frombuffer(buffer.getvalue(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  parts = []
  for row, size in zip(rows, sizes):
    with np.load(io.BytesIO(row[:size].tobytes()), allow_pickle=False) as part:
      parts.append({key: part[key] for key in part.files})
  return parts


def _split_order(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The processes' examples as one set of arrays in split order (by `positions`)."""
  parts = [part for part in parts if len(part.get("positions", ()))]
  merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
  order = np.argsort(merged.pop("positions"), kind="stable")
  return {key: value[order] for key, value in merged.items()}


class CoalitionProgress:
  """Coalitions/s and a remaining-time estimate on the examples' progress bar, from the first
  finished call on: the rows left in the group of examples being explained, plus the examples not
  reached yet at the rows per example seen so far."""

  def __init__(self, bar: tqdm, total_examples: int):
    self.bar, self.total = bar, total_examples
    self.started = time.perf_counter()
    self.rows = 0  # Evaluated so far.
    self.done_examples = self.done_rows = 0  # Of the finished groups.
    self.group_size = self.group_done = 0
    self.group_rows: int | None = None

  def start_group(self, examples: int) -> None:
    self.group_size, self.group_done, self.group_rows = examples, 0, None

  def end_group(self) -> None:
    self.done_examples += self.group_size
    self.done_rows += self.group_done
    self.group_size = self.group_done = 0

  def __call__(self, rows: int, group_rows: int | None) -> None:
    self.rows += rows
    self.group_done += rows
    self.group_rows = group_rows if group_rows is not None else self.group_rows
    rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
    group_total = max(self.group_rows or 0, self.group_done)
    per_example = (self.done_rows / self.done_examples if self.done_examples
                   else group_total / max(self.group_size, 1))
    not_reached = max(0, self.total - self.done_examples - self.group_size)
    remaining = group_total - self.group_done + per_example * not_reached
    self.bar.set_postfix(coalitions_s=f"{rate:,.0f}", eta=_duration(remaining / max(rate, 1e-9)),
                         refresh=False)


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}"


def explain_split(explainer: mmshap.Explainer, source: input_pipeline.RecordSource,
                  preprocess: input_pipeline.Preprocessor, *, config: ml_collections.ConfigDict,
                  class_names: Sequence[str], split: str,
                  first_index: int = 0) -> tuple[dict[str, np.ndarray], dict]:
  """MM-SHAP of a split's first `max_examples` examples (all with 0): npz arrays and timings.

  With several processes, this process explains its rows of each group of `config.examples_per_group`
  (the explainer holds its share of the options, `process_options`) and every process returns all
  examples' arrays in split order. first_index: the split position of `source[0]` when `source` is a
  chunk of a longer input (the predictor's): a sampled example's estimate is seeded by its position
  in the whole input, so it does not depend on the chunking.
  """
  if any(device.process_index != jax.process_index() for device in explainer.mesh.devices.flat):
    raise ValueError("explain_split gives each process its own examples, but the explainer's mesh "
                     "holds other processes' devices: build it with mmshap_stage.process_explainer.")
  count = len(source) if not config.max_examples else min(config.max_examples, len(source))
  share = process_share(count, config.examples_per_group)
  progress = tqdm(total=share, desc=f"mmshap {split}", unit="ex", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  rates = CoalitionProgress(progress, share)
  started = time.perf_counter()
  workers = input_pipeline.worker_count(config.get("data") or {})
  results, labels, ids, positions = [], [], [], []
  for indices, batch in _groups(source, count, config.examples_per_group, preprocess, workers):
    rates.start_group(len(indices))
    result = explainer.explain(batch, targets=_targets(config, batch["label"], class_names),
                               indices=indices + first_index, progress=progress, on_rows=rates)
    rates.end_group()
    results.append(result)
    labels.append(batch["label"])
    ids.append(batch["id"])
    positions.append(indices)
  progress.close()
  local = {}
  if results:
    result = mmshap.Result.concatenate(results)
    local = {
        "positions": np.concatenate(positions).astype(np.int64),
        "ids": np.concatenate(ids).astype(str), "labels": np.concatenate(labels).astype(np.int32),
        "predictions": result.predictions, "targets": result.targets, "t_shap": result.t_shap,
        "v_shap": result.v_shap, "phi": result.phi, "player_modality": result.player_modality,
        "exact": result.exact, "value_full": result.value_full, "value_empty": result.value_empty,
        "num_evaluations": result.num_evaluations,
    }
    if result.player_names is not None:
      local["player_names"] = result.player_names
  logging.info("mmshap %s: process %d of %d explained %d of %d examples (%d groups) in %.1f s",
               split, jax.process_index(), jax.process_count(), len(local.get("positions", ())),
               count, len(results), time.perf_counter() - started)
  parts = gather_processes(local)
  seconds = time.perf_counter() - started
  arrays = {**_split_order(parts), "class_names": np.asarray(class_names)}
  evaluations = int(arrays["num_evaluations"].sum())
  timing = {"seconds": seconds, "examples_per_s": count / seconds,
            "coalitions_per_s": evaluations / seconds, "num_evaluations": evaluations,
            "examples_per_process": [len(part.get("positions", ())) for part in parts]}
  return arrays, timing


def fingerprint(config: ml_collections.ConfigDict, root: str,
                builder: Any = None) -> dict[str, Any]:
  """What the shares are built from: this config, the MMBT's data and classes, and the MMBT's run."""
  if builder is None:
    builder = builders.builder_for(data_config(config, workdir.read_config(root, classifier.MMBT.name)))
  return workdir.fingerprint(config, root, data=builders.identity(builder),
                             class_names=builder.info.features["label"].names,
                             reads={classifier.MMBT.name: workdir.run_of(root, classifier.MMBT.name)})


def run(config: ml_collections.ConfigDict, root: str) -> dict[str, Any]:
  """MM-SHAP of the trained MMBT in `root/mmbt` on validation and test -> `root/mmshap/`.

  Writes mmshap_{split}.npz (ids, labels, predictions, targets, t_shap, v_shap, phi,
  player_modality, player_names, exact, value_full, value_empty, num_evaluations, class_names),
  summary.json (per split: shares over the split and per true class, counts, exact counts,
  timings, the examples each process explained; with toyshop data each class's designed text
  share), per split t_shap_histogram_{split}.png and t_shap_per_class_{split}.png, and an event
  file with each split's T-SHAP histogram (`t_shap/{split}`) and mean (`t_shap_mean/{split}`) at
  step 0, for TensorBoard. Returns the summary.
  """
  mmbt_dir = workdir.stage_dir(root, classifier.MMBT.name)
  if not os.path.isdir(os.path.join(mmbt_dir, workdir.BEST)):
    raise FileNotFoundError(
        f"{mmbt_dir} holds no trained MMBT (no best/ checkpoint): train the mmbt stage into this "
        f"workdir first: python train.py --config=configs/mmbt.py:{config.variant} "
        f"--workdir={root}")
  trained = classifier.load_trained(root, classifier.MMBT)
  model = games.with_masking(trained.model, config.get("text_masking"), config.get("image_masking"))
  options = options_from_config(config)
  explainer = process_explainer(model, options, tokenizer=trained.tokenizer)
  builder = builders.prepare_in_process_order(data_config(config, trained.config))
  reliance = builders.class_reliance(builder)
  designed = None if reliance is None else {c["name"]: c["text_share"] for c in reliance}
  directory = workdir.stage_dir(root, STAGE)
  os.makedirs(directory, exist_ok=True)
  # The outputs of an earlier run go first: a run stopped half way must not leave a mix of old and
  # new files that looks finished. The fingerprint is written last, once every output is.
  current = fingerprint(config, root, builder)
  workdir.remove(*(os.path.join(directory, name) for name in
                   (workdir.FINGERPRINT, *map(workdir.shares_file, builders.EVAL_SPLITS))))
  summary = {
      "class_names": trained.class_names, "value": options.value, "target": config.target,
      "method": options.method, "max_exact_players": options.max_exact_players,
      "text_players": options.text_players, "image_players": options.image_players,
      "patch_grid": options.patch_grid, "text_masking": model.config.text_masking,
      "image_masking": model.config.image_masking, "splits": {},
  }
  # Replaces the event file of an earlier run; a split's histogram is written once it is explained.
  with tensorboard.Events(directory) as events:
    for split in config.get("splits", builders.EVAL_SPLITS):
      arrays, timing = explain_split(explainer, builders.data_source(builder, split),
                                     trained.preprocess, config=config,
                                     class_names=trained.class_names, split=split)
      split_summary = mmshap.summarize(arrays["t_shap"], arrays["exact"], arrays["labels"],
                                       trained.class_names, designed)
      split_summary.update(timing)
      summary["splits"][split] = split_summary
      logging.info("mmshap %s: T-SHAP %s over %d examples (%d exact), %.1f examples/s", split,
                   split_summary["t_shap_mean"], split_summary["count"], split_summary["num_exact"],
                   timing["examples_per_s"])
      if workdir.is_writer():
        workdir.write_atomically(os.path.join(directory, workdir.shares_file(split)),
                                 lambda partial, arrays=arrays: np.savez(partial, **arrays))
        plots.t_shap_histogram(arrays["t_shap"],
                               os.path.join(directory, f"t_shap_histogram_{split}.png"),
                               f"MM-SHAP {split}")
        plots.t_shap_per_class(split_summary,
                               os.path.join(directory, f"t_shap_per_class_{split}.png"),
                               f"MM-SHAP per class, {split}")
      events.histogram(f"t_shap/{split}", arrays["t_shap"], step=0, bins=T_SHAP_BINS)
      if split_summary["t_shap_mean"] is not None:
        events.scalar(f"t_shap_mean/{split}", split_summary["t_shap_mean"], step=0)
  if workdir.is_writer():
    workdir.write_json(os.path.join(directory, workdir.SUMMARY), summary)
  workdir.write_fingerprint(root, STAGE, current)
  if jax.process_count() > 1:  # No process reads the outputs (the meta stage) before they exist.
    multihost_utils.sync_global_devices("jmmshap.mmshap_stage: outputs written")
  return summary
